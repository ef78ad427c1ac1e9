"""What the AV-sync meter adds to preprocessing's CPU per frame, measured in one run.

Preprocesses clips in this process with the real per-clip actor (`ClipPreprocessor`, default config: the
`landmarks` meter) and times, in CPU seconds of this process, the whole of each clip and the align stage
(the meter's measure) inside it. ffmpeg's decode runs in child processes and is not counted, so the share
printed is an upper bound of the meter's share of all the CPU preprocessing uses.

Corpora: a synth corpus (--clips clips of --seconds s) and, when ../shared/media is present, its real
development clips. Prints per corpus: frames, CPU ms per frame in total and in the meter, and the meter's
share ("adds X %" = meter / (total - meter)); writes benchmarks/results/meter_cost.json.
Usage: python benchmarks/meter_cost.py [--clips 6] [--seconds 4] [--media ../shared/media]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


class Timed:
    """Wraps a callable and adds up the CPU seconds of this process spent in it."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.cpu = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        began = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.cpu += time.process_time() - began


def measure(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Preprocess `rows` one by one; CPU seconds in total and in the align stage, and frames written."""
    from pipeline.clip_preprocessor import ClipPreprocessor
    from pipeline.preprocess_config import PreprocessConfig

    actor = ClipPreprocessor(PreprocessConfig(), str(out))
    align = Timed(actor.align) if hasattr(actor, "align") else None
    if align is None:
        raise SystemExit("ClipPreprocessor has no `align` stage attribute to time")
    actor.align = align
    total, frames, clips = 0.0, 0, 0
    for row in rows:
        began = time.process_time()
        result = actor.process(row)
        total += time.process_time() - began
        frames += int(result["frames"])
        clips += len(result["clips"])
    meter = align.cpu
    return {
        "inputs": len(rows),
        "clips": clips,
        "frames": frames,
        "cpu_ms_per_frame": round(1000 * total / max(frames, 1), 3),
        "meter_cpu_ms_per_frame": round(1000 * meter / max(frames, 1), 3),
        "meter_adds": round(meter / max(total - meter, 1e-9), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--media", default=str(MEDIA), help="real clips (skipped when absent)")
    args = parser.parse_args()

    from pipeline.corpus import discover
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-meter-") as tmp:
        root = Path(tmp)
        synth(
            SynthConfig(speakers=max(1, args.clips // 3), clips_per_speaker=1, seconds=args.seconds),
            str(root / "synth"),
        )
        report["synth"] = measure(discover(str(root / "synth"))[: args.clips], root / "out_synth")
        media = Path(args.media)
        if media.is_dir():
            report["real"] = measure(discover(str(media)), root / "out_real")
    for name, r in report.items():
        print(
            f"{name:6s} {r['clips']:3d} clips {r['frames']:6d} frames: {r['cpu_ms_per_frame']:.2f} ms/frame, "
            f"meter {r['meter_cpu_ms_per_frame']:.3f} ms/frame: adds {100 * r['meter_adds']:.1f} %"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "meter_cost.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / 'meter_cost.json'}")


if __name__ == "__main__":
    main()

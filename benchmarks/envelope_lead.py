"""At which lag does mouth openness follow the audio envelope? Real dev clips and synth clips.

Scoring's `openness_envelope_correlation` reads openness at frame t against the envelope `MOUTH_LEAD_MS`
later (evaluation/sync.py: openness_envelope_r). This prints, per clip and on average, r(openness(t),
envelope(t + lag)) for lag -2..4 frames at 25 fps, on the development clips (`../shared/media`, tracked as
benchmarks/offset.py tracks them, cached by content under --work) and on --synth-clips synth clips (en/es/hi,
made here with the demo's synth settings and seed 0), so the lag scoring uses can be checked against both.

Usage: python benchmarks/envelope_lead.py [--media ../shared/media] [--work /tmp/offset_bench]
[--synth-clips 12]. Writes benchmarks/results/envelope_lead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
LAGS = tuple(range(-2, 5))
FPS = 25.0


def lagged_r(openness: np.ndarray, envelope: np.ndarray) -> list[float]:
    """r(openness(t), envelope(t + lag)) for each lag in LAGS, as scoring computes it at its one lag."""
    from evaluation.sync import openness_envelope_r

    return [openness_envelope_r(openness, envelope, FPS, lead_ms=k * 1000.0 / FPS) for k in LAGS]


def clip_r(path: Path, work: Path, tracker) -> list[float]:  # noqa: ANN001
    """Lagged r of one video file (tracked at 25 fps, cached)."""
    from offset import tracked

    from pipeline.media import read_audio
    from pipeline.offset import audio_envelope

    _, openness = tracked(path, work, tracker)
    return lagged_r(openness, audio_envelope(read_audio(path), 16000, len(openness), FPS))


def synth_clips(work: Path, count: int) -> list[Path]:
    """`count` of the demo corpus's synth clips (seed 0), made once under `work`."""
    from core.config import load_config
    from lipsync.demo import DEMO_CONFIG, DemoConfig
    from pipeline.synth import run as synth

    root = work / "envelope_lead_synth"
    if not (root / "manifest.csv").exists():
        synth(load_config(DemoConfig, DEMO_CONFIG).synth, str(root))
    paths = sorted(root.rglob("*.mp4"))
    return paths[:: max(1, len(paths) // count)][:count]  # spread over the languages and speakers


def summary(rows: dict[str, list[float]]) -> dict[str, float]:
    mean = np.nanmean(np.array(list(rows.values()), np.float64), axis=0)
    return {str(k): round(float(v), 3) for k, v in zip(LAGS, mean, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=str(Path(__file__).resolve().parents[2] / "shared" / "media"))
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "offset_bench"))
    parser.add_argument("--synth-clips", type=int, default=12)
    args = parser.parse_args()

    from offset import languages

    from pipeline.landmarks import FaceMeshTracker

    media, work = Path(args.media), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tracker = FaceMeshTracker(max_faces=1)
    groups: dict[str, dict[str, list[float]]] = {"real": {}, "synth": {}}
    if media.is_dir():
        for name in sorted(languages(media)):
            groups["real"][Path(name).stem] = clip_r(media / name, work, tracker)
    for path in synth_clips(work, args.synth_clips):
        groups["synth"][f"{path.parent.name}/{path.stem}"] = clip_r(path, work, tracker)
    print("r(openness(t), envelope(t + lag)), lag in frames at 25 fps:", "  ".join(f"{k:+d}" for k in LAGS))
    out = {"lags": list(LAGS), "groups": {}}
    for group, rows in groups.items():
        if not rows:
            continue
        for name, values in rows.items():
            print(f"  {group:5s} {name:34s}", "  ".join(f"{v:5.2f}" for v in values))
        mean = summary(rows)
        print(
            f"  {group:5s} {'mean of ' + str(len(rows)) + ' clips':34s}",
            "  ".join(f"{v:5.2f}" for v in mean.values()),
        )
        out["groups"][group] = {"clips": rows, "mean": mean}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "envelope_lead.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'envelope_lead.json'}")


if __name__ == "__main__":
    main()

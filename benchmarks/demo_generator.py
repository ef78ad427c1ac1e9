"""What the demo's generator settings do to its outputs' sync figures, on a finished demo's own data.

Takes the output folder of a finished `lipsync demo` (its preprocessed corpus, expert SyncNet, new-speech
pairs and settings), retrains only the generator once per --variant (a few of the demo's `wav2lip`
settings changed, the rest as the demo's, into --work), generates the same pairs and scores them as the
demo does. Per language it prints the figures the demo is judged on: the landmark AV offset and its
confidence, openness–envelope r, viseme agreement (with bilabial closure and open-vowel opening, its two
halves), next to the baseline's. The empty variant "-" is the demo's own settings on the demo's own corpus:
a one-worker training is repeatable (clip ids hash paths within the corpus, the window stream keeps its
seeded order; two runs of the demo's expert ended identical), so "-" should retrain the demo's own
generator when the demo ran on the same code.

Usage: python benchmarks/demo_generator.py [DEMO_OUT (default demo_out)] [--config configs/demo.yaml]
[--variant - mouth_weight=2 steps=900,sync_weight=0.03 windows.windows_per_clip=32] [--work /tmp/demo_generator].
Writes benchmarks/results/demo_generator.json.
Without a finished demo there is nothing to measure: it says so and exits 0 (`make demo` first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def parse_variant(text: str) -> dict[str, Any]:
    """ "k=v,k=v" (values read as YAML) as a dict; "-" is no change."""
    if text == "-":
        return {}
    pairs = (item.split("=", 1) for item in text.split(","))
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def variant_name(changes: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in changes.items()) or "demo"


def changed(cfg: Any, changes: dict[str, Any]) -> Any:
    """`cfg` with `changes` applied; a dotted key ("windows.windows_per_clip") changes a nested config."""
    top = {k: v for k, v in changes.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        if "." in key:
            head, rest = key.split(".", 1)
            nested.setdefault(head, {})[rest] = value
    top |= {head: changed(getattr(cfg, head), inner) for head, inner in nested.items()}
    return dataclasses.replace(cfg, **top)


def retrain_and_score(demo: Path, config: str, changes: dict[str, Any], work: Path) -> dict[str, Any]:
    """Retrain the generator with `changes`, generate the demo's pairs, score them; figures per row."""
    import pyarrow.parquet as pq

    from core.config import load_config
    from core.errors import BadInput
    from evaluation.score import run as score
    from evaluation.score_config import ScoreConfig
    from evaluation.summary import SUMMARY_METRICS
    from generation.run import run as generate
    from lipsync.demo import DemoConfig
    from training.checkpoints import latest_checkpoint
    from training.wav2lip_job import run as train

    cfg = load_config(DemoConfig, config)
    out = work / variant_name(changes).replace("=", "_").replace(",", "-")
    found = latest_checkpoint(str(demo / "syncnet"), "syncnet")  # what the demo's generator trained with
    if found is None:
        raise BadInput(f"{demo}: no expert SyncNet checkpoint under syncnet/")
    expert = found[0]
    started = time.perf_counter()
    trained = train(
        changed(cfg.wav2lip, changes),
        str(demo / "preprocessed"),
        str(out / "wav2lip"),
        expert,
    )
    train_s = time.perf_counter() - started
    pairs = demo / "new_speech" / "pairs.csv"
    generate(cfg.generate, str(pairs), str(out / "generated"), trained["checkpoint"])
    scoring = dataclasses.replace(ScoreConfig(), system="wav2lip-demo")
    score(scoring, str(out / "generated"), str(out / "scores"), syncnet=expert)
    table = pq.read_table(out / "scores" / "scores.parquet").to_pylist()
    rows = [
        {"system": r["system"], "language": r["language"]} | {k: r.get(k) for k in SUMMARY_METRICS}
        for r in table
    ]
    return {
        "variant": variant_name(changes),
        "train_s": round(train_s, 1),
        "metrics": trained["metrics"],
        "rows": rows,
    }


def show(run: dict[str, Any]) -> None:
    print(f"\n{run['variant']}: generator trained in {run['train_s']:.0f} s")
    print("system        lang  offset  conf     r   viseme  closed  open")
    for r in sorted(run["rows"], key=lambda r: (r["language"], r["system"])):
        print(
            f"{r['system']:<13} {r['language']:<4} {r['landmark_offset_frames']:>6} "
            f"{r['landmark_confidence']:>5.1f} {r['openness_envelope_correlation']:>5.2f} "
            f"{r['viseme_agreement']:>8.2f} {r['bilabial_closed']:>7.2f} {r['open_vowel_open']:>5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", nargs="?", default="demo_out")
    parser.add_argument(
        "--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    )
    parser.add_argument("--variant", nargs="+", default=["-", "mouth_weight=2"])
    parser.add_argument("--work", default="/tmp/demo_generator")
    args = parser.parse_args()
    demo = Path(args.demo)
    if not (demo / "new_speech" / "pairs.csv").is_file():
        print(
            f"{demo}: not a finished `lipsync demo` output (no new_speech/pairs.csv); run `make demo` first"
        )
        return
    from core.ray import ensure_ray

    ensure_ray(None)
    variants = [parse_variant(v) for v in args.variant]
    runs = [retrain_and_score(demo, args.config, v, Path(args.work)) for v in variants]
    for run in runs:
        show(run)
    RESULTS.mkdir(exist_ok=True)
    out = {"demo": str(demo.resolve()), "config": args.config, "runs": runs}
    (RESULTS / "demo_generator.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {RESULTS / 'demo_generator.json'}")


if __name__ == "__main__":
    main()

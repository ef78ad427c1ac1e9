"""Scoring throughput: `lipsync score` on many short generated clips, on the Ray actor pool.

Prints and writes benchmarks/results/score.json: clips/s over the whole job (Ray start-up excluded, actor
start-up included), clips/s once the actors are up (from the per-row processing times), seconds of video
scored per wall second, per-stage cost of one clip, and the machine's load while it ran (the numbers are
only comparable on an idle machine).
Usage: python benchmarks/score.py [--clips 100] [--seconds 2] [--workers 2] [--syncnet] [--compare-expression]
(--syncnet adds our SyncNet's LSE-D/LSE-C with a randomly initialised checkpoint: same cost as a trained one.
--compare-expression scores the same clips, each with its own video as `source`, with the expression
columns off and on, three times each in the order off-on-on-off-off-on, and prints the jobs' per-clip actor
seconds and the on/off ratios: the cost of the facial-expression features, measured in one run; writes
score_expression.json.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_corpus(root: Path, clips: int, seconds: float) -> Path:
    """A synth corpus (en, es, hi) of at least `clips` clips and a manifest of exactly `clips` of them."""
    from pipeline.synth import SynthConfig, run

    speakers = math.ceil(clips / 6)
    run(SynthConfig(speakers=speakers, clips_per_speaker=2, seconds=seconds, seed=1), str(root))
    rows = list(csv.DictReader((root / "manifest.csv").open(encoding="utf-8")))[:clips]
    manifest = root / "bench.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def random_syncnet(root: Path) -> str:
    """A SyncNet checkpoint with random weights (scoring cost does not depend on the weights)."""
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    return save_checkpoint(
        str(root / "syncnet"), checkpoint_payload(build_model("syncnet"), "syncnet", 96, 0)
    )


def score(
    manifest: Path, out: Path, workers: int, syncnet: str | None, expression: bool = True
) -> tuple[dict, float]:
    """Run the job on the already started Ray; returns (its result, wall seconds)."""
    from evaluation.score import run
    from evaluation.score_config import ScoreConfig
    from pipeline.preprocess_config import PoolConfig

    cfg = replace(ScoreConfig(), resources=replace(PoolConfig(), workers=workers), expression=expression)
    start = time.perf_counter()
    result = run(cfg, str(manifest), str(out), syncnet=syncnet)
    return result, time.perf_counter() - start


def with_sources(manifest: Path) -> Path:
    """The manifest with each clip's own video as its `source` (what scoring compares expressions against)."""
    import pandas as pd

    table = pd.read_csv(manifest)
    table["source"] = table["video"]
    out = manifest.with_name("manifest_with_sources.csv")
    table.to_csv(out, index=False)
    return out


def compare_expression(manifest: Path, root: Path, workers: int) -> dict:
    """Per-clip actor seconds with the expression columns off and on, in the order off, on, on, off, off, on
    (so that neither side gets the warm-up or the machine's drift): per clip the ratio of its mean seconds
    on to off, and their median (robust to a clip that hit a busy moment)."""
    import pandas as pd

    manifest = with_sources(manifest)
    per_clip: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    job_means: dict[str, list[float]] = {"off": [], "on": []}
    for i, expression in enumerate((False, True, True, False, False, True)):
        out = root / f"expr_{i}"
        score(manifest, out, workers, None, expression)
        table = pd.read_parquet(out / "scores.parquet")
        assert ("expr_smile_mad" in table) == expression, "the expression switch did not switch"
        side = "on" if expression else "off"
        job_means[side].append(round(float(table["seconds"].mean()), 4))
        for clip, seconds in zip(table["id"], table["seconds"], strict=True):
            per_clip[side].setdefault(str(clip), []).append(float(seconds))
    ratios = [
        (sum(on) / len(on)) / (sum(per_clip["off"][clip]) / len(per_clip["off"][clip]))
        for clip, on in per_clip["on"].items()
        if clip in per_clip["off"]
    ]
    ratios.sort()
    return {
        "seconds_per_clip_off": job_means["off"],
        "seconds_per_clip_on": job_means["on"],
        "cost_ratio_on_off_of_means": round(sum(job_means["on"]) / sum(job_means["off"]), 4),
        "cost_ratio_on_off_median_per_clip": round(ratios[len(ratios) // 2], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each clip")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--syncnet", action="store_true", help="also compute LSE with our SyncNet")
    parser.add_argument("--compare-expression", action="store_true", help="cost of the expression columns")
    args = parser.parse_args()
    if args.compare_expression:
        main_compare_expression(args)
        return

    import pandas as pd
    import ray

    from core.ray import ensure_ray

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ensure_ray(num_cpus=os.cpu_count())  # as `lipsync score` does, workers' allocator included
        manifest = make_corpus(root / "corpus", args.clips, args.seconds)
        synth_s = time.perf_counter() - t0
        load_before = os.getloadavg()[0]
        syncnet = random_syncnet(root) if args.syncnet else None
        result, wall = score(manifest, root / "out", args.workers, syncnet)
        load_after = os.getloadavg()[0]
        table = pd.read_parquet(root / "out" / "scores.parquet")
        ray.shutdown()
    ok = table[table["status"] == "ok"]
    busy = float(table["seconds"].sum())
    report = {
        "clips": int(len(table)),
        "scored": int(len(ok)),
        "clip_seconds": args.seconds,
        "workers": args.workers,
        "syncnet": bool(args.syncnet),
        "cpus": os.cpu_count(),
        "wall_seconds": round(wall, 2),
        "clips_per_second": round(len(table) / wall, 3),
        "clips_per_second_actors_up": round(args.workers * len(table) / busy, 3),
        "video_seconds_per_second": round(len(table) * args.seconds / wall, 3),
        "mean_seconds_per_clip_in_actor": round(busy / len(table), 3),
        "distinct_actor_pids": int(table["worker_pid"].nunique()),
        "landmark_offset_within_1": round(float((ok["landmark_offset_frames"].abs() <= 1).mean()), 4),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "synth_seconds": round(synth_s, 1),
        "job_result": {k: v for k, v in result.items() if k not in ("out", "scores", "summary")},
    }
    RESULTS.mkdir(exist_ok=True)
    name = "score_syncnet.json" if args.syncnet else "score.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def main_compare_expression(args: argparse.Namespace) -> None:
    from core.ray import ensure_ray

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        root = Path(tmp)
        ensure_ray(num_cpus=os.cpu_count())
        manifest = make_corpus(root / "corpus", args.clips, args.seconds)
        load_before = os.getloadavg()[0]
        report = compare_expression(manifest, root, args.workers)
    report |= {
        "clips": args.clips,
        "clip_seconds": args.seconds,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "score_expression.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

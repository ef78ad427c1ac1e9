"""Learning you can watch: minutes until the expert SyncNet's val loss < 0.5, and until the generator's
outputs on new speech pass the sync bar, with the demo's recipes (configs/demo.yaml) on this machine.

1. Corpus: the demo's synth corpus, preprocessed (cached between runs; not counted in the minutes).
2. Expert: `lipsync train syncnet` with the demo's config, resumed in chunks of --expert-chunk steps until its
   val loss is < 0.5 with the true offset ranked first on >= 80 % of val clips, or --expert-steps. Minutes are
   training wall time (each chunk's run, Ray Train start included).
3. Generator: `lipsync train wav2lip` with the demo's config, in chunks of --generator-chunk steps; after each
   chunk the demo's new-speech pairs (en, es, hi) are generated and scored with the do-nothing baseline
   (evaluation.baseline.sync_bar), until every language passes or --generator-steps. Minutes are training
   wall time only (generation and scoring are measurement).

Writes benchmarks/results/learning.json: both curves, the minutes to each bar (null when not reached) and
the machine. Usage: python benchmarks/learning.py [--seed 0] [--expert-steps 400] [--generator-steps 1200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(tempfile.gettempdir()) / "lipsync-bench-learning"


def demo_config(seed: int) -> Any:
    from core.config import load_config
    from lipsync.demo import DEMO_CONFIG, DemoConfig

    cfg = load_config(DemoConfig, DEMO_CONFIG)
    return dataclasses.replace(
        cfg,
        syncnet=dataclasses.replace(cfg.syncnet, seed=seed),
        wav2lip=dataclasses.replace(cfg.wav2lip, seed=seed),
    )


def corpus(cfg: Any) -> tuple[Path, Path]:
    """(raw corpus, preprocessed) of the demo's synth settings, made once."""
    from pipeline.preprocess import run as preprocess
    from pipeline.synth import run as synth

    root = CACHE / f"s{cfg.synth.speakers}c{cfg.synth.clips_per_speaker}seed{cfg.synth.seed}"
    raw, pre = root / "corpus", root / "preprocessed"
    if not (pre / "clips.parquet").exists():
        synth(cfg.synth, str(raw))
        preprocess(cfg.preprocess, str(raw), str(pre))
    return raw, pre


def train_expert(cfg: Any, data: Path, out: Path, max_steps: int, chunk: int) -> dict[str, Any]:
    from training.syncnet_job import run

    curve, minutes, result = [], 0.0, {}
    for steps in range(chunk, max_steps + 1, chunk):
        started = time.perf_counter()
        result = run(dataclasses.replace(cfg, steps=steps, eval_every=chunk), str(data), str(out))
        minutes += (time.perf_counter() - started) / 60
        m = result["metrics"]
        point = {"step": steps, "minutes": round(minutes, 2)} | {
            k: m.get(k) for k in ("val_loss", "val_accuracy", "offset_rank_mean", "offset_first_share")
        }
        curve.append(point)
        print(f"expert {point}", flush=True)
        if (m.get("val_loss") or 1.0) < 0.5 and (m.get("offset_first_share") or 0.0) >= 0.8:
            break
    reached = next((p["minutes"] for p in curve if (p["val_loss"] or 1.0) < 0.5), None)
    return {"curve": curve, "minutes_to_val_below_0_5": reached, "checkpoint": result.get("checkpoint")}


def sync_figures(cfg: Any, raw: Path, data: Path, checkpoint: str, expert: str, out: Path) -> dict[str, Any]:
    """Generate the demo's new-speech pairs with `checkpoint`, score them beside the baseline; per language."""
    import pandas as pd

    from evaluation.baseline import BASELINE_SYSTEM, sync_bar
    from evaluation.score import run as score
    from evaluation.score_config import ScoreConfig
    from generation.config import GenerateConfig
    from generation.run import run as generate
    from lipsync.demo import new_speech_pairs

    pairs = new_speech_pairs(raw, data / "clips.parquet", out / "new_speech", cfg)
    generate(GenerateConfig(), str(pairs), str(out / "generated"), checkpoint)
    scored = score(
        dataclasses.replace(ScoreConfig(), system="wav2lip-demo"),
        str(out / "generated"),
        str(out / "scores"),
        syncnet=expert,
    )
    frame = pd.read_parquet(scored["scores"])
    keys = [
        "landmark_offset_frames",
        "landmark_abstained",
        "openness_envelope_correlation",
        "viseme_agreement",
    ]
    rows = {
        f"{r['language']}/{'baseline' if r['system'] == BASELINE_SYSTEM else 'generated'}": {
            k: (v.item() if hasattr(v, "item") else v) for k, v in r.items() if k in keys
        }
        for r in frame.to_dict(orient="records")
    }
    bar = sync_bar(frame)
    return {"bar": bar, "rows": rows, "all_pass": bool(bar) and all(b["pass"] for b in bar.values())}


def train_generator(
    cfg: Any, raw: Path, data: Path, expert: str, out: Path, max_steps: int, chunk: int
) -> dict[str, Any]:
    from training.wav2lip_job import run

    curve, minutes = [], 0.0
    for steps in range(chunk, max_steps + 1, chunk):
        started = time.perf_counter()
        result = run(dataclasses.replace(cfg.wav2lip, steps=steps), str(data), str(out / "wav2lip"), expert)
        minutes += (time.perf_counter() - started) / 60
        figures = sync_figures(cfg, raw, data, result["checkpoint"], expert, out / f"eval_{steps}")
        point = {"step": steps, "minutes": round(minutes, 2), **figures, "metrics": result["metrics"]}
        curve.append(point)
        print(f"generator step {steps} ({minutes:.1f} min): {json.dumps(figures['bar'])}", flush=True)
        if figures["all_pass"]:
            break
    reached = next((p["minutes"] for p in curve if p["all_pass"]), None)
    return {"curve": curve, "minutes_to_sync_bar": reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed of both recipes")
    parser.add_argument("--expert-steps", type=int, default=400)
    parser.add_argument("--expert-chunk", type=int, default=50)
    parser.add_argument("--generator-steps", type=int, default=1200)
    parser.add_argument("--generator-chunk", type=int, default=150)
    parser.add_argument("--out", help="keep checkpoints and videos here (default: a temporary directory)")
    args = parser.parse_args()

    from core.ray import ensure_ray

    cfg = demo_config(args.seed)
    ensure_ray(num_cpus=os.cpu_count())
    raw, data = corpus(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        expert = train_expert(cfg.syncnet, data, out / "syncnet", args.expert_steps, args.expert_chunk)
        generator = train_generator(
            cfg, raw, data, expert["checkpoint"], out, args.generator_steps, args.generator_chunk
        )
    result = {
        "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "expert": expert,
        "generator": generator,
        "targets": {"expert": "val loss < 0.5, true offset first on >= 80 % of val clips",
                    "generator": "evaluation.baseline.BAR on en, es, hi, baseline worse on each"},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"learning_seed{args.seed}.json"
    target.write_text(json.dumps(result, indent=1, default=str))
    print(f"expert: val < 0.5 after {expert['minutes_to_val_below_0_5']} min; "
          f"generator: sync bar after {generator['minutes_to_sync_bar']} min -> {target}")  # fmt: skip


if __name__ == "__main__":
    main()

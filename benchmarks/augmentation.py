"""Does augmentation help a demo-sized generator on a speaker unlike its training speakers?

1. Train corpus: the demo's synth corpus, preprocessed (cached; shared with benchmarks/learning.py).
2. Held-out corpus: one new synth speaker per language whose look (darker, hue-shifted skin; a green
   background; a smaller face) is outside the range of every training speaker's (HELD_OUT_LOOK).
3. Expert: the demo's SyncNet recipe trained in this process once (`--expert-steps`; cached), or `--expert CKPT`.
4. For each seed, the demo's generator recipe trained in-process for `--steps` steps with augmentation off
   and on (training.augment defaults, reverberation on a third of the clips), two runs at a time.
5. Each generator is measured on every window of the held-out corpus and of the train corpus's val split:
   L1 to the true frames (quality) and the frozen expert's sync loss on the generated mouths with the true
   audio (sync; lower is better). `real_sync` is the expert's loss on the true frames (what perfect lips get).

Prints mean ± sd per condition, the with/without ratios, and writes benchmarks/results/augmentation.json.
Usage: python benchmarks/augmentation.py [--seeds 0 1 2] [--steps 300] [--expert-steps 250] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(tempfile.gettempdir()) / "lipsync-bench-learning"
HELD_OUT_LOOK = {
    "brightness": 0.62,
    "hue_shift": 24,
    "saturation": 1.4,
    "face_fraction": 0.3,
    "background": [40, 170, 60],
}
AUGMENT = {"enabled": True, "reverb": 0.33}


def demo_config() -> Any:
    from core.config import load_config
    from lipsync.demo import DEMO_CONFIG, DemoConfig

    return load_config(DemoConfig, DEMO_CONFIG)


def prepared(name: str, synth_cfg: Any, preprocess_cfg: Any) -> Path:
    """A synth corpus, preprocessed once and cached."""
    from pipeline.preprocess import run as preprocess
    from pipeline.synth import run as synth

    root = CACHE / name
    if not (root / "preprocessed" / "clips.parquet").exists():
        synth(synth_cfg, str(root / "corpus"))
        preprocess(preprocess_cfg, str(root / "corpus"), str(root / "preprocessed"))
    return root / "preprocessed"


def demo_corpus(demo: Any) -> Path:
    """The demo's synth corpus, preprocessed (cached; the same cache as benchmarks/learning.py's)."""
    name = f"s{demo.synth.speakers}c{demo.synth.clips_per_speaker}seed{demo.synth.seed}"
    return prepared(name, demo.synth, demo.preprocess)


def cached_expert(demo: Any, data: Path, steps: int) -> str:
    """The demo's expert trained `steps` steps in this process, once: later runs reuse its checkpoint."""
    out = CACHE / f"expert_{steps}"
    return str(out) if (out / "model.pt").exists() else train_expert(demo, data, steps, out)


def rows(data: Path, split: str | None, cfg: Any) -> list[dict[str, Any]]:
    from training.data import DataSelection, read_clips, select
    from training.streams import shard_rows

    clips = read_clips(str(data))
    if split is None:  # every clip of the corpus, whatever its split
        selection = DataSelection(clip_ids=tuple(clips["clip_id"]))
        return shard_rows(
            select(str(data), selection, "train", clips.assign(split="train")), cfg.augment.changes_audio
        )
    return shard_rows(select(str(data), cfg.data, split, clips), cfg.augment.changes_audio)


def train_expert(cfg: Any, data: Path, steps: int, out: Path) -> str:
    """The demo's SyncNet recipe, `steps` steps in this process; returns its checkpoint."""
    import torch

    from training.checkpoints import write_payloads
    from training.streams import BatchStream
    from training.syncnet_job import SyncNetRecipe

    torch.set_num_threads(2)
    expert_cfg = dataclasses.replace(cfg.syncnet, steps=steps)
    recipe = SyncNetRecipe(expert_cfg, torch.device("cpu"))
    stream = BatchStream(rows(data, "train", expert_cfg), expert_cfg, "syncnet")
    started = time.perf_counter()
    for step in range(steps):
        recipe.step(next(stream))
        if (step + 1) % 50 == 0:
            print(f"expert step {step + 1} ({time.perf_counter() - started:.0f} s)", flush=True)
    write_payloads(str(out), recipe.payloads(steps, {}))
    return str(out)


def expert_on_truth(recipe: Any, batches: list[dict]) -> float:
    """The frozen expert's sync loss on the true frames (the best a generator's mouths can get)."""
    import torch

    from training.devices import images
    from training.wav2lip_job import expert_sync_loss

    with torch.no_grad():
        losses = [
            float(expert_sync_loss(recipe.expert, b["mel"], images(b["y"], recipe.device))) for b in batches
        ]
    return statistics.fmean(losses)


def one_run(args: dict[str, Any]) -> dict[str, Any]:
    """Train one generator (seed, augmentation on or off) and measure it; runs in its own process."""
    import torch

    from core.config import from_dict
    from training.augment import AugmentConfig
    from training.streams import BatchStream, val_batches
    from training.wav2lip_job import Wav2LipRecipe

    torch.set_num_threads(1)
    demo = demo_config()
    augment = from_dict(AugmentConfig, AUGMENT) if args["augment"] else AugmentConfig()
    cfg = dataclasses.replace(demo.wav2lip, seed=args["seed"], steps=args["steps"], augment=augment)
    recipe = Wav2LipRecipe(cfg, torch.device("cpu"), expert=args["expert"])
    stream = BatchStream(rows(Path(args["data"]), "train", cfg), cfg, "wav2lip")
    val = val_batches(rows(Path(args["data"]), "val", cfg), cfg, "wav2lip")
    held = val_batches(
        rows(Path(args["held_out"]), None, cfg), dataclasses.replace(cfg, eval_windows_per_clip=8), "wav2lip"
    )
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        recipe.step(next(stream))
        if step % cfg.eval_every == 0:
            recipe.evaluate(val)  # switches the sync loss on, as the recipe does in a run
    seconds = time.perf_counter() - started
    out = {"seed": args["seed"], "augment": args["augment"], "train_s": round(seconds, 1)}
    for name, batches in (("held_out", held), ("val", val)):
        metrics = recipe.evaluate(batches)
        out[name] = {
            "l1": metrics["val_l1"],
            "sync": metrics["val_sync"],
            "real_sync": expert_on_truth(recipe, batches),
        }
    out["sync_weight_at_end"] = recipe.train_state["sync_weight"]
    print(json.dumps(out), flush=True)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd per condition and figure, and the with/without ratio of the means."""
    table: dict[str, Any] = {}
    for corpus in ("held_out", "val"):
        for figure in ("l1", "sync"):
            row = {}
            for augment in (False, True):
                values = [r[corpus][figure] for r in runs if r["augment"] == augment]
                row["on" if augment else "off"] = {
                    "mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
            row["ratio_on_off"] = row["on"]["mean"] / row["off"]["mean"]
            table[f"{corpus}.{figure}"] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="generator steps per run (the demo's: 300)")
    parser.add_argument("--expert", help="an expert SyncNet checkpoint (default: train the demo's here)")
    parser.add_argument("--expert-steps", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--out", default=str(RESULTS / "augmentation.json"))
    args = parser.parse_args()

    from pipeline.synth import SynthConfig

    demo = demo_config()
    data = demo_corpus(demo)
    held_synth = SynthConfig(
        languages=demo.synth.languages, speakers=1, clips_per_speaker=2, seed=101, look=HELD_OUT_LOOK
    )
    held_out = prepared("held_out_look", held_synth, demo.preprocess)
    expert = args.expert or cached_expert(demo, data, args.expert_steps)
    jobs = [
        {
            "seed": s,
            "augment": a,
            "steps": args.steps,
            "expert": expert,
            "data": str(data),
            "held_out": str(held_out),
        }
        for s in args.seeds
        for a in (False, True)
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_run, jobs))
    table = summarise(runs)
    for key, row in table.items():
        off, on = row["off"], row["on"]
        print(
            f"{key:14s} off {off['mean']:.4f} ± {off['sd']:.4f}   on {on['mean']:.4f} ± {on['sd']:.4f}"
            f"   on/off {row['ratio_on_off']:.3f}"
        )
    result = {
        "runs": runs,
        "table": table,
        "held_out_look": HELD_OUT_LOOK,
        "augment": AUGMENT,
        "steps": args.steps,
        "expert": expert,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

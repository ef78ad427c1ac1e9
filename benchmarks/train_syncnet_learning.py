"""Does training learn? The expert SyncNet on a synth corpus on CPU, then a generator overfitting a small set.

1. SyncNet (`lipsync train syncnet`, resumed chunk after chunk) until its validation BCE is below 0.5 or
   the time budget (15 min) is spent. Target: from about 0.69 to < 0.5.
2. Offset ranking on the val clips with the trained expert: for every window of a clip, the in-sync
   probability of the faces with the mel shifted by k = -5..5 frames, averaged over the clip. Target: the true
   offset (the clip's estimated av_offset_frames, 0 for synth clips) ranks first for most clips.
3. The generator (`lipsync train wav2lip`, with the expert above, no GAN) on one clip's 2 windows, batch 2,
   lr 1e-3. Target: L1 falls at least 5x.

Prints figures and writes benchmarks/results/train_syncnet_learning.json.
Usage: python benchmarks/train_syncnet_learning.py [--minutes 15] [--speakers 4] [--generator-steps 80]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = Path(tempfile.gettempdir()) / "lipsync-bench-learning-corpus"
SHIFTS = range(-5, 6)
THREADS = 2  # torch threads of the one training worker (1 CPU reserved; the window tasks need little)


def corpus(speakers: int, clips_per_speaker: int) -> str:
    """A synth corpus (en, es, hi; offset 0) preprocessed once and cached between runs."""
    root = CORPUS / f"s{speakers}c{clips_per_speaker}"
    out = root / "preprocessed"
    if not (out / "clips.parquet").exists():
        from pipeline.preprocess import run as preprocess
        from pipeline.preprocess_config import PreprocessConfig
        from pipeline.synth import SynthConfig
        from pipeline.synth import run as synth

        cfg = SynthConfig(
            languages=("en", "es", "hi"), speakers=speakers, clips_per_speaker=clips_per_speaker, seed=7
        )
        synth(cfg, str(root / "raw"))
        preprocess(PreprocessConfig(), str(root / "raw"), str(out))
    return str(out)


def history(result: dict[str, Any], key: str) -> list[tuple[int, float]]:
    from training.metrics import metric_history

    return metric_history(result["mlflow_tracking_uri"], result["mlflow_run_id"], key)


def train_syncnet(data: str, out: str, minutes: float, chunk: int, batch_size: int) -> dict[str, Any]:
    """Chunks of `chunk` steps (each run resumes the last) until val BCE < 0.5 or time is up."""
    from training.data import WindowConfig
    from training.syncnet_job import SyncNetConfig, run

    started, steps, result = time.perf_counter(), 0, {}
    while time.perf_counter() - started < minutes * 60:
        steps += chunk
        cfg = SyncNetConfig(
            steps=steps, batch_size=batch_size, eval_every=chunk, checkpoint_every=chunk, log_every=10,
            eval_at_start=True, eval_clips=None, eval_windows_per_clip=16, num_to_keep=2,
            windows=WindowConfig(windows_per_clip=32), threads_per_worker=THREADS,
        )  # fmt: skip
        result = run(cfg, data, out)
        val = result["metrics"].get("val_loss", 1.0)
        print(f"syncnet step {steps}: val BCE {val:.4f} ({(time.perf_counter() - started) / 60:.1f} min)")
        if val < 0.5:
            break
    curve = history(result, "val_loss")
    return {
        "steps": result["step"],
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "val_loss_curve": curve,
        "val_loss_first": curve[0][1],
        "val_loss_last": curve[-1][1],
        "val_accuracy_last": result["metrics"].get("val_accuracy"),
        "checkpoint": result["checkpoint"],
    }


def clip_offset_scores(model: Any, row: dict[str, Any], stride: int = 2) -> np.ndarray:
    """Mean in-sync probability of the clip's windows for each mel shift in SHIFTS."""
    import torch

    from models.frames import sync_faces, to_model_frames
    from models.syncnet import sync_probability
    from pipeline.audio import mel_window
    from pipeline.shards import decode_crops, decode_mel
    from training.data import valid_starts

    frames = to_model_frames(decode_crops(row), model.img_size)
    mel = decode_mel(row)
    starts = valid_starts(int(row["n_frames"]), int(row["mel_frames"]))
    starts = starts[(starts >= 5) & (starts <= starts.max() - 5)][::stride]
    faces = torch.from_numpy(np.stack([sync_faces(frames[s : s + 5]) for s in starts])).float() / 255
    scores = []
    with torch.no_grad():
        for k in SHIFTS:
            mels = np.stack([mel_window(mel, s + k)[None] for s in starts])
            audio, face = model(torch.from_numpy(mels), faces)
            scores.append(float(sync_probability(audio, face).mean()))
    return np.array(scores)


def rank_offsets(data: str, checkpoint: str) -> dict[str, Any]:
    """For each val clip: the shift with the highest mean sync probability vs its true offset."""
    import pandas as pd
    import pyarrow.parquet as pq

    from core.storage import join_uri
    from models.checkpoint import load_model
    from training.data import SHARD_COLUMNS

    model = load_model(checkpoint, "syncnet").model
    clips = pd.read_parquet(f"{data}/clips.parquet")
    val = clips[clips["split"] == "val"]
    rows = []
    for _, clip in val.iterrows():
        table = pq.read_table(join_uri(data, clip["shard"]), columns=SHARD_COLUMNS)
        row = next(r for r in table.to_pylist() if r["clip_id"] == clip["clip_id"])
        scores = clip_offset_scores(model, row)
        best = list(SHIFTS)[int(scores.argmax())]
        truth = 0  # synth clips are generated in sync (their injected offset is 0)
        rows.append(
            {"clip_id": clip["clip_id"], "best_shift": best, "true_shift": truth, "scores": scores.tolist()}
        )
    top1 = sum(r["best_shift"] == r["true_shift"] for r in rows)
    return {
        "clips": len(rows),
        "true_offset_first": top1,
        "fraction": top1 / max(1, len(rows)),
        "per_clip": rows,
    }


def overfit_generator(data: str, out: str, expert: str, steps: int, lr: float) -> dict[str, Any]:
    """The generator alone (no GAN) on one clip's 2 windows (batch 2) for `steps` steps; L1 first vs last.
    A CPU step of the generator costs ~2 s per image pass, so the set is kept to what overfits in minutes."""
    import pandas as pd

    from training.data import DataSelection, WindowConfig
    from training.wav2lip_job import Wav2LipConfig, run

    clips = pd.read_parquet(f"{data}/clips.parquet")
    one_clip = clips[clips["split"] == "train"].sort_values("clip_id").iloc[0]
    cfg = Wav2LipConfig(
        steps=steps, batch_size=2, lr=lr, gan=False, log_every=5, checkpoint_every=steps, eval_clips=0,
        shuffle_buffer=0, threads_per_worker=THREADS,
        data=DataSelection(clip_ids=(one_clip["clip_id"],)), windows=WindowConfig(windows_per_clip=2, passes=1),
    )  # fmt: skip
    started = time.perf_counter()
    result = run(cfg, data, out, syncnet=expert)
    curve = history(result, "train_l1")
    return {
        "clip_id": one_clip["clip_id"],
        "steps": result["step"],
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "l1_curve": curve,
        "l1_first": curve[0][1],
        "l1_last": curve[-1][1],
        "l1_ratio": curve[0][1] / curve[-1][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="SyncNet time budget")
    parser.add_argument("--speakers", type=int, default=4, help="synth speakers per language")
    parser.add_argument("--clips-per-speaker", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=50, help="SyncNet steps between evaluations")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generator-steps", type=int, default=80)
    parser.add_argument("--generator-lr", type=float, default=1e-3, help="overfitting, not the recipe's 1e-4")
    parser.add_argument("--out", help="keep checkpoints here (default: a temporary directory)")
    args = parser.parse_args()

    from core.ray import ensure_ray

    data = corpus(args.speakers, args.clips_per_speaker)
    # As `lipsync train` does (the workers' allocator); nothing to do if preprocessing the corpus started it
    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        syncnet = train_syncnet(data, str(out / "syncnet"), args.minutes, args.chunk, args.batch_size)
        print(f"SyncNet val BCE {syncnet['val_loss_first']:.3f} -> {syncnet['val_loss_last']:.3f} "
              f"in {syncnet['steps']} steps, {syncnet['minutes']} min (target < 0.5 within 15 min)")  # fmt: skip
        ranking = rank_offsets(data, syncnet["checkpoint"])
        print(
            f"true offset ranked first among -5..5 for {ranking['true_offset_first']}/{ranking['clips']} val clips"
        )
        generator = overfit_generator(
            data, str(out / "wav2lip"), syncnet["checkpoint"], args.generator_steps, args.generator_lr
        )
        print(f"generator L1 {generator['l1_first']:.4f} -> {generator['l1_last']:.4f} "
              f"({generator['l1_ratio']:.1f}x, target >= 5x) in {generator['steps']} steps")  # fmt: skip
    result = {
        "corpus": data,
        "syncnet": syncnet,
        "offset_ranking": ranking,
        "generator_overfit": generator,
        "targets": {
            "val_loss_last": "< 0.5 within 15 min",
            "offset_ranking": "most clips",
            "l1_ratio": ">= 5",
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_syncnet_learning.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Does the demo-sized generator's mouth follow the audio, and what makes it? In-process, no Ray.

The generator paints the masked lower half from the audio and a reference window of another moment, so on
val windows (the speaker's own audio) its mouth can only open when the truth's does if it uses the audio.
Per generated frame: the share of dark pixels in the mouth box of the lower half (synth mouths are dark
inside) against the same on the true frame; Pearson r over all val frames. The do-nothing figure is the
reference window's mouth against the truth (what copying the reference gives). And what the demo is judged on:
on the demo's new-speech pairs (val faces, new espeak-ng speech in a voice the corpus lacks, generated with the
same-frame reference as `lipsync generate` does), r of the generated mouth's darkness against the openness the
new speech's phoneme timeline gives each frame (`r_new_speech`, per language).

Variants (all the demo's generator recipe, --steps steps, batch 4, width 0.25, on the demo's synth corpus):
`gate` (the reference's: sync loss at 0.01 once the expert's val loss on generated frames is < 0.75),
`sync0.1` and `sync0.3` (the expert's sync loss at that weight from step 0). The expert is the demo's SyncNet
recipe trained in-process for --expert-steps (the demo's 250 and a stronger one, by default 250 and 600).
Writes benchmarks/results/generator_sync.json. Usage: python benchmarks/generator_sync.py [--seeds 0]
[--expert-steps 250 600] [--steps 750] [--every 150] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"gate": None, "sync0.1": 0.1, "sync0.3": 0.3}
MOUTH_BOX = (slice(56, 82), slice(30, 66))  # rows, columns of a 96-px crop: where synth mouths open and close


def darkness(frames: np.ndarray) -> np.ndarray:
    """(B, 3, T, H, W) float frames in [0, 1] → (B·T,) share of dark pixels in the mouth box."""
    box = frames[:, :, :, MOUTH_BOX[0], MOUTH_BOX[1]].mean(axis=1)
    return (box < 0.3).mean(axis=(2, 3)).reshape(-1)


def mouth_r(recipe: Any, batches: list[dict]) -> dict[str, float]:
    """r(generated mouth, true mouth) and r(reference mouth, true mouth) over the val frames."""
    import torch

    from training.devices import images

    gen, truth, ref = [], [], []
    with torch.no_grad():
        for b in batches:
            g = recipe.gen.eval()(b["indiv_mels"], images(b["x"], recipe.device))
            gen.append(darkness(g.float().numpy()))
            truth.append(darkness(images(b["y"], recipe.device).numpy()))
            ref.append(darkness(images(b["x"][:, 3:], recipe.device).numpy()))
    g, t, r = (np.concatenate(v) for v in (gen, truth, ref))
    return {"r_generated": float(np.corrcoef(g, t)[0, 1]), "r_reference": float(np.corrcoef(r, t)[0, 1])}


def new_speech_sets(data: Path) -> list[dict[str, Any]]:
    """The demo's new-speech pairs on this corpus (a val face per language, new espeak-ng speech in a voice the
    corpus lacks), cut as generation cuts them, with the openness the speech's phoneme timeline gives each frame
    (what a mouth following that speech does: the synth corpus's own mouths are drawn from it)."""
    import pandas as pd
    from augmentation import demo_config

    from lipsync.demo import NEW_SPEECH_VOICE, new_speech_pairs
    from pipeline.audio import SAMPLE_RATE, mel_windows, melspectrogram
    from pipeline.crops import crop_boxes, crop_faces
    from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
    from pipeline.media import read_audio, read_frames
    from pipeline.phonemes import MOUTH_LEAD_MS, openness_per_frame, synthesize

    demo = demo_config()
    pairs = new_speech_pairs(data.parent / "corpus", data / "clips.parquet", data.parent / "new_speech", demo)
    sets = []
    with FaceMeshTracker() as tracker:
        for pair in pd.read_csv(pairs).itertuples():
            frames = read_frames(pair.video, 25.0)
            track = tracker.track(frames)
            crops = crop_faces(
                frames, crop_boxes(smooth_landmarks(track.landmarks, track.found), frames.shape)
            )
            pcm = read_audio(pair.audio)
            n = min(len(frames), int(len(pcm) / SAMPLE_RATE * 25))
            speech = synthesize(pair.transcript, pair.language, NEW_SPEECH_VOICE)
            expected = openness_per_frame(speech.phonemes, n, 25.0, shift_ms=-MOUTH_LEAD_MS)
            mels = mel_windows(melspectrogram(pcm), n, 25.0).astype(np.float32)
            sets.append({"language": pair.language, "crops": crops[:n], "mels": mels, "expected": expected})
    return sets


def new_speech_r(gen: Any, sets: list[dict[str, Any]]) -> dict[str, float]:
    """Per language, r(generated mouth darkness, timeline openness) over the new speech (edges cut by 2
    frames), generated as `lipsync generate` does (same-frame reference)."""
    from generation.infer import generate_crops

    out = {}
    for s in sets:
        made = generate_crops(gen.eval(), s["crops"], s["mels"], 16)
        mouth = darkness(made.transpose(0, 3, 1, 2)[:, :, None].astype(np.float32) / 255.0)
        out[s["language"]] = float(np.corrcoef(mouth[2:-2], s["expected"][2:-2])[0, 1])
    gen.train()
    return out


def one_run(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    from augmentation import demo_config, rows

    from training.streams import BatchStream, val_batches
    from training.wav2lip_job import Wav2LipRecipe

    torch.set_num_threads(1)
    demo = demo_config()
    cfg = dataclasses.replace(demo.wav2lip, seed=args["seed"], steps=args["steps"])
    recipe = Wav2LipRecipe(cfg, torch.device("cpu"), expert=args["expert"])
    weight = VARIANTS[args["variant"]]
    if weight is not None:
        cfg = dataclasses.replace(cfg, sync_weight=weight, sync_threshold=float("inf"))
        recipe.cfg, recipe.train_state["sync_weight"] = cfg, weight
    stream = BatchStream(rows(Path(args["data"]), "train", cfg), cfg, "wav2lip")
    val = val_batches(
        rows(Path(args["data"]), "val", cfg), dataclasses.replace(cfg, eval_windows_per_clip=16), "wav2lip"
    )
    sets = new_speech_sets(Path(args["data"]))
    curve, started = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        recipe.step(next(stream))
        if step % args["every"] == 0 or step == cfg.steps:
            metrics = recipe.evaluate(val)
            point = {
                "step": step,
                "val_l1": metrics["val_l1"],
                "val_sync": metrics["val_sync"],
                **mouth_r(recipe, val),
                "r_new_speech": new_speech_r(recipe.gen, sets),
            }
            curve.append(point | {"sync_weight": recipe.train_state["sync_weight"]})
    out = {k: args[k] for k in ("seed", "variant", "expert_steps")} | {
        "train_s": round(time.perf_counter() - started, 1),
        "curve": curve,
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--expert-steps", type=int, nargs="+", default=[250, 600])
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--every", type=int, default=150, help="evaluate every this many steps")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()

    from augmentation import cached_expert, demo_config, demo_corpus

    demo = demo_config()
    data = demo_corpus(demo)
    experts = {n: cached_expert(demo, data, n) for n in args.expert_steps}
    jobs = [
        {
            "seed": s,
            "variant": v,
            "steps": args.steps,
            "every": args.every,
            "expert": experts[n],
            "expert_steps": n,
            "data": str(data),
        }
        for n in args.expert_steps
        for v in args.variants
        for s in args.seeds
    ]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_run, jobs))
    for r in runs:
        last = r["curve"][-1]
        print(
            f"expert {r['expert_steps']:4d} {r['variant']:8s} seed {r['seed']}: r generated {last['r_generated']:.3f} "
            f"(reference {last['r_reference']:.3f}), val_sync {last['val_sync']:.3f}, val_l1 {last['val_l1']:.4f}, "
            f"new speech r {', '.join(f'{k} {v:.2f}' for k, v in last['r_new_speech'].items())}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generator_sync.json").write_text(json.dumps({"runs": runs, "args": vars(args)}, indent=1))
    print(f"wrote {RESULTS / 'generator_sync.json'}")


if __name__ == "__main__":
    main()

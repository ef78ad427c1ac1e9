"""What one evaluation of the expert's offset ranking costs, before and after embedding each clip's faces once.

At every evaluation the SyncNet job ranks the true offset among the 11 mel shifts of ±5 frames on each val
clip (`training.expert_health`): 48 windows per clip, each scored at every shift. The faces are the same at
every shift, so their embedding can be computed once per clip; before, the whole network ran once per shift.
This times both ways on the same windows, with the demo's network (96 px, width 0.25; random weights, since
the cost does not depend on them), checks they give the same scores, and prints the seconds per evaluation
and their ratio. The demo evaluates 18 val clips every 50 of its 400 steps (8 evaluations).
Usage: python benchmarks/expert_ranking.py [--clips 18] [--width 0.25] [--threads 2]
Writes benchmarks/results/expert_ranking.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def per_shift_forward(model: Any, inputs: Any) -> list[float]:
    """The earlier way: the whole network (faces and audio) at every shift."""
    import torch

    from models.syncnet import sync_probability

    faces, mels = inputs
    with torch.no_grad():
        return [float(sync_probability(*model(m, faces)).mean()) for m in mels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=18)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from models.registry import build_model
    from training.expert_health import RANK_WINDOWS, SHIFTS, clip_shift_scores

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model("syncnet", 96, args.width).eval()
    rng = np.random.default_rng(0)
    clips = [
        (
            torch.from_numpy(rng.random((RANK_WINDOWS, 15, 48, 96), dtype=np.float32)),
            [
                torch.from_numpy(rng.standard_normal((RANK_WINDOWS, 1, 80, 16), dtype=np.float32))
                for _ in SHIFTS
            ],
        )
        for _ in range(args.clips)
    ]
    began = time.perf_counter()
    before = [per_shift_forward(model, c) for c in clips]
    before_s = time.perf_counter() - began
    began = time.perf_counter()
    after = [list(clip_shift_scores(model, {}, cached=c)) for c in clips]
    after_s = time.perf_counter() - began
    diff = float(np.abs(np.array(before) - np.array(after)).max())
    result = {
        "clips": args.clips,
        "windows_per_clip": RANK_WINDOWS,
        "shifts": len(SHIFTS),
        "width": args.width,
        "threads": args.threads,
        "per_shift_forward_s": round(before_s, 3),
        "faces_embedded_once_s": round(after_s, 3),
        "speedup": round(before_s / after_s, 2),
        "max_score_difference": diff,
    }
    print(f"offset ranking of {args.clips} clips × {RANK_WINDOWS} windows × {len(SHIFTS)} shifts:")
    print(f"  whole network per shift: {before_s:.2f} s")
    print(f"  faces embedded once:     {after_s:.2f} s  ({before_s / after_s:.1f}x faster)")
    print(f"  largest score difference: {diff:.2e}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "expert_ranking.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / 'expert_ranking.json'}")
    if diff > 1e-5:
        sys.exit("the two ways disagree")


if __name__ == "__main__":
    main()

"""Expression features on the real development clips (`../shared/media`, never copied into the repo).

Tracks every video of MANIFEST.tsv with FaceMesh as scoring does (25 fps, `smooth_landmarks`), caches the
landmarks under benchmarks/results/expression_real/ (gitignored), prints per clip the smile's median
and spread, the share of each class in absolute and in relative (per-clip baseline) mode and the share of
frames left out for head turns and nods, and saves two strips: the 5 highest- and the 5 lowest-smile frames
over all clips (a mouth crop from each, labelled with clip, frame and smile), for a person to look at.
Usage: python benchmarks/expression_real.py [--media ../shared/media] [--retrack]

The strips rank frames by the product's `smile` (`pipeline.expression`: the corners' lift under the nose base,
the jaw's part removed, head turns and nods left out) less the clip's own median, so clips compare with each
other; one frame per clip in each strip.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "expression_real"
MAX_SIDE = 640  # decode big videos smaller: FaceMesh works at 192 px anyway


def videos(media: Path) -> list[Path]:
    rows = csv.DictReader((media / "MANIFEST.tsv").open(encoding="utf-8"), delimiter="\t")
    return [media / r["file"] for r in rows if r["file"].endswith(".mp4")]


def _size(path: Path) -> tuple[int, int] | None:
    from pipeline.media import probe

    info = probe(str(path))
    return (MAX_SIDE, -1) if max(info.width, info.height) > MAX_SIDE else None


def track_all(paths: list[Path], retrack: bool) -> dict[str, np.ndarray]:
    from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
    from pipeline.media import read_frames

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {}
    with FaceMeshTracker(max_faces=1) as tracker:
        for path in paths:
            cache = RESULTS / f"{path.stem}.npy"
            if retrack or not cache.exists():
                track = tracker.track(read_frames(str(path), fps=25.0, size=_size(path)), fps=25.0)
                np.save(cache, smooth_landmarks(track.landmarks, track.found))
            out[path.stem] = np.load(cache)
    return out


def _crop(frame: np.ndarray, lm: np.ndarray, label: str, side: int = 200) -> np.ndarray:
    """The lower face around the mouth, `side` px square, with `label` written on it."""
    import cv2

    iod = float(np.linalg.norm(lm[33, :2] - lm[263, :2]))
    cx, cy = lm[[61, 291, 0, 17], :2].mean(0)
    half = 0.9 * iod
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half * 0.9, 0))
    crop = frame[y0 : int(cy + half * 1.1), x0 : int(cx + half)]
    crop = cv2.resize(np.ascontiguousarray(crop), (side, side))
    cv2.putText(crop, label, (4, side - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 0), 1, cv2.LINE_AA)
    return crop


def strip(picks: list[tuple[str, int, float]], media: Path, name: str) -> Path:
    import cv2

    from pipeline.media import read_frames

    crops = []
    for stem, t, smile in picks:
        path = media / f"{stem}.mp4"
        frames = read_frames(str(path), fps=25.0, size=_size(path))
        lm = np.load(RESULTS / f"{stem}.npy")[t]
        crops.append(_crop(frames[t], lm, f"{stem[:18]} t{t} {smile:+.1f}"))
    out = RESULTS / f"{name}.png"
    cv2.imwrite(str(out), cv2.cvtColor(np.concatenate(crops, axis=1), cv2.COLOR_RGB2BGR))
    return out


def main() -> None:
    from pipeline.expression import clip_baseline, expression_classes, expression_features

    parser = argparse.ArgumentParser()
    parser.add_argument("--media", default=str(Path(__file__).resolve().parents[2] / "shared" / "media"))
    parser.add_argument("--retrack", action="store_true")
    args = parser.parse_args()
    media = Path(args.media)
    tracks = track_all(videos(media), args.retrack)
    report, pool = {}, []
    for stem, lm in tracks.items():
        features = expression_features(lm)
        base = clip_baseline(features)
        absolute = expression_classes(features)
        relative = expression_classes(features, baseline=base)
        smile = features["smile"]
        ok = np.isfinite(smile)
        report[stem] = {
            "frames": len(lm),
            "smile_median": base.smile,
            "smile_spread": base.smile_spread,
            "smile_p5_p95": [float(np.nanpercentile(smile, 5)), float(np.nanpercentile(smile, 95))],
            "turned_or_nodded_left_out": float(np.mean(~ok & np.isfinite(features["corner_lift"]))),
            "absolute": {c: float(np.mean(absolute == c)) for c in ("neutral", "smile", "frown", "surprise")},
            "relative": {c: float(np.mean(relative == c)) for c in ("neutral", "smile", "frown", "surprise")},
        }
        # relative to the clip's own baseline, so clips compare with each other
        pool += [(stem, int(t), float(smile[t] - base.smile)) for t in np.flatnonzero(ok)]
    print(json.dumps(report, indent=1))
    (RESULTS / "summary.json").write_text(json.dumps(report, indent=1))
    pool.sort(key=lambda p: p[2])
    picks_low, picks_high, seen_low, seen_high = [], [], set(), set()
    for picks, seen, order in ((picks_low, seen_low, pool), (picks_high, seen_high, pool[::-1])):
        for stem, t, value in order:  # one frame per clip and not two neighbours: five different moments
            if stem not in seen and len(picks) < 5:
                picks.append((stem, t, value))
                seen.add(stem)
    print("lowest smile:", picks_low)
    print("highest smile:", picks_high)
    print(strip(picks_high, media, "smile_highest"), strip(picks_low, media, "smile_lowest"))


if __name__ == "__main__":
    main()

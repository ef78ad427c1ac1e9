"""Shot-cut detectors on real clips joined with known events: which one preprocessing should use.

Each test video joins three real clips of ../shared/media (square-cropped, 25 fps): clip A, a hard cut
to clip B, a 10-frame cross-fade from B to clip C, and inside C a camera-flash-like brightness jump of
two frames that is no cut. A detector hits the hard cut when it reports a cut within one frame of it,
the fade when it reports one inside the fade (one frame of slack each side); every other cut it reports
is a false one (those within three frames of the flash are counted apart). Precision is the share of
reported cuts that lie on an event (several inside one fade all count), recall the share of events hit.

The same videos are also letterboxed (pillarboxed into 16:9 black frames), where bars dominate the
histograms. Each detector also runs over every shared clip whole (none has a cut), as preprocessing
decodes it.
Prints a table per detector (hits, false cuts, precision and recall over the hard cuts and fades) and
writes benchmarks/results/scene_cuts.json.
Usage: python benchmarks/scene_cuts.py [--media ../shared/media] [--side 256]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"

# (A, B, C): distinct speakers; the first pair of each is cut hard, the second cross-faded.
COMBOS = (
    ("en_hdtf_KatieHill_sadtalker", "en_hdtf_EdMarkey_sadtalker", "de_mimictalk_German_20s"),
    ("en_vrt_face2", "en_pcavs_vox2_00015", "en_dinet_test19"),
    ("en_latentsync_demo3_video", "yue_icable_news_10075_0", "en_vrt_face1"),
    ("en_pcavs_vox2_Input_00098", "und_latentsync_demo2_video", "en_hdtf_KatieHill_sadtalker"),
    ("de_mimictalk_German_20s", "en_hdtf_KatieHill_sadtalker", "en_hdtf_EdMarkey_sadtalker"),
    ("en_dinet_test19", "en_vrt_face2", "en_pcavs_vox2_Input_00098"),
)
SHOT = 60  # frames of each clip before its event
FADE = 10  # cross-fade frames
FLASH_AT, FLASH_FRAMES, FLASH_GAIN = 30, 2, 2.2  # into clip C; a flash multiplies the light


@dataclass(frozen=True)
class Events:
    """Frame indices of the known events of a joined video."""

    hard: int  # first frame of B
    fade: tuple[int, int]  # half-open: the blended frames
    flash: int  # first flashed frame


def square(frames: np.ndarray, side: int) -> np.ndarray:
    """Centre square crop, resized to side x side."""
    h, w = frames.shape[1:3]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.stack(
        [cv2.resize(f[y : y + s, x : x + s], (side, side), interpolation=cv2.INTER_AREA) for f in frames]
    )


def clip(media: Path, name: str, frames: int, side: int, skip: int = 10) -> np.ndarray:
    """`frames` frames of a real clip from frame `skip` on, at 25 fps, square."""
    from pipeline.media import read_frames

    decoded = read_frames(media / f"{name}.mp4", fps=25.0)
    return square(decoded[skip : skip + frames], side)


def joined(media: Path, names: tuple[str, str, str], side: int) -> tuple[np.ndarray, Events]:
    """A | hard cut | B | 10-frame cross-fade | C with a 2-frame flash, and where the events are."""
    a = clip(media, names[0], SHOT, side)
    b = clip(media, names[1], SHOT + FADE, side)
    c = clip(media, names[2], SHOT + FADE, side)
    weights = (np.arange(1, FADE + 1) / (FADE + 1))[:, None, None, None]
    fade = (b[SHOT:] * (1 - weights) + c[:FADE] * weights).round().astype(np.uint8)
    c = c[FADE:].copy()
    flashed = c[FLASH_AT : FLASH_AT + FLASH_FRAMES].astype(np.float32) * FLASH_GAIN + 40
    c[FLASH_AT : FLASH_AT + FLASH_FRAMES] = np.clip(flashed, 0, 255).astype(np.uint8)
    video = np.concatenate([a, b[:SHOT], fade, c])
    start_c = 2 * SHOT + FADE
    return video, Events(hard=SHOT, fade=(2 * SHOT, 2 * SHOT + FADE), flash=start_c + FLASH_AT)


def judge(cuts: list[int], events: Events) -> dict[str, int]:
    """Hits and false cuts of one detector on one video."""
    hard = any(abs(c - events.hard) <= 1 for c in cuts)
    lo, hi = events.fade
    fade = any(lo - 1 <= c <= hi + 1 for c in cuts)
    near_flash = [c for c in cuts if abs(c - events.flash) <= 3 + FLASH_FRAMES]
    matched = [c for c in cuts if abs(c - events.hard) <= 1 or lo - 1 <= c <= hi + 1]
    return {
        "hard": int(hard),
        "fade": int(fade),
        "flash_false": len(near_flash),
        "other_false": len(cuts) - len(matched) - len(near_flash),
        "extra_in_events": len(matched) - int(hard) - int(fade),
    }


def thumbnail_histogram_cuts(frames: np.ndarray, threshold: float = 0.3) -> list[int]:
    """The detector preprocessing used before PySceneDetect (pipeline/landmarks.py until issue 25): half
    the L1 distance of grey histograms (16 bins) of the four quadrants of 64x64 thumbnails, averaged."""
    thumbs = np.stack(
        [
            cv2.cvtColor(cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
            for f in frames
        ]
    )
    blocks = thumbs.reshape(len(frames), 2, 32, 2, 32).swapaxes(2, 3).reshape(len(frames), 4, -1)
    hists = np.stack([np.stack([np.bincount(b // 16, minlength=16) for b in t]) for t in blocks]) / 1024
    scores = np.zeros(len(frames))
    scores[1:] = 0.5 * np.abs(np.diff(hists, axis=0)).sum(-1).mean(-1)
    return np.flatnonzero(scores > threshold).tolist()


def detectors() -> dict[str, Callable[[np.ndarray], list[int]]]:
    """The former detector, PySceneDetect's with their defaults, and the one preprocessing uses."""
    from scenedetect.detectors import AdaptiveDetector, ContentDetector, HashDetector, HistogramDetector

    from pipeline.landmarks import scene_cuts

    def pyscenedetect(make: Callable[[], object]) -> Callable[[np.ndarray], list[int]]:
        def run(frames: np.ndarray) -> list[int]:
            detector = make()
            cuts: list[int] = []
            for i, frame in enumerate(frames):
                cuts.extend(
                    t - 1 for t in detector.process_frame(i + 1, np.ascontiguousarray(frame[..., ::-1]))
                )
            return sorted(set(cuts))

        return run

    return {
        "thumbnail histograms 0.3 (before)": thumbnail_histogram_cuts,
        "ContentDetector 27": pyscenedetect(lambda: ContentDetector()),
        "AdaptiveDetector 3": pyscenedetect(lambda: AdaptiveDetector()),
        "HistogramDetector 0.05": pyscenedetect(lambda: HistogramDetector()),
        "HashDetector 0.395": pyscenedetect(lambda: HashDetector()),
        "scene_cuts: Histogram 0.15 | Content 27, 128 px, flashes dropped": scene_cuts,
    }


def whole_clips(media: Path) -> list[np.ndarray]:
    """Every shared clip whole, as preprocessing decodes it (25 fps, at most 720 on the longer side)."""
    from pipeline.media import probe, read_frames

    out = []
    for path in sorted(media.glob("*.mp4")):
        info = probe(path)
        scale = min(1.0, 720 / max(info.width, info.height))
        size = (round(info.width * scale) // 2 * 2, round(info.height * scale) // 2 * 2)
        out.append(read_frames(path, fps=25.0, size=size))
    return out


def letterboxed(frames: np.ndarray) -> np.ndarray:
    """The square frames pillarboxed into a 16:9 black frame (44 % of it bars), as 4:3 or square footage
    shown on a wide screen."""
    n, side = frames.shape[:2]
    width = side * 16 // 9 // 2 * 2
    out = np.zeros((n, side, width, 3), np.uint8)
    left = (width - side) // 2
    out[:, :, left : left + side] = frames
    return out


def compare(
    media: Path, side: int, clips: list[np.ndarray], boxed: bool = False
) -> dict[str, dict[str, float]]:
    """Totals per detector over every joined video (letterboxed with `boxed`), and its cuts in `clips`
    (the shared clips, which have none)."""
    videos = [joined(media, names, side) for names in COMBOS]
    if boxed:
        videos = [(letterboxed(frames), events) for frames, events in videos]
    table: dict[str, dict[str, float]] = {}
    for name, detect in detectors().items():
        totals = {"hard": 0, "fade": 0, "flash_false": 0, "other_false": 0, "extra_in_events": 0}
        for frames, events in videos:
            for key, value in judge(detect(frames), events).items():
                totals[key] += value
        on_events = totals["hard"] + totals["fade"] + totals["extra_in_events"]
        reported = on_events + totals["flash_false"] + totals["other_false"]
        table[name] = {
            **totals,
            "videos": len(videos),
            "cuts_in_uncut_clips": sum(len(detect(frames)) for frames in clips),
            "uncut_clips": len(clips),
            "precision": round(on_events / reported, 3) if reported else 0.0,
            "recall": round((totals["hard"] + totals["fade"]) / (2 * len(videos)), 3),
        }
    return table


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(title)
    print(
        f"{'detector':66} hard  fade  cuts-in-fade  flash-false  other-false  precision  recall  uncut-clips"
    )
    for name, row in table.items():
        n = row["videos"]
        print(
            f"{name:66} {row['hard']}/{n}   {row['fade']}/{n}   {row['fade'] + row['extra_in_events']:>7}"
            f"       {row['flash_false']:>5}        {row['other_false']:>5}        {row['precision']:.3f}"
            f"      {row['recall']:.3f}   {row['cuts_in_uncut_clips']} cuts in {row['uncut_clips']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=MEDIA)
    parser.add_argument("--side", type=int, default=256, help="square frame side the videos are made at")
    args = parser.parse_args()
    clips = whole_clips(args.media)
    tables = {
        "joined": compare(args.media, args.side, clips),
        "letterboxed": compare(args.media, args.side, clips, boxed=True),
    }
    print_table("real clips joined (square frames)", tables["joined"])
    print_table("the same, letterboxed to 16:9", tables["letterboxed"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scene_cuts.json").write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()

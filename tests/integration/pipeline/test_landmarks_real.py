"""Face tracking, smoothing, openness and segmentation with the real MediaPipe FaceMesh (no mocks)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from support.landmarks import cross_fade, flash

from pipeline.landmarks import (
    mouth_openness,
    scene_cuts,
)


def decode(path: Path, n: int = 50) -> np.ndarray:
    """First n RGB frames of a video via a tiny ffmpeg call."""
    w, h = (
        subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height"]
            + ["-of", "csv=p=0", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(",")[:2]
    )
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", str(n)]
        + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, int(h), int(w), 3)


def shared_videos(media: Path) -> list[Path]:
    with open(media / "MANIFEST.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [media / r["file"] for r in rows if r["file"].endswith(".mp4") and (media / r["file"]).is_file()]


@pytest.mark.media
def test_real_clips_mostly_tracked(tracker, shared_media):
    videos = shared_videos(shared_media)
    assert videos
    for path in videos:
        frames = decode(path)
        track = tracker.track(frames)
        assert track.found_fraction >= 0.9, path.name
        assert track.multi_face_fraction <= 0.1, path.name
        assert scene_cuts(frames) == [], path.name
        openness = mouth_openness(track.landmarks[track.found])
        assert np.nanmax(openness) > np.nanmin(openness) + 0.02, path.name  # the mouth moves


def joined_real_clips(media: Path) -> tuple[np.ndarray, int, tuple[int, int], int]:
    """Three real clips: A | hard cut | B | 10-frame cross-fade | C, with a 2-frame flash inside C.

    Returns the frames (256x256), the hard cut's frame, the fade's blended frames (half-open) and the
    first flashed frame.
    """

    def square(name: str) -> np.ndarray:
        frames = decode(media / name, n=60)
        h, w = frames.shape[1:3]
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        return np.stack([cv2.resize(f[y : y + s, x : x + s], (256, 256)) for f in frames])

    a = square("en_hdtf_KatieHill_sadtalker.mp4")[:40]
    b = square("en_hdtf_EdMarkey_sadtalker.mp4")[:40]
    c = square("de_mimictalk_German_20s.mp4")[:50]
    c[25:27] = flash(c[25:27])
    video = np.concatenate([a, b, cross_fade(b[-1], c[0], 10), c])
    return video, 40, (80, 90), 90 + 25


@pytest.mark.media
def test_scene_cuts_on_real_clips_joined_by_a_cut_a_fade_and_a_flash(shared_media):
    video, hard, (fade_start, fade_end), _ = joined_real_clips(shared_media)
    cuts = scene_cuts(video)
    in_fade = [c for c in cuts if fade_start <= c <= fade_end]
    assert hard in cuts and in_fade, cuts
    assert set(cuts) == {hard, *in_fade}, cuts  # nothing at the flash, nothing anywhere else
    boxed = np.zeros((len(video), 256, 456, 3), np.uint8)  # pillarboxed: 44 % black bars
    boxed[:, :, 100:356] = video
    assert hard in scene_cuts(boxed) and set(scene_cuts(boxed)) <= {hard, *range(fade_start, fade_end + 1)}

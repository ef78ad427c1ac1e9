"""Face tracking, smoothing, openness and segmentation with the real MediaPipe FaceMesh (no mocks)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data
from support.faces import moving_clip
from support.landmarks import cross_fade, flash

from core.errors import BadInput
from pipeline.landmarks import (
    LIP_GAP_POINTS,
    UPPER_FACE_POINTS,
    FaceMeshTracker,
    FaceTrack,
    fill_gaps,
    inter_ocular,
    mouth_openness,
    scene_cuts,
    select_face,
    smooth_landmarks,
    split_segments,
)

STEP = (3, 1.5)  # px per frame the astronaut moves in the synthetic clip


LOWER_LIP = (14, 87, 178, 88, 95, 317, 402, 318, 324, 17, 84, 181, 91, 146, 314, 405, 321, 375)


def astronaut_head() -> np.ndarray:
    """300x300 head-and-shoulders crop of skimage's astronaut (face ~95 px wide)."""
    return data.astronaut()[0:300, 80:380]


@pytest.fixture(scope="module")
def moving(tracker):
    frames = moving_clip()
    return frames, tracker.track(frames)


def test_moving_astronaut_tracked_on_every_frame(moving):
    frames, track = moving
    assert track.landmarks.shape == (20, 468, 3) and track.landmarks.dtype == np.float32
    assert track.found.all() and track.found_fraction == 1.0
    assert (track.n_faces == 1).all() and not track.second_face.any() and not track.switched.any()
    assert track.multi_face_fraction == 0.0
    # pixel coordinates: the face sits in the astronaut's face region and follows the motion
    nose = track.landmarks[:, 1, :2]
    assert np.all((nose[0] > [210, 110]) & (nose[0] < [320, 230]))
    np.testing.assert_allclose(np.diff(nose, axis=0).mean(0), STEP, atol=0.5)
    assert np.all((track.face_size > 80) & (track.face_size < 110))


def test_each_track_call_starts_fresh(tracker, moving):
    frames, track = moving
    again = tracker.track(frames)
    np.testing.assert_array_equal(again.landmarks, track.landmarks)


def test_tracking_in_chunks_with_resume_equals_tracking_whole(tracker, moving):
    frames, whole = moving
    pieces = [
        tracker.track(frames[:7]),
        tracker.track(frames[7:14], resume=True),
        tracker.track(frames[14:], resume=True),
    ]
    joined = FaceTrack.concatenate(pieces)
    np.testing.assert_array_equal(joined.landmarks, whole.landmarks)
    for name in ("found", "n_faces", "second_face", "switched", "face_size"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))


def test_a_switch_at_a_chunk_boundary_is_seen_with_resume(tracker):
    head = astronaut_head()
    frames = np.zeros((6, 300, 700, 3), np.uint8)
    frames[:3, :, :300] = head
    frames[3:, :, 400:] = head
    tracker.track(frames[:3])
    assert tracker.track(frames[3:], resume=True).switched.tolist() == [True, False, False]
    tracker.track(frames[:3])
    assert not tracker.track(frames[3:]).switched.any()  # a fresh call knows no earlier box


def test_landmark_stage_windows_from_chunks_of_another_size(tracker):
    from pipeline.preprocess_config import PreprocessConfig
    from pipeline.stages import LandmarkStage

    frames = moving_clip(24)
    stage = LandmarkStage(PreprocessConfig(segment_seconds=0.4))  # 10-frame windows at 25 fps
    spans = []
    for start, got, track, _ in stage.windows(iter([frames[i : i + 7] for i in range(0, 24, 7)])):
        spans.append((start, len(got)))  # frames are valid until the next window is asked for
        np.testing.assert_array_equal(got, frames[start : start + len(got)])
        np.testing.assert_array_equal(track.landmarks, tracker.track(got).landmarks)
    assert spans == [(0, 10), (10, 10), (20, 4)]


def test_blank_frames_give_nan_and_not_found(tracker):
    frames = moving_clip(8)
    frames[3:6] = 0
    track = tracker.track(frames)
    assert track.found.tolist() == [True] * 3 + [False] * 3 + [True] * 2
    assert np.isnan(track.landmarks[3:6]).all() and np.isnan(track.face_size[3:6]).all()
    assert (track.n_faces[3:6] == 0).all()
    empty = tracker.track(np.zeros((4, 240, 320, 3), np.uint8))
    assert not empty.found.any() and empty.found_fraction == 0.0 and np.isnan(empty.landmarks).all()


def test_two_faces_keep_the_existing_track(tracker):
    """A larger second face appears at frame 3: n_faces/second_face flag it, the track stays put."""
    head = astronaut_head()
    frames = np.zeros((6, 400, 760, 3), np.uint8)
    frames[:, 50:350, 0:300] = head
    frames[3:, 0:400, 340:740] = cv2.resize(head, (400, 400))
    track = tracker.track(frames)
    assert track.n_faces.tolist() == [1, 1, 1, 2, 2, 2]
    assert track.second_face.tolist() == [False] * 3 + [True] * 3
    assert np.all(track.landmarks[:, 1, 0] < 300) and not track.switched.any()
    assert track.multi_face_fraction == pytest.approx(0.5)
    # starting on the two-face frames, the larger (right) face is chosen
    assert np.all(tracker.track(frames[3:]).landmarks[:, 1, 0] > 340)


def test_jump_to_another_face_is_a_switch(tracker):
    head = astronaut_head()
    frames = np.zeros((6, 300, 700, 3), np.uint8)
    frames[:3, :, :300] = head
    frames[3:, :, 400:] = head
    track = tracker.track(frames)
    assert track.found.all() and track.switched.tolist() == [False, False, False, True, False, False]
    assert split_segments(track.found, np.flatnonzero(track.switched), 100, 1) == [(0, 3), (3, 6)]


def test_side_by_side_double_image(tracker):
    head = astronaut_head()
    frames = np.repeat(np.concatenate([head, head], axis=1)[None], 3, axis=0)
    track = tracker.track(frames)
    assert (track.n_faces == 2).all() and track.second_face.all() and track.found.all()


def square_face(x: float, side: float) -> np.ndarray:
    pts = np.zeros((468, 3), np.float32)
    pts[:, 0] = x
    pts[1, :2] = (x + side, side)
    return pts


def test_select_face_rules():
    big, quarter, half = square_face(0, 100), square_face(300, 50), square_face(500, 75)
    assert select_face([quarter, big], None) == (1, False)  # largest; area 0.25x is not a second face
    assert select_face([half, big], None) == (1, True)  # 0.56x is
    # overlapping the previous box continues the track even when smaller
    assert select_face([big, quarter], np.array([295.0, 0.0, 345.0, 50.0]))[0] == 1


def test_scene_cut_between_different_pictures():
    clip = moving_clip(5)
    coffee = np.zeros_like(clip[:4])
    coffee[:, :400, :600] = data.coffee()
    assert scene_cuts(clip) == []
    assert scene_cuts(np.concatenate([clip, coffee])) == [5]
    assert scene_cuts(np.concatenate([clip[:1], coffee])) == [1]  # a window's second frame may start a shot
    astronaut, coffee = full_frame(data.astronaut(), clip), full_frame(data.coffee(), clip)
    histogram_only = {"content_threshold": 256.0}  # no mean pixel change exceeds 255
    assert scene_cuts(np.stack([astronaut, coffee, coffee]), **histogram_only) == [1]


def full_frame(picture: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`picture` resized to fill frames shaped like `like`'s."""
    return cv2.resize(picture, (like.shape[2], like.shape[1]), interpolation=cv2.INTER_AREA)


def test_scene_cuts_find_a_fade_and_ignore_a_flash_on_generated_frames():
    clip = moving_clip(30)
    lit = clip.copy()
    lit[12:14] = flash(lit[12:14])  # two flashed frames, then the same shot
    assert scene_cuts(lit) == []
    astronaut, coffee = full_frame(data.astronaut(), clip), full_frame(data.coffee(), clip)
    faded = np.stack([astronaut] * 10 + list(cross_fade(astronaut, coffee, 10)) + [coffee] * 10)
    cuts = scene_cuts(faded)
    assert cuts and all(10 <= c <= 20 for c in cuts), cuts  # inside the fade, nowhere else


def test_mouth_openness_is_scale_invariant(tracker):
    head = astronaut_head()
    values = []
    iod = []
    for scale in (1.0, 1.5):
        img = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        canvas = np.zeros((int(400 * scale), int(400 * scale), 3), np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        lm = tracker.track(np.repeat(canvas[None], 3, axis=0)).landmarks
        values.append(np.median(mouth_openness(lm)))
        iod.append(np.median(inter_ocular(lm)))
    assert iod[1] / iod[0] == pytest.approx(1.5, rel=0.03)
    assert values[1] == pytest.approx(values[0], rel=0.08)
    assert 0.0 < values[0] < 0.5


def test_mouth_openness_shapes_and_indices():
    lm = np.zeros((468, 3), np.float32)
    lm[33, 0], lm[263, 0] = 0, 100
    lm[LIP_GAP_POINTS[1], 1] = 20
    assert float(mouth_openness(lm)) == pytest.approx(0.2)
    assert np.isnan(mouth_openness(np.full((2, 468, 3), np.nan))).all()
    assert 33 in UPPER_FACE_POINTS and 13 not in UPPER_FACE_POINTS and len(UPPER_FACE_POINTS) == 52


def bump_sequence(base: np.ndarray, n: int = 60, peak: int = 30) -> np.ndarray:
    """Real landmarks moving steadily, with the lower lip dropping 8 px in a ~4 Hz bump at ``peak``."""
    t = np.arange(n, dtype=np.float32)
    seq = base[None] + (t[:, None] * np.array([*STEP, 0], np.float32))[:, None, :]
    bump = 8.0 * np.exp(-0.5 * ((t - peak) / 1.5) ** 2)
    seq[:, list(LOWER_LIP), 1] += bump[:, None]
    return seq


def jitter(seq: np.ndarray) -> float:
    """Mean absolute frame-to-frame acceleration (steady motion contributes nothing)."""
    return float(np.nanmean(np.abs(np.diff(seq[..., :2], n=2, axis=0))))


def test_smoothing_lowers_jitter_and_keeps_the_mouth_peak(moving):
    clean = bump_sequence(moving[1].landmarks[0])
    open_clean = mouth_openness(clean)
    assert int(np.argmax(open_clean)) == 30
    found = np.ones(len(clean), bool)
    peaks = []
    for seed in range(5):  # noise of 0.7 px on every point, several draws
        noisy = clean + np.random.default_rng(seed).normal(0, 0.7, clean.shape).astype(np.float32)
        smoothed = smooth_landmarks(noisy, found)
        assert smoothed.shape == noisy.shape and smoothed.dtype == np.float32
        assert jitter(smoothed) < 0.6 * jitter(noisy)
        assert np.abs(smoothed - clean).mean() < 0.8 * np.abs(noisy - clean).mean()
        open_smooth = mouth_openness(smoothed)
        assert abs(int(np.argmax(open_smooth)) - 30) <= 1  # no lag
        peaks.append(open_smooth[30])
    base = np.median(open_clean)
    assert np.mean(peaks) - base > 0.85 * (open_clean[30] - base)  # the mouth is not flattened


def test_smoothing_on_a_real_tracked_clip(moving):
    lm = moving[1].landmarks
    noisy = lm + np.random.default_rng(1).normal(0, 1.0, lm.shape).astype(np.float32)
    assert jitter(smooth_landmarks(noisy, moving[1].found)) < 0.6 * jitter(noisy)


def test_gaps_of_up_to_three_frames_are_filled():
    t = np.arange(20, dtype=np.float32)
    lm = np.repeat(t[:, None, None], 468, axis=1).repeat(3, axis=2)
    found = np.ones(20, bool)
    found[[0, 4, 5, 10, 11, 12, 13]] = False
    lm[~found] = np.nan
    filled, filled_found = fill_gaps(lm, found, max_gap=3)
    assert filled_found.tolist() == [False] + [True] * 9 + [False] * 4 + [True] * 6
    np.testing.assert_allclose(filled[4:6, 0, 0], [4, 5])
    smoothed = smooth_landmarks(lm, found)
    assert np.isnan(smoothed[[0, 10, 11, 12, 13]]).all() and np.isfinite(smoothed[1:10]).all()
    np.testing.assert_allclose(smoothed[1:10, 0, 0], t[1:10], atol=1e-4)  # a line is kept exactly
    assert np.isfinite(smooth_landmarks(lm[:2], np.array([False, True]))[1]).all()  # 1-frame run


def test_split_segments():
    found = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1], bool)
    assert split_segments(found, [], max_frames=100, min_frames=1) == [(1, 11), (13, 16), (17, 18)]
    assert split_segments(found, [], max_frames=100, min_frames=3) == [(1, 11), (13, 16)]
    assert split_segments(found, [6, 14], max_frames=100, min_frames=2) == [(1, 6), (6, 11), (14, 16)]
    assert split_segments(found, [], max_frames=4, min_frames=3) == [(1, 4), (4, 8), (8, 11), (13, 16)]
    assert split_segments(np.ones(10, bool), [0, 10], 5, 1) == [(0, 5), (5, 10)]
    assert split_segments(np.zeros(5, bool), [], 5, 1) == []
    segs = split_segments(np.ones(1000, bool), [], max_frames=300, min_frames=50)
    assert [b - a for a, b in segs] == [250] * 4


@pytest.mark.parametrize("kind", ["missing", "directory", "not_zip", "wrong_zip"])
def test_bad_model_path_is_bad_input(tmp_path, kind):
    path = tmp_path / "face_landmarker.task"
    if kind == "directory":
        path.mkdir()
    elif kind == "not_zip":
        path.write_bytes(b"not a model")
    elif kind == "wrong_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    with pytest.raises(BadInput, match="face_landmarker.task"):
        FaceMeshTracker(model_path=str(path))


def test_corrupt_task_members_are_bad_input(tmp_path):
    path = tmp_path / "face_landmarker.task"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("face_detector.tflite", b"x" * 64)
        z.writestr("face_landmarks_detector.tflite", b"y" * 64)
    with pytest.raises(BadInput, match="face_landmarker.task.*cannot load"):
        FaceMeshTracker(model_path=str(path))


def test_task_bundle_plumbing(tmp_path):
    """The Tasks (VIDEO mode) path runs end to end on a bundle made from the wheel's own models.

    The legacy 468-point model's outputs are not laid out as the Tasks graph expects, so the landmark
    values are meaningless here; only shapes, the 478 -> 468 cut and found flags are checked.
    """
    import mediapipe as mp

    modules = Path(mp.__file__).parent / "modules"
    path = tmp_path / "face_landmarker.task"
    with zipfile.ZipFile(path, "w") as z:
        z.write(modules / "face_detection" / "face_detection_short_range.tflite", "face_detector.tflite")
        z.write(modules / "face_landmark" / "face_landmark.tflite", "face_landmarks_detector.tflite")
    with FaceMeshTracker(model_path=str(path)) as tracker:
        frames = np.repeat(astronaut_head()[None], 3, axis=0)
        frames = np.concatenate([frames, np.zeros_like(frames[:1])])
        track = tracker.track(frames)
        again = tracker.track(frames)
    assert track.landmarks.shape == (4, 468, 3)
    assert track.found.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(again.found, track.found)

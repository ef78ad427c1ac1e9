"""Crop boxes, crops and paste-back, checked by re-detecting the crops with the real FaceMesh."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from support.faces import moving_clip

from pipeline.crops import (
    crop_boxes,
    crop_faces,
    crop_transform,
    landmarks_in_crop,
    paste_back_transform,
    raw_boxes,
)
from pipeline.landmarks import (
    EYE_CORNER_POINTS,
    LIP_GAP_POINTS,
    FaceMeshTracker,
    smooth_landmarks,
)

STEP = np.array([3.0, 1.5])  # px per frame the astronaut moves


@pytest.fixture(scope="module")
def tracker():
    with FaceMeshTracker() as t:
        yield t


@pytest.fixture(scope="module")
def clip(tracker):
    frames = moving_clip(16)
    track = tracker.track(frames)
    assert track.found.all()
    smoothed = smooth_landmarks(track.landmarks, track.found)
    return frames, track, smoothed, crop_boxes(smoothed, frames.shape[1:])


def test_boxes_are_square_and_stable(clip):
    frames, track, smoothed, boxes = clip
    side = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_allclose(side, boxes[:, 3] - boxes[:, 1])
    assert np.all((side > 90) & (side < 160))
    # frame-to-frame change follows the true motion closely, much closer than per-frame boxes do
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    wobble = np.abs(np.diff(centre, axis=0) - STEP).max()
    raw = raw_boxes(track.landmarks)
    raw_wobble = np.abs(np.diff((raw[:, :2] + raw[:, 2:]) / 2, axis=0) - STEP).max()
    assert wobble < 0.5 and wobble < raw_wobble
    assert np.abs(np.diff(side)).max() < 0.5


def test_crops_redetected_with_mouth_in_lower_half(tracker, clip):
    frames, _, smoothed, boxes = clip
    size = 96
    crops = crop_faces(frames, boxes, size)
    assert crops.shape == (len(frames), size, size, 3) and crops.dtype == np.uint8
    again = tracker.track(crops)
    assert again.found.all()
    lips = again.landmarks[:, list(LIP_GAP_POINTS), 1]
    assert np.all(lips > size / 2) and np.all(lips < size)
    # the crop mapping agrees with where FaceMesh finds the face in the crop
    projected = landmarks_in_crop(smoothed, boxes, size)
    assert np.abs(again.landmarks[..., :2] - projected[..., :2]).mean() < 1.5
    assert np.all(projected[:, list(LIP_GAP_POINTS), 1] > size / 2)


def test_paste_back_inverts_the_crop(clip):
    frames, _, smoothed, boxes = clip
    size = 96
    m = paste_back_transform(boxes[0], size)
    np.testing.assert_allclose(cv2.invertAffineTransform(crop_transform(boxes[0], size)), m, atol=1e-9)
    in_crop = landmarks_in_crop(smoothed[:1], boxes[:1], size)[0, :, :2]
    back = in_crop @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(back, smoothed[0, :, :2], atol=1e-3)
    crop = crop_faces(frames[:1], boxes[:1], size)[0]
    h, w = frames.shape[1:3]
    pasted = cv2.warpAffine(crop, m, (w, h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.ones((size, size), np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    inside = cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    diff = np.abs(pasted[inside].astype(int) - frames[0][inside].astype(int))
    assert inside.sum() > 0.8 * (boxes[0, 2] - boxes[0, 0]) ** 2 and diff.mean() < 8


def test_boxes_past_the_frame_are_padded():
    frame = np.full((1, 100, 100, 3), 200, np.uint8)
    box = np.array([[-50.0, -50.0, 50.0, 50.0]])
    black = crop_faces(frame, box, 64, border="black")[0]
    edge = crop_faces(frame, box, 64, border="edge")[0]
    assert (black[:28, :28] == 0).all() and (black[36:, 36:] == 200).all()
    assert (edge == 200).all()
    outside = crop_faces(frame, np.array([[500.0, 500.0, 600.0, 600.0]]), 32, border="black")[0]
    assert (outside == 0).all()
    with pytest.raises(ValueError, match="border"):
        crop_faces(frame, box, 64, border="wrap")


def test_no_face_gives_nan_box_and_black_crop(clip):
    frames, _, smoothed, _ = clip
    lm = smoothed.copy()
    lm[5:8] = np.nan
    boxes = crop_boxes(lm, frames.shape[1:])
    assert np.isnan(boxes[5:8]).all() and np.isfinite(boxes[:5]).all() and np.isfinite(boxes[8:]).all()
    crops = crop_faces(frames, boxes, 32)
    assert (crops[5:8] == 0).all() and crops[:5].any()


def test_shrinking_averages_instead_of_aliasing():
    stripes = np.zeros((1, 800, 800, 3), np.uint8)
    stripes[:, :, ::2] = 255  # 1-pixel stripes: a plain bilinear warp at 1/8 scale would alias
    crop = crop_faces(stripes, np.array([[10.0, 10.0, 778.0, 778.0]]), 96)[0].astype(float)
    assert abs(crop.mean() - 127.5) < 5 and crop.std() < 5


def test_upscaling_small_boxes():
    frame = np.zeros((1, 50, 50, 3), np.uint8)
    frame[0, 20:30, 20:30] = 255
    crop = crop_faces(frame, np.array([[15.0, 15.0, 35.0, 35.0]]), 96)[0]
    assert crop[48, 48].min() == 255 and crop[2, 2].max() == 0


def test_opening_the_mouth_does_not_move_the_upper_half(tracker):
    """The jaw drops, the eyes stay put in the crop: otherwise the unmasked upper half of a crop would tell a
    generator how open the mouth is (with chin-based boxes they moved 0.29 px per full opening here)."""
    from pipeline.face_rig import build_rig, open_mouth
    from pipeline.synth import make_speaker

    rig = build_rig(make_speaker("en", 0, seed=0).look, size=256, max_opening=0.6)
    opening = np.tile([0.0, 1.0], 6)
    track = tracker.track(np.stack([open_mouth(rig, o) for o in opening]))
    assert track.found.all()
    lm = track.landmarks
    gap = lm[:, LIP_GAP_POINTS[1], 1] - lm[:, LIP_GAP_POINTS[0], 1]
    assert gap[opening == 1].mean() - gap[opening == 0].mean() > 4  # px: the mouth really opened
    eyes = landmarks_in_crop(lm, raw_boxes(lm), 96)[:, list(EYE_CORNER_POINTS), 1].mean(axis=1)
    assert abs(eyes[opening == 1].mean() - eyes[opening == 0].mean()) < 0.15  # px in a 96 px crop


def test_a_new_crop_geometry_redoes_preprocessed_inputs(monkeypatch):
    """Resume skips inputs done with the same output hash: crops of another geometry must not count as done."""
    import pipeline.clip_preprocessor as cp
    from pipeline.preprocess_config import PreprocessConfig

    cfg = PreprocessConfig()
    before = cp.output_hash(cfg)
    assert cp.output_hash(replace(cfg, resources=replace(cfg.resources, workers=7))) == before
    monkeypatch.setattr(cp, "CROP_GEOMETRY", cp.CROP_GEOMETRY + 1)
    assert cp.output_hash(cfg) != before

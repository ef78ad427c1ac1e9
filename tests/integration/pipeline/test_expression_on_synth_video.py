"""Expression features: the synth corpus's base expressions (`lipsync synth --emotions`) read back from
FaceMesh landmarks while the jaw follows the speech, and the features' invariances."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.expression import (
    EMOTION_CLASS,
    FEATURES,
    aligned,
    expression_classes,
    expression_features,
    head_pitch,
    raw_features,
)
from pipeline.landmarks import FaceMeshTracker, mouth_openness, smooth_landmarks
from pipeline.media import read_frames
from pipeline.synth import SynthConfig, run


@pytest.fixture(scope="module")
def emotion_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 clips of 3 s: en/es/hi x 3 speakers; the four emotions go round them, so each emotion is worn by
    speakers of both orientations (odd speakers are mirrored) and in several languages."""
    out = tmp_path_factory.mktemp("emotion_corpus")
    emotions = ("neutral", "happy", "sad", "surprised")
    run(
        SynthConfig(
            languages=("en", "es", "hi"), speakers=3, clips_per_speaker=1, seconds=3.0, emotions=emotions
        ),
        str(out),
    )
    return out


@pytest.fixture(scope="module")
def measured(emotion_corpus: Path) -> list[tuple[dict[str, str], dict[str, np.ndarray]]]:
    rows = list(csv.DictReader((emotion_corpus / "manifest.csv").open(encoding="utf-8")))
    out = []
    with FaceMeshTracker(max_faces=1) as tracker:
        for row in rows:
            track = tracker.track(read_frames(str(emotion_corpus / row["video"]), fps=25.0))
            out.append((row, smooth_landmarks(track.landmarks, track.found)))
    return out


def test_manifest_records_each_clips_emotion(measured) -> None:
    emotions = [row["emotion"] for row, _ in measured]
    assert sorted(set(emotions)) == ["happy", "neutral", "sad", "surprised"]
    assert emotions.count("neutral") == 3  # 9 clips, 4 emotions in turn


def test_features_classify_the_base_expression_while_the_jaw_moves(measured) -> None:
    """>= 95 % of the frames of every clip read as the clip's base expression, the mouth opening and
    closing with the speech throughout."""
    for row, landmarks in measured:
        openness = mouth_openness(landmarks)
        assert np.nanmax(openness) - np.nanmin(openness) > 0.1, row["video"]  # speech moves the jaw
        classes = expression_classes(expression_features(landmarks))
        share = float(np.mean(classes == EMOTION_CLASS[row["emotion"]]))
        assert share >= 0.95, (
            row["video"],
            row["emotion"],
            dict(zip(*np.unique(classes, return_counts=True), strict=True)),
        )


def test_the_jaws_part_is_removed(measured) -> None:
    """The corner features follow the mouth opening far less once the jaw's part is removed (a smile reads
    as a smile at every openness): pooled over the clips, per-clip slopes against openness shrink."""
    raw_slopes, slopes = [], []
    for _, landmarks in measured:
        raw, features = raw_features(landmarks), expression_features(landmarks)
        for name in ("corner_angle", "corner_elevation"):
            scale = np.nanstd(raw[name])
            raw_slopes.append(abs(np.polyfit(raw["openness"], raw[name], 1)[0]) / scale)
            slopes.append(abs(np.polyfit(features["openness"], features[name], 1)[0]) / scale)
    assert np.median(slopes) < 0.5 * np.median(raw_slopes), (np.median(slopes), np.median(raw_slopes))


def test_features_ignore_face_size_position_and_rotation(measured) -> None:
    _, landmarks = measured[0]
    theta = np.radians(12)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = landmarks.copy()
    moved[..., :2] = 1.7 * landmarks[..., :2] @ rot.T + np.array([40.0, -25.0])
    moved[..., 2] = 1.7 * landmarks[..., 2]  # FaceMesh's depth has the picture's scale
    a, b = expression_features(landmarks), expression_features(moved)
    for name in FEATURES:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-3, err_msg=name)
    assert np.nanmax(np.abs(aligned(landmarks)[:, 33] - [-0.5, 0.0])) < 1e-9


def test_frames_without_a_face_have_no_class() -> None:
    landmarks = np.full((3, 468, 3), np.nan)
    assert list(expression_classes(expression_features(landmarks))) == ["", "", ""]


def test_a_nodded_head_is_measured_and_its_smile_left_out(measured) -> None:
    """Frames whose head is tilted back (rotated about the picture's x axis) read their pitch and have no
    smile: a head tilted back lowers the corners under the nose in the picture, not an expression."""
    _, landmarks = measured[1]
    nodded = landmarks.copy()
    frames = slice(20, 30)
    centre = np.nanmean(landmarks[frames], axis=1, keepdims=True)
    y, z = (landmarks[frames, :, 1:2] - centre[..., 1:2]), (landmarks[frames, :, 2:3] - centre[..., 2:3])
    theta = np.radians(15)
    nodded[frames, :, 1:2] = centre[..., 1:2] + y * np.cos(theta) - z * np.sin(theta)
    nodded[frames, :, 2:3] = centre[..., 2:3] + y * np.sin(theta) + z * np.cos(theta)
    pitch, before = head_pitch(nodded), head_pitch(landmarks)
    assert np.all(np.abs(np.abs(pitch[frames] - before[frames]) - 15) < 1), (pitch, before)
    assert np.nanmax(np.abs(np.delete(pitch, np.r_[frames]))) < 4, pitch  # the rig's own nods: ~1 SD
    smile = expression_features(nodded)["smile"]
    assert np.isnan(smile[frames]).all() and np.isfinite(np.delete(smile, np.r_[frames])).all()

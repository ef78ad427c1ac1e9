"""The paired expression metric on landmark tracks: a smile replaced by a neutral mouth is reported lost,
an unchanged copy is not, and the upper face (the control) stays consistent when only the mouth changes."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.expression import expression_consistency, expression_summary
from pipeline.face_rig import build_rig, express
from pipeline.synth import make_speaker

LOWER = (61, 291, 78, 308, 146, 91, 375, 321, 185, 40, 409, 270, 95, 191, 324, 415, 0, 17, 13, 14)


def track(landmarks: np.ndarray, seed: int, frames: int = 50) -> np.ndarray:
    """(T, 468, 3) landmarks: a still face with 0.2 px of jitter and a jaw opening and closing."""
    rng = np.random.default_rng(seed)
    out = np.repeat(np.c_[landmarks, np.zeros(len(landmarks))][None], frames, 0).astype(np.float64)
    out[..., :2] += rng.normal(0, 0.2, out[..., :2].shape)
    jaw = 4.0 * np.abs(np.sin(np.linspace(0, 3 * np.pi, frames)))
    out[:, [14, 17, 152], 1] += jaw[:, None]
    return out


@pytest.fixture(scope="module")
def faces() -> dict[str, np.ndarray]:
    rig = build_rig(make_speaker("en", 0, 0).look, 256, 0.45)
    return {e: express(rig, e).landmarks for e in ("neutral", "happy", "surprised")}


def test_unchanged_copy_is_consistent(faces) -> None:
    happy = track(faces["happy"], 0)
    same = expression_consistency(track(faces["happy"], 1), happy, mode="absolute")  # other jitter
    assert same["expr_lower_lost"] == 0.0 and same["expr_upper_lost"] != same["expr_upper_lost"]  # NaN
    # smile in corner lift (% of the eye-line-to-nose-base distance): the rig's happy corners sit ~17 above
    # its neutral ones; 0.2 px of jitter moves them under 1
    assert same["expr_smile_mad"] < 2.0 and same["expr_source_class"] == "smile"


def test_flattened_smile_is_lost_but_the_upper_face_is_not(faces) -> None:
    happy, neutral = track(faces["happy"], 0), track(faces["neutral"], 1)
    flattened = happy.copy()
    flattened[:, list(LOWER)] = neutral[:, list(LOWER)]  # the mouth of the neutral face pasted in
    result = expression_consistency(flattened, happy, mode="absolute")
    # the rig's neutral mouth sits ~17 below its happy one (corner lift), a few above the smile threshold's
    # distance from it: every frame should flip; 0.8 leaves room for the jaw's part of the corners
    assert result["expr_lower_lost"] > 0.8 and result["expr_lower_changed"] > 0.8, result
    assert result["expr_smile_mad"] > 6.0, result
    assert result["expr_brow_mad"] < 0.005, result
    assert result["expr_output_class"] != "smile"


def test_surprise_lost_is_the_upper_face(faces) -> None:
    surprised, neutral = track(faces["surprised"], 0), track(faces["neutral"], 1)
    assert expression_summary(surprised)["expr_class"] == "surprise"
    result = expression_consistency(neutral, surprised, mode="absolute")
    assert result["expr_upper_lost"] > 0.9 and result["expr_brow_mad"] > 0.02, result

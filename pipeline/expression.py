"""Facial expression per frame from FaceMesh landmarks, separated from the speech-driven mouth opening.

Beside `pipeline.landmarks.lip_shape` (the sync meter's view of the mouth), this is the expression's view:
every feature is measured in a frame aligned with the eye line (x along the eyes, y down, one unit = the
inter-ocular distance), so it does not depend on the face's size, position or in-plane rotation.

Lower face: mouth-corner elevation (corners above the lip centre), mouth width, lip-corner angle, cheek
raise. Upper face: brow height over the eye, inner-brow height, eye aperture. Speech moves the jaw and with
it the lip centre and, a little, the corners and the width; the lower-face features have that part removed
by a fixed linear term in the mouth opening (`OPENNESS_SLOPES`, measured on neutral speech with the jaw
moving), so a smile reads as a smile at any openness.

`expression_classes` thresholds the features into smile, neutral, frown and surprise (`CLASSES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.landmarks import EYE_CORNER_POINTS, MOUTH_CORNER_POINTS, mouth_openness

UPPER_LIP_CENTRE = 0  # outer upper lip, middle
LOWER_LIP_CENTRE = 17  # outer lower lip, middle
CHEEK_POINTS = (50, 280)  # the cheek apex below each eye (right, left)
LOWER_LID_POINTS = (145, 374)
UPPER_LID_POINTS = (159, 386)
BROW_POINTS = ((46, 52, 53, 55, 63, 65, 66, 70, 105, 107), (276, 282, 283, 285, 293, 295, 296, 300, 334, 336))
INNER_BROW_POINTS = ((55, 107), (285, 336))
EYE_POINTS = ((33, 133), (263, 362))  # outer and inner corner of each eye

FEATURES = (
    "openness",  # inner-lip gap (the speech part)
    "corner_elevation",  # lip centre y minus mouth-corner y: > 0 corners up (smile), < 0 down (frown)
    "mouth_width",  # corner to corner
    "corner_angle",  # degrees the corners rise above the upper lip centre, seen from it
    "cheek_raise",  # minus the cheek's distance below the lower lid: higher = cheeks pushed up
    "brow_height",  # mean brow height over the eye corners' line
    "inner_brow_height",  # inner brow ends over the inner eye corners
    "eye_aperture",  # lid gap
)
LOWER_FACE = ("corner_elevation", "mouth_width", "corner_angle", "cheek_raise")
UPPER_FACE = ("brow_height", "inner_brow_height", "eye_aperture")

# Per unit of mouth openness (inner-lip gap / inter-ocular distance), what the jaw alone adds to each raw
# feature; subtracted so a feature reads the expression, not the syllable. Fitted on neutral synth speech
# (two speakers, one mirrored, the jaw moving throughout): the lip centre drops with the lower lip, and the
# corners, as FaceMesh places them, follow the jaw a little.
OPENNESS_SLOPES = {"corner_elevation": 0.29, "mouth_width": 0.3, "corner_angle": -25.0, "cheek_raise": 0.04}

CLASSES = ("neutral", "smile", "frown", "surprise")
BLINK_FRAMES = 4  # a blink closes the eyes for at most this many frames either side of its middle (25 fps)


@dataclass(frozen=True)
class Thresholds:
    """Where the classes begin (corner angle in degrees, heights in inter-ocular units).

    Fitted on the synth rig, whose neutral face is the astronaut photograph: a broad smile with parted lips
    (corner_angle about 0). Real talkers at rest sit near -20 to -35 degrees (the 11 shared clips), so on
    real video these absolute classes call most frames "frown"; compare a clip with its own source (as
    `evaluation.expression` does) rather than trusting the absolute class there.
    """

    smile_angle: float = 4.0  # corner_angle above: smile
    frown_angle: float = -2.0  # corner_angle below: frown
    surprise_brow: float = 0.237  # brow_height above ...
    surprise_eye: float = 0.125  # ... and eye_aperture above (and neither smile nor frown): surprise


def _frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(origin, x axis, y axis, inter-ocular distance) of the eye-aligned frame, per frame."""
    right, left = lm[:, EYE_CORNER_POINTS[0]], lm[:, EYE_CORNER_POINTS[1]]
    axis = left - right
    iod = np.linalg.norm(axis, axis=1)
    ux = axis / iod[:, None]
    uy = np.stack([-ux[:, 1], ux[:, 0]], axis=1)
    return (right + left) / 2, ux, uy, iod


def aligned(landmarks: np.ndarray) -> np.ndarray:
    """(T, 468, 2) landmarks in the eye-aligned frame, inter-ocular units (y down)."""
    lm = np.asarray(landmarks, np.float64)[..., :2]
    origin, ux, uy, iod = _frame(lm)
    rel = lm - origin[:, None]
    return np.stack([(rel * ux[:, None]).sum(-1), (rel * uy[:, None]).sum(-1)], axis=-1) / iod[:, None, None]


def raw_features(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature of FEATURES per frame, before the openness term is removed ((T,) each, NaN no face)."""
    p = aligned(landmarks)
    x, y = p[..., 0], p[..., 1]
    corners = list(MOUTH_CORNER_POINTS)
    centre_y = (y[:, UPPER_LIP_CENTRE] + y[:, LOWER_LIP_CENTRE]) / 2
    rise = y[:, [UPPER_LIP_CENTRE]] - y[:, corners]  # > 0: corner above the upper lip centre
    run = np.abs(x[:, corners] - x[:, [UPPER_LIP_CENTRE]])
    brows = [y[:, list(side)].mean(1) for side in BROW_POINTS]
    eye_line = [y[:, list(side)].mean(1) for side in EYE_POINTS]
    inner = [y[:, list(side)].mean(1) for side in INNER_BROW_POINTS]
    return {
        "openness": mouth_openness(np.asarray(landmarks, np.float64)),
        "corner_elevation": centre_y - y[:, corners].mean(1),
        "mouth_width": np.linalg.norm(p[:, corners[0]] - p[:, corners[1]], axis=1),
        "corner_angle": np.degrees(np.arctan2(rise, run)).mean(1),
        "cheek_raise": -(y[:, list(CHEEK_POINTS)] - y[:, list(LOWER_LID_POINTS)]).mean(1),
        "brow_height": np.mean([e - b for e, b in zip(eye_line, brows, strict=True)], axis=0),
        "inner_brow_height": np.mean(
            [y[:, side[1]] - b for side, b in zip(EYE_POINTS, inner, strict=True)], axis=0
        ),
        "eye_aperture": np.mean(
            [y[:, lo] - y[:, up] for up, lo in zip(UPPER_LID_POINTS, LOWER_LID_POINTS, strict=True)], axis=0
        ),
    }


def expression_features(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """FEATURES per frame ((T,) float arrays, NaN without a face), the jaw's part removed (OPENNESS_SLOPES)."""
    raw = raw_features(landmarks)
    out = {name: raw[name] for name in FEATURES}
    for name, slope in OPENNESS_SLOPES.items():
        out[name] = raw[name] - slope * raw["openness"]
    return out


def expression_classes(features: dict[str, np.ndarray], thresholds: Thresholds | None = None) -> np.ndarray:
    """(T,) class names per frame (CLASSES; "" without a face): corners down say frown; otherwise raised
    brows with wide eyes say surprise, and corners up say smile. A blink does not end a surprise:
    the eyes count as wide when they are within BLINK_FRAMES of a frame where they are."""
    from scipy.ndimage import maximum_filter1d

    th = thresholds or Thresholds()
    angle = features["corner_angle"]
    out = np.full(len(angle), "neutral", dtype=object)
    eyes = np.nan_to_num(np.asarray(features["eye_aperture"], np.float64), nan=-np.inf)
    eyes = maximum_filter1d(eyes, 2 * BLINK_FRAMES + 1) if len(eyes) else eyes
    wide = (features["brow_height"] > th.surprise_brow) & (eyes > th.surprise_eye)
    out[angle > th.smile_angle] = "smile"
    out[wide] = "surprise"  # raised brows lift the corners a little too: not a smile
    out[angle < th.frown_angle] = "frown"
    out[~np.isfinite(angle)] = ""
    return out


# The class each base expression of the synth corpus (`lipsync synth --emotions`) should read as.
EMOTION_CLASS = {"neutral": "neutral", "happy": "smile", "sad": "frown", "surprised": "surprise"}

"""Facial expression per frame from FaceMesh landmarks, separated from the speech-driven mouth opening.

Beside `pipeline.landmarks.lip_shape` (the sync meter's view of the mouth), this is the expression's view:
every feature is measured in a frame aligned with the eye line (x along the eyes, y down, one unit = the
inter-ocular distance), so it does not depend on the face's size, position or in-plane rotation.

Lower face: mouth-corner elevation (corners above the lip centre), mouth width, lip-corner angle, cheek
raise. Upper face: brow height over the eye, inner-brow height, eye aperture. Speech moves the jaw and with
it the lip centre and, a little, the corners and the width; the lower-face features have that part removed
by a fixed linear term in the mouth opening (`OPENNESS_SLOPES`, measured on neutral speech with the jaw
moving), so a smile reads as a smile at any openness.

Lip rounding ("o", "oo") pulls the corners inwards and, seen from the lip centre, down: on real talkers the
lowest corner angles of a clip are rounded vowels, not frowns. `smile` is the corner angle with that part
removed too (`ROUNDING_SLOPE` per unit of mouth narrowing against the clip's own median width; a held smile
does not change the width within the clip, so it is kept whole), and it is left out (NaN) where the head
turns away from its usual pose in the clip (`yaw`, the nose tip's offset between the eyes, more than
`MAX_YAW` from the clip's median): a turned head
foreshortens one side of the mouth and reads as a lopsided expression.

`expression_classes` thresholds the features into smile, neutral, frown and surprise (`CLASSES`), either
absolutely (`Thresholds()`, fitted on the synth rig) or relative to a speaker's own baseline
(`clip_baseline`, `Thresholds.relative()`): real faces rest anywhere between corner angles of -20 and -37
degrees, so on real video a class means "more of a smile / frown than this speaker's usual face".
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
    "yaw",  # nose tip's offset from the eyes' midpoint along the eye line (0 frontal; sign = direction)
    "rounding",  # mouth narrowing against the clip's median width (> 0: rounder, "o"/"oo")
    "smile",  # corner_angle less the rounding's part; NaN with the head turned (what the classes read)
)
LOWER_FACE = ("corner_elevation", "mouth_width", "corner_angle", "cheek_raise")
UPPER_FACE = ("brow_height", "inner_brow_height", "eye_aperture")

# Per unit of mouth openness (inner-lip gap / inter-ocular distance), what the jaw alone adds to each raw
# feature; subtracted so a feature reads the expression, not the syllable. Fitted on neutral synth speech
# (two speakers, one mirrored, the jaw moving throughout): the lip centre drops with the lower lip, and the
# corners, as FaceMesh places them, follow the jaw a little.
OPENNESS_SLOPES = {"corner_elevation": 0.29, "mouth_width": 0.3, "corner_angle": -25.0, "cheek_raise": 0.04}

# Degrees of corner angle per unit of `rounding`, removed from `smile`. Fitted on the 11 real development
# clips (benchmarks/expression_real.py): within each clip, the openness-corrected corner angle against the
# relative narrowing of the mouth has slopes of -30 to -111 (median -52) and correlations of -0.5 to -0.9.
ROUNDING_SLOPE = -52.0
NOSE_TIP = 1
# Nose-tip offset from the clip's median head pose beyond which a frame is left out (inter-ocular units;
# about 12 degrees of turn). Relative to the clip, so a talker filmed in three-quarter view keeps their frames;
# on the real clips it leaves out 0-42 % (a presenter turning to the camera, a seated talker gesturing).
MAX_YAW = 0.1

MIN_RELATIVE_ANGLE = 3.0  # degrees of smile from the baseline where a relative smile / frown can begin
SPREAD_K = 2.0  # ... and how many of the speaker's own robust SDs

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

    @classmethod
    def relative(cls, spread: float = 0.0) -> Thresholds:
        """Thresholds on features less a speaker's baseline (`clip_baseline`): how far from their usual
        face a smile, a frown, raised brows and widened eyes begin. A smile or frown must stand out of the
        speaker's own variation (`spread`, robust SD of `smile` in degrees) by SPREAD_K, and by at least
        MIN_RELATIVE_ANGLE (the synth rig's smile is 4-5 degrees above its neutral; real talkers' smile
        varies 2-5 degrees SD with speech)."""
        angle = max(MIN_RELATIVE_ANGLE, SPREAD_K * spread) if np.isfinite(spread) else MIN_RELATIVE_ANGLE
        return cls(smile_angle=angle, frown_angle=-angle, surprise_brow=0.04, surprise_eye=0.025)


@dataclass(frozen=True)
class Baseline:
    """A speaker's usual face: the median of the features the classes read, over a clip's frames."""

    smile: float
    brow_height: float
    eye_aperture: float
    smile_spread: float = 0.0  # robust SD (1.4826 x median absolute deviation) of `smile` over the clip


def clip_baseline(features: dict[str, np.ndarray]) -> Baseline:
    """The clip's robust baseline (medians over the frames with a face and the head not turned away).

    Assumes the speaker's usual face is what the clip shows most of the time; a clip that smiles
    throughout has a smiling baseline, so compare an output with its source's baseline
    (`evaluation.expression`), not with its own."""

    def median(name: str) -> float:
        v = np.asarray(features[name], np.float64)
        return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")

    smile = np.asarray(features["smile"], np.float64)
    centre = median("smile")
    spread = 1.4826 * float(np.nanmedian(np.abs(smile - centre))) if np.isfinite(centre) else float("nan")
    return Baseline(centre, median("brow_height"), median("eye_aperture"), spread)


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
        "yaw": x[:, NOSE_TIP],
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
    out = dict(raw)
    for name, slope in OPENNESS_SLOPES.items():
        out[name] = raw[name] - slope * raw["openness"]
    width = out["mouth_width"]
    median = np.nanmedian(width) if np.isfinite(width).any() else np.nan
    out["rounding"] = (median - width) / median
    out["smile"] = out["corner_angle"] - ROUNDING_SLOPE * out["rounding"]
    yaw = raw["yaw"]
    turned = ~(np.abs(yaw - (np.nanmedian(yaw) if np.isfinite(yaw).any() else 0.0)) <= MAX_YAW)
    out["smile"][turned] = np.nan
    return out


def expression_classes(
    features: dict[str, np.ndarray], thresholds: Thresholds | None = None, baseline: Baseline | None = None
) -> np.ndarray:
    """(T,) class names per frame (CLASSES; "" without a face or with the head turned away): corners down
    say frown; otherwise raised brows with wide eyes say surprise, and corners up say smile. A blink does
    not end a surprise: the eyes count as wide when they are within BLINK_FRAMES of a frame where they are.

    With a `baseline` the features are read less the baseline, against `Thresholds.relative()` unless
    `thresholds` are given: the mode for real faces."""
    from scipy.ndimage import maximum_filter1d

    base = baseline or Baseline(0.0, 0.0, 0.0)
    th = thresholds or (Thresholds.relative(base.smile_spread) if baseline else Thresholds())
    angle = np.asarray(features["smile"], np.float64) - base.smile
    out = np.full(len(angle), "neutral", dtype=object)
    eyes = np.asarray(features["eye_aperture"], np.float64) - base.eye_aperture
    eyes = np.nan_to_num(eyes, nan=-np.inf)
    eyes = maximum_filter1d(eyes, 2 * BLINK_FRAMES + 1) if len(eyes) else eyes
    wide = (np.asarray(features["brow_height"]) - base.brow_height > th.surprise_brow) & (
        eyes > th.surprise_eye
    )
    out[angle > th.smile_angle] = "smile"
    out[wide] = "surprise"  # raised brows lift the corners a little too: not a smile
    out[angle < th.frown_angle] = "frown"
    out[~np.isfinite(angle)] = ""
    return out


# The class each base expression of the synth corpus (`lipsync synth --emotions`) should read as.
EMOTION_CLASS = {"neutral": "neutral", "happy": "smile", "sad": "frown", "surprised": "surprise"}

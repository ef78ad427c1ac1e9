"""Facial expression per frame from FaceMesh landmarks, separated from the speech-driven mouth opening.

Beside `pipeline.landmarks.lip_shape` (the sync meter's view of the mouth), this is the expression's view:
every feature is measured in a frame aligned with the eye line (x along the eyes, y down, one unit = the
inter-ocular distance), so it does not depend on the face's size, position or in-plane rotation.

Lower face: mouth-corner elevation (corners above the lip centre), mouth width, lip-corner angle, the
corners' height against the nose base, cheek raise. Upper face: brow height over the eye, inner-brow height,
eye aperture. Speech moves the jaw and with it the lip centre and, a little, the corners and the width; the
lower-face features have that part removed by a fixed linear term in the mouth opening (`OPENNESS_SLOPES`,
measured on neutral speech with the jaw moving), so a smile reads as a smile at any openness.

`smile`, what the classes read, is `corner_lift`: the mouth corners' height above the nose base (subnasale)
as a percentage of the eye-line-to-subnasale distance, with the jaw's part removed. Measured against rigid
points rather than against the moving upper-lip centre (as `corner_angle` is), a wide-open laugh does not
read as corners down and a rounded "oo" does not read as a frown. It is left out (NaN) where the head turns
away from its usual pose in the clip (`yaw`, the nose tip's offset between the eyes, more than `MAX_YAW` from
the clip's median) or nods away from it (`pitch`, a rigid 3-D fit of forehead, nose and eye points, more
than `MAX_PITCH` degrees from the clip's median face): a turned head foreshortens one side of the mouth, and
a head tilted back lowers the corners under the nose in the picture.

`expression_classes` thresholds the features into smile, neutral, frown and surprise (`CLASSES`), either
absolutely (`Thresholds()`, fitted on the synth rig) or relative to a speaker's own baseline
(`clip_baseline`, `Thresholds.relative()`): real faces rest anywhere between corner lifts of -38 and -73 (the
synth rig's neutral: -18), so on real video a class means "more of a smile / frown than this speaker's usual
face".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.landmarks import EYE_CORNER_POINTS, MOUTH_CORNER_POINTS, inter_ocular, mouth_openness

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
    "corner_lift",  # corners above the nose base, % of the eye-line-to-nose-base distance (< 0: below it)
    "pitch",  # degrees the head nods from the clip's median face (NaN for 2-D landmarks)
    "smile",  # corner_lift; NaN with the head turned or nodded away (what the classes read)
)
LOWER_FACE = ("corner_elevation", "mouth_width", "corner_angle", "corner_lift", "cheek_raise")
UPPER_FACE = ("brow_height", "inner_brow_height", "eye_aperture")

# Per unit of mouth openness (inner-lip gap / inter-ocular distance), what the jaw alone adds to each raw
# feature; subtracted so a feature reads the expression, not the syllable. Fitted on neutral synth speech
# (two speakers, one mirrored, the jaw moving throughout): the lip centre drops with the lower lip, and the
# corners, as FaceMesh places them, follow the jaw a little. `corner_lift`'s term is a floor, not a fit:
# within a clip the corners drop 43 per unit of opening on the synth rig and 20-180 (median 61) on the real
# development clips, but removing all of it lifts a shouting mouth into the smiles of a clip; -25 is the
# smallest term that keeps the rig's neutral and happy frames apart (1st / 99th percentiles: -14.5 / -12.7;
# at -15 they overlap).
OPENNESS_SLOPES = {
    "corner_elevation": 0.29,
    "mouth_width": 0.3,
    "corner_angle": -25.0,
    "corner_lift": -25.0,
    "cheek_raise": 0.04,
}

NOSE_TIP = 1
SUBNASALE = 2  # the nose base, where the septum meets the upper lip
RIGID_POINTS = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 263, 362, 127, 356, 234, 454)
"""Forehead, nose and eye-corner points: neither speech nor expressions move them."""
# Head nod from the clip's median face beyond which a frame's smile is left out (degrees). The synth rig
# holds its head within 1 degree SD; on real clips a head tilted back reads as corners down.
MAX_PITCH = 8.0
# Nose-tip offset from the clip's median head pose beyond which a frame is left out (inter-ocular units;
# about 12 degrees of turn). Relative to the clip, so a talker filmed in three-quarter view keeps their frames;
# on the real clips it leaves out 0-42 % (a presenter turning to the camera, a seated talker gesturing).
MAX_YAW = 0.1

MIN_RELATIVE_LIFT = 6.0  # smile (corner lift) from the baseline where a relative smile / frown can begin
SPREAD_K = 2.0  # ... and how many of the speaker's own robust SDs

CLASSES = ("neutral", "smile", "frown", "surprise")
BLINK_FRAMES = 4  # a blink closes the eyes for at most this many frames either side of its middle (25 fps)


@dataclass(frozen=True)
class Thresholds:
    """Where the classes begin (`smile` in corner lift, heights in inter-ocular units).

    Fitted on the synth rig, whose neutral face is the astronaut photograph, a broad smile with parted lips
    (`smile` about -18; happy -10, sad -33). Real talkers at rest sit near -38 to -73 (the 11 shared clips),
    so on real video these absolute classes call most frames "frown"; compare a clip with its own source (as
    `evaluation.expression` does) rather than trusting the absolute class there.
    """

    smile_lift: float = -13.6  # smile above: smile (the rig's neutral 99th percentile -14.5, happy 1st -12.7)
    frown_lift: float = -24.5  # smile below: frown (neutral 1st percentile -20.9, sad 99th -28.0)
    surprise_brow: float = 0.237  # brow_height above ...
    surprise_eye: float = 0.125  # ... and eye_aperture above (and neither smile nor frown): surprise

    @classmethod
    def relative(cls, spread: float = 0.0) -> Thresholds:
        """Thresholds on features less a speaker's baseline (`clip_baseline`): how far from their usual
        face a smile, a frown, raised brows and widened eyes begin. A smile or frown must stand out of the
        speaker's own variation (`spread`, robust SD of `smile`) by SPREAD_K, and by at least
        MIN_RELATIVE_LIFT (the synth rig's smile is 8 above its neutral)."""
        lift = max(MIN_RELATIVE_LIFT, SPREAD_K * spread) if np.isfinite(spread) else MIN_RELATIVE_LIFT
        return cls(smile_lift=lift, frown_lift=-lift, surprise_brow=0.04, surprise_eye=0.025)


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


def aligned(landmarks: np.ndarray, points: tuple[int, ...] | None = None) -> np.ndarray:
    """(T, 468, 2) landmarks (or only `points`, (T, P, 2)) in the eye frame: origin between the outer eye
    corners, x along the eyes, y down, one unit = the inter-ocular distance. The one such frame: expression,
    head pose and scoring's upper-face features (`evaluation.quality`) all read it."""
    lm = np.asarray(landmarks, np.float64)[..., :2]
    right, left = lm[:, EYE_CORNER_POINTS[0]], lm[:, EYE_CORNER_POINTS[1]]
    axis = left - right
    iod = np.linalg.norm(axis, axis=1)
    ux = axis / iod[:, None]
    uy = np.stack([-ux[:, 1], ux[:, 0]], axis=1)
    rel = (lm if points is None else lm[:, list(points)]) - ((right + left) / 2)[:, None]
    x, y = rel @ ux[..., None], rel @ uy[..., None]  # (T, N, 1) each: one matrix product per frame
    return np.concatenate([x, y], axis=-1) / iod[:, None, None]


def head_pitch(landmarks: np.ndarray) -> np.ndarray:
    """(T,) degrees each frame's head is nodded from the clip's median face: a rigid (Kabsch) 3-D fit of
    RIGID_POINTS in the eye-aligned frame (depth in the same units), so the picture's scale and in-plane
    rotation do not count; NaN without a face, and everywhere for 2-D landmarks."""
    lm = np.asarray(landmarks, np.float64)
    pitch = np.full(len(lm), np.nan)
    if lm.ndim != 3 or lm.shape[-1] < 3:
        return pitch
    depth = lm[:, list(RIGID_POINTS), 2:3] / inter_ocular(lm)[:, None, None]
    points = np.concatenate([aligned(lm, RIGID_POINTS), depth], axis=-1)  # eye-aligned, in 3-D
    centred = points - points.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = centred / np.linalg.norm(centred, axis=(1, 2))[:, None, None]
    ok = np.isfinite(unit).all(axis=(1, 2))
    if not ok.any():
        return pitch
    reference = np.median(unit[ok], axis=0)
    u, _, vt = np.linalg.svd(reference.T @ unit[ok])  # every frame's Kabsch fit at once
    v, ut = vt.transpose(0, 2, 1), u.transpose(0, 2, 1)
    v[..., 2] *= np.sign(np.linalg.det(v @ ut))[:, None]  # a rotation, not a reflection
    rotation = v @ ut
    pitch[ok] = np.degrees(np.arctan2(rotation[:, 2, 1], rotation[:, 2, 2]))
    return pitch


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
    nose = y[:, SUBNASALE]
    return {
        "yaw": x[:, NOSE_TIP],
        "pitch": head_pitch(landmarks),
        "corner_lift": 100 * (nose - y[:, corners].mean(1)) / nose,
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
    out["smile"] = out["corner_lift"].copy()
    yaw, pitch = raw["yaw"], raw["pitch"]
    turned = ~(np.abs(yaw - (np.nanmedian(yaw) if np.isfinite(yaw).any() else 0.0)) <= MAX_YAW)
    nodded = np.abs(pitch) > MAX_PITCH  # NaN (2-D landmarks) compares False: no pitch gate then
    out["smile"][turned | nodded] = np.nan
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
    lift = np.asarray(features["smile"], np.float64) - base.smile
    out = np.full(len(lift), "neutral", dtype=object)
    eyes = np.asarray(features["eye_aperture"], np.float64) - base.eye_aperture
    eyes = np.nan_to_num(eyes, nan=-np.inf)
    eyes = maximum_filter1d(eyes, 2 * BLINK_FRAMES + 1) if len(eyes) else eyes
    wide = (np.asarray(features["brow_height"]) - base.brow_height > th.surprise_brow) & (
        eyes > th.surprise_eye
    )
    out[lift > th.smile_lift] = "smile"
    out[wide] = "surprise"  # raised brows lift the corners a little too: not a smile
    out[lift < th.frown_lift] = "frown"
    out[~np.isfinite(lift)] = ""
    return out


# The class each base expression of the synth corpus (`lipsync synth --emotions`) should read as.
EMOTION_CLASS = {"neutral": "neutral", "happy": "smile", "sad": "frown", "surprised": "surprise"}

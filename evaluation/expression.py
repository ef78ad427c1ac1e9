"""Facial emotion consistency: does a lip-synced output keep its source face's expression?

Per clip, from the FaceMesh landmarks of the output and of its source video (frame t with frame t), on the
expression features of `pipeline.expression` (the jaw's part removed, so the new speech's mouth opening
does not count as a change of expression):

- lower face (what a lip-sync generator repaints): correlation over time and mean absolute difference of
  the smile (`corner_lift`: the corners' height under the nose, every frame: source and output share the
  head pose) and of the corner elevation (inter-ocular units), and the share of the
  source's smile / frown frames whose class the output loses (`expr_lower_lost`);
- upper face, the control (generators leave it alone): the same for brow height, and the share of the
  source's surprise frames lost (`expr_upper_lost`).

- `expr_lower_changed`: the share of frames (face in both) whose lower-face class (smile, neutral or frown)
  differs between source and output, so a smile held through the whole clip is measured in relative mode
  too, where the source itself reads neutral.

Two modes for the classes (`pipeline.expression.expression_classes`): "relative" (the default, for real
faces) reads both videos against the source's own baseline (`clip_baseline` of the source: the speaker's
usual face), so an output whose corners sit below the speaker's reads "frown" and a smile moment of the
source lost in the output is counted; "absolute" uses the thresholds fitted on the synth rig, where a
happy clip reads "smile" throughout (its known base expression). The correlations and differences do not
depend on the mode; `expr_source_class` / `expr_output_class` are the majority classes in that mode (in
relative mode the source is mostly "neutral" by construction).

A faithful output reads near 0 lost and changed and near 0 difference on both; an output that flattened the
smile reads a high `expr_lower_changed` (and `expr_lower_lost` where the source shows smile frames in that
mode) while the upper-face columns stay consistent.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from evaluation.sync import pearson
from pipeline.expression import clip_baseline, expression_classes, expression_features

LOWER_CLASSES = ("smile", "frown")
UPPER_CLASSES = ("surprise",)
MODES = ("relative", "absolute")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.mean(np.abs(a[ok] - b[ok]))) if ok.any() else float("nan")


def _lost(source: np.ndarray, output: np.ndarray, classes: tuple[str, ...]) -> float:
    """Share of the frames where the source shows one of `classes` and the output does not show it."""
    present = np.isin(source, classes) & (output != "")
    return float(np.mean(output[present] != source[present])) if present.any() else float("nan")


def _changed(source: np.ndarray, output: np.ndarray) -> float:
    """Share of the frames with a class in both where the lower-face class (smile / frown / neutral) differs."""

    def lower(c: np.ndarray) -> np.ndarray:
        return np.where(np.isin(c, LOWER_CLASSES), c, "neutral")

    both = (source != "") & (output != "")
    return float(np.mean(lower(source[both]) != lower(output[both]))) if both.any() else float("nan")


def _majority(classes: np.ndarray) -> str:
    counts = Counter(c for c in classes if c)
    return counts.most_common(1)[0][0] if counts else ""


def expression_consistency(output: np.ndarray, source: np.ndarray, mode: str = "relative") -> dict[str, Any]:
    """The `expr_*` columns of one output against its source ((T, 468, 3) landmarks each, NaN no face);
    `mode` (MODES) says how the classes are read: against the source's baseline or absolutely."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    n = min(len(output), len(source))
    out, src = expression_features(output[:n]), expression_features(source[:n])
    baseline = clip_baseline(src) if mode == "relative" else None
    out_cls, src_cls = expression_classes(out, baseline=baseline), expression_classes(src, baseline=baseline)
    return {
        "expr_smile_correlation": pearson(out["corner_lift"], src["corner_lift"]),
        "expr_smile_mad": _mad(out["corner_lift"], src["corner_lift"]),
        "expr_corner_elevation_mad": _mad(out["corner_elevation"], src["corner_elevation"]),
        "expr_lower_lost": _lost(src_cls, out_cls, LOWER_CLASSES),
        "expr_lower_changed": _changed(src_cls, out_cls),
        "expr_brow_correlation": pearson(out["brow_height"], src["brow_height"]),
        "expr_brow_mad": _mad(out["brow_height"], src["brow_height"]),
        "expr_upper_lost": _lost(src_cls, out_cls, UPPER_CLASSES),
        "expr_source_class": _majority(src_cls),
        "expr_output_class": _majority(out_cls),
    }


def expression_summary(landmarks: np.ndarray) -> dict[str, Any]:
    """Columns of a video scored without a source: its median smile (corner lift, head turns left out)
    and majority class, absolute (a real face's absolute class is unreliable; see pipeline.expression)."""
    features = expression_features(landmarks)
    smile = features["smile"]
    return {
        "expr_smile": float(np.nanmedian(smile)) if np.isfinite(smile).any() else float("nan"),
        "expr_class": _majority(expression_classes(features)),
    }

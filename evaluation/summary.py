"""Tables and summaries of scored rows: scores.parquet's table, per-language and per-system summaries, and
the calibration file fitted from the validation rows' landmark offsets."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from core.errors import BadInput
from evaluation.score_config import ScoreConfig
from generation.calibration import Calibration, calibration_from_offsets, load_calibration
from pipeline.meters import MeterConfig


def scores_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One Parquet-ready table from scored rows whose columns differ (failed rows have no metrics)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns})


SUMMARY_METRICS = (
    "landmark_offset_frames",
    "landmark_confidence",
    "openness_envelope_correlation",
    "viseme_agreement",
    "bilabial_closed",
    "open_vowel_open",
    "lse_d",
    "lse_c",
    "lse_v2_d",
    "lse_v2_c",
    "psnr",
    "ssim",
    "mouth_sharpness_ratio",
    "mouth_to_face_sharpness",
    "landmark_jitter",
    "mouth_flicker",
    "upper_face_shape_distance",
    "upper_face_motion_ratio",
    "expr_smile",
    "expr_smile_correlation",
    "expr_smile_mad",
    "expr_lower_lost",
    "expr_brow_mad",
    "expr_upper_lost",
)


def _finite(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    values = [r.get(key) for r in rows]
    return np.array([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], float)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, failures by reason, mean and median of every metric, and the share of |offset| <= 1."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["status"] != "ok":
            failed[r["reason"]] += 1
    out: dict[str, Any] = {
        "videos": len(rows),
        "scored": len(ok),
        "not_scored_by_reason": dict(sorted(failed.items())),
    }
    for key in SUMMARY_METRICS:
        values = _finite(ok, key)
        if len(values):
            out[key] = {"mean": round(float(values.mean()), 4), "median": round(float(np.median(values)), 4)}
    for key in ("landmark_offset_frames", "lse_offset_frames", "lse_v2_offset_frames"):
        values = _finite(ok, key)
        if len(values):
            out[key.replace("offset_frames", "offset_within_1")] = round(
                float(np.mean(np.abs(values) <= 1)), 4
            )
    return out


def _grouped(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r.get(key) or ""].append(r)
    return {name: summarise(group) for name, group in sorted(groups.items())}


def summary_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: overall, per language, per system and per system x language (and per emotion tag
    when the inputs carry one)."""
    systems = defaultdict(list)
    for r in rows:
        systems[r["system"]].append(r)
    emotions = {"emotions": _grouped(rows, "emotion")} if any(r.get("emotion") for r in rows) else {}
    return {
        **emotions,
        "overall": summarise(rows),
        "languages": _grouped(rows, "language"),
        "systems": {
            name: {**summarise(g), "languages": _grouped(g, "language")}
            for name, g in sorted(systems.items())
        },
    }


CALIBRATION_COLUMNS = {  # meter -> (offset column, confidence column) of scores.parquet
    "landmarks": ("landmark_offset_frames", "landmark_confidence"),
    "syncnet_v2": ("lse_v2_offset_frames", "lse_v2_c"),
    "expert": ("lse_offset_frames", "lse_c"),
}


def calibration_from_scores(rows: list[dict[str, Any]], cfg: ScoreConfig) -> Calibration:
    """Per-language and per-speaker calibration from the AV offsets the chosen meter read on the
    validation rows.

    Validation rows are those with split "val" (all rows when no row has a split); readings the meter
    abstains on (below `calibration_min_confidence`, by default its own threshold) are left out; `calibration_used` is the calibration the videos were
    generated with (entries become k_used - round(median offset), see `generation.calibration`).
    """
    offset_key, confidence_key = CALIBRATION_COLUMNS[cfg.calibration_meter]
    threshold = MeterConfig(cfg.calibration_meter, min_confidence=cfg.calibration_min_confidence).threshold
    usable = [
        r
        for r in rows
        if r["status"] == "ok"
        and r.get(offset_key) is not None
        and (r.get(confidence_key) or 0.0) >= threshold
        and not (cfg.calibration_meter == "landmarks" and r.get("landmark_reason"))
    ]
    if any(r.get("split") for r in usable):
        usable = [r for r in usable if r.get("split") in ("val", "validation")]
    if not usable:
        raise BadInput("no scored validation rows to calibrate from")
    by_language: dict[str, list[float]] = defaultdict(list)
    by_speaker: dict[str, list[float]] = defaultdict(list)
    for r in usable:
        by_language[r["language"]].append(r[offset_key])
        if r.get("speaker"):
            by_speaker[r["speaker"]].append(r[offset_key])
    return calibration_from_offsets(
        by_language,
        by_speaker,
        used=load_calibration(cfg.calibration_used or None),
        min_clips=cfg.calibration_min_clips,
        extra={"source": f"lipsync score: {offset_key} ({cfg.calibration_meter} meter)", "fps": cfg.fps},
    )

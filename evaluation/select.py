"""`lipsync select SCORES OUT`: the source clips behind the worst generated videos, as a manifest that
`lipsync train wav2lip ... --focus OUT/manifest.csv` up-weights (generate → score → select → fine-tune).

SCORES is a `lipsync score` OUT or its scores.parquet. Of its scored rows (status ok; the "do nothing"
baseline rows are left out: they are not the model's outputs), `--language` keeps some languages, then
`--below` / `--above` keep the rows past a threshold of `--metric`, then `--worst` keeps the worst N (or N%)
of what is left, ranked by the metric (ties: lower viseme agreement, then lower openness-envelope
correlation, as the report's worst clips). Without a threshold or `--worst`, the worst 20% are kept.

The selected outputs are grouped by the source face video they were made from: the scores' `source`
column, which `lipsync score` fills from generation's outputs.parquet `video` (the pair's face video, made
absolute when the pairs were read; for the demo that is clips.parquet's `source` itself). Rows without a
source (a corpus manifest or a directory of videos scored as they are) fall back to their own `video`.
Scores carry no `audio` column today (generation's driving audio is not the clip's, and training pairs
a clip with its own audio), so the manifest has one only when the scores do.

Writes OUT/manifest.csv (one row per source: video, [audio], language, [speaker], metric, value: the worst
value among its selected outputs, outputs: how many were selected) and OUT/select.json (parameters,
counts, the selected outputs).
"""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.config import code_version, to_dict
from core.errors import BadInput
from core.storage import Store
from evaluation.baseline import BASELINE_SYSTEM
from evaluation.report import load_scores

LOWER, HIGHER, ABS = "lower", "higher", "abs"
DIRECTIONS: dict[str, str] = {
    # sync: offsets are best at 0 (|value| smaller is better)
    "landmark_offset_frames": ABS,
    "lse_offset_frames": ABS,
    "lse_v2_offset_frames": ABS,
    "landmark_confidence": HIGHER,
    "openness_envelope_correlation": HIGHER,
    "viseme_agreement": HIGHER,
    "bilabial_closed": HIGHER,
    "open_vowel_open": HIGHER,
    "lse_d": LOWER,  # SyncNet distance
    "lse_c": HIGHER,  # SyncNet confidence
    "lse_v2_d": LOWER,
    "lse_v2_c": HIGHER,
    # quality (ratios against the source: < 1 is the failure, blur or a flattened face)
    "psnr": HIGHER,
    "ssim": HIGHER,
    "mouth_sharpness_ratio": HIGHER,
    "mouth_to_face_sharpness": HIGHER,
    "landmark_jitter": LOWER,
    "mouth_flicker": LOWER,
    "upper_face_shape_distance": LOWER,
    "upper_face_motion_ratio": HIGHER,
    # expression consistency with the source
    "expr_smile_correlation": HIGHER,
    "expr_smile_mad": LOWER,
    "expr_lower_lost": LOWER,
    "expr_brow_mad": LOWER,
}
"""Which way each scores.parquet metric is better."""

DEFAULT_METRIC = "landmark_offset_frames"
"""The model-free landmark AV offset: every scored row has it (LSE needs `lipsync score --syncnet`), and it
is what the report headlines (its offset_accuracy component, its worst clips ranked by |offset|)."""

DEFAULT_WORST = "20%"
TIE_BREAKS = (("viseme_agreement", 1.0), ("openness_envelope_correlation", 0.0))
"""The report's worst-clips order after the metric: lower first (a missing value counts as this)."""


@dataclass(frozen=True)
class SelectConfig:
    """Which scored outputs `lipsync select` keeps (see the module's docstring for the order)."""

    metric: str = DEFAULT_METRIC
    worst: str = ""  # "20%" or a count like "15"; "" = 20% unless a threshold is given
    languages: tuple[str, ...] = ()  # () = every language
    below: float | None = None  # keep rows whose value (|value| for offsets) is below this
    above: float | None = None  # keep rows whose value (|value| for offsets) is above this


def parse_worst(text: str) -> tuple[str, float]:
    """("share", 0.2) for "20%", ("count", 15) for "15"; BadInput for anything else."""
    value = text.strip()
    share = value.endswith("%")
    try:
        number = float(value[:-1] if share else value)
    except ValueError:
        number = float("nan")
    if share and 0 < number <= 100:
        return "share", number / 100.0
    if not share and math.isfinite(number) and number >= 1 and number == int(number):
        return "count", int(number)
    raise BadInput(f"--worst {text!r}: expected a share like 20% (0-100%] or a count like 15 (>= 1)")


def effective_worst(cfg: SelectConfig) -> str:
    """`cfg.worst`, or the 20% default when neither it nor a threshold is given ("" keeps every row)."""
    thresholded = cfg.below is not None or cfg.above is not None
    return cfg.worst or ("" if thresholded else DEFAULT_WORST)


def badness(values: pd.Series, metric: str) -> pd.Series:
    """The metric turned so that larger is worse (|value| for offsets)."""
    direction = DIRECTIONS[metric]
    if direction == ABS:
        return values.abs()
    return -values if direction == HIGHER else values


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce")


def _text(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series("", index=frame.index, dtype=object)
    return frame[column].fillna("").astype(str).str.strip()


def _check_metric(frame: pd.DataFrame, metric: str) -> None:
    if metric not in DIRECTIONS:
        raise BadInput(f"unknown metric {metric!r}; known: {', '.join(DIRECTIONS)}")
    if metric not in frame.columns:
        present = [m for m in DIRECTIONS if m in frame.columns]
        hint = " (scored without --syncnet / --syncnet-v2?)" if metric.startswith("lse") else ""
        raise BadInput(
            f"metric {metric} is not in these scores{hint}; present: {', '.join(present) or 'none'}"
        )


def _threshold(rows: pd.DataFrame, cfg: SelectConfig) -> pd.DataFrame:
    """Rows past `below` / `above` (|value| for offset metrics); BadInput naming the bound when none is."""
    value = rows["_value"].abs() if DIRECTIONS[cfg.metric] == ABS else rows["_value"]
    keep = pd.Series(True, index=rows.index)
    if cfg.below is not None:
        keep &= value < cfg.below
    if cfg.above is not None:
        keep &= value > cfg.above
    if not keep.any():
        bounds = " and ".join(
            f"{word} {bound:g}"
            for word, bound in (("below", cfg.below), ("above", cfg.above))
            if bound is not None
        )
        what = f"|{cfg.metric}|" if DIRECTIONS[cfg.metric] == ABS else cfg.metric
        raise BadInput(
            f"no scored row has {what} {bounds} (its values run {value.min():g} to {value.max():g}); "
            "the threshold emptied the selection"
        )
    return rows[keep]


def _worst(rows: pd.DataFrame, cfg: SelectConfig, worst: str) -> pd.DataFrame:
    """The worst `worst` (count or share, at least one row) of `rows`, worst first."""
    kind, amount = parse_worst(worst)
    n = int(amount) if kind == "count" else max(1, math.ceil(amount * len(rows) - 1e-9))
    ranked = rows.assign(
        _bad=badness(rows["_value"], cfg.metric),
        **{f"_tie{i}": _numeric(rows, c).fillna(fill) for i, (c, fill) in enumerate(TIE_BREAKS)},
    )
    ties = [f"_tie{i}" for i in range(len(TIE_BREAKS))]
    ranked = ranked.sort_values(
        ["_bad", *ties, "id"], ascending=[False, *[True] * len(ties), True], kind="mergesort"
    )
    return ranked.head(n).drop(columns=["_bad", *ties])


def select_rows(frame: pd.DataFrame, cfg: SelectConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """The selected output rows (worst first, with `_value` and `_source`) and the counts of each step."""
    _check_metric(frame, cfg.metric)
    worst = effective_worst(cfg)
    if worst:
        parse_worst(worst)  # a bad value fails before any filter runs
    baseline = _text(frame, "system") == BASELINE_SYSTEM
    ok = _text(frame, "status") == "ok"
    counts = {
        "rows": int(len(frame)),
        "baseline_rows": int(baseline.sum()),
        "not_ok_skipped": int((~baseline & ~ok).sum()),
    }
    rows = frame[~baseline & ok].copy()
    if rows.empty:
        raise BadInput(f"no scored (status ok) generated rows among the {len(frame)} rows of these scores")
    rows["language"] = _text(rows, "language")
    if cfg.languages:
        present = sorted(set(rows["language"]))
        rows = rows[rows["language"].isin(cfg.languages)]
        if rows.empty:
            raise BadInput(
                f"--language {','.join(cfg.languages)} emptied the selection: "
                f"the scored rows are in {', '.join(present)}"
            )
    counts["after_language"] = int(len(rows))
    rows["_value"] = _numeric(rows, cfg.metric)
    counts["no_value_skipped"] = int(rows["_value"].isna().sum())
    rows = rows[rows["_value"].notna()]
    if rows.empty:
        raise BadInput(f"no scored row has a value of {cfg.metric}: nothing to rank")
    if cfg.below is not None or cfg.above is not None:
        rows = _threshold(rows, cfg)
    counts["after_threshold"] = int(len(rows))
    if worst:
        rows = _worst(rows, cfg, worst)
    else:
        rows = rows.sort_values(
            "_value", key=lambda v: badness(v, cfg.metric), ascending=False, kind="mergesort"
        )
    source = _text(rows, "source")
    counts["source_from_video"] = int((source == "").sum())
    rows["_source"] = source.where(source != "", _text(rows, "video"))
    counts["selected_outputs"] = int(len(rows))
    return rows, counts


def manifest_frame(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per source video, worst first: video, [audio], language, [speaker], metric, value, outputs."""
    records = []
    for source, group in rows.groupby("_source", sort=False):  # rows are worst first: so is each group
        first = group.iloc[0]
        record: dict[str, Any] = {"video": source}
        if "audio" in rows.columns:
            record["audio"] = next((a for a in _text(group, "audio") if a), "")
        record["language"] = first["language"]
        if "speaker" in rows.columns:
            record["speaker"] = next((s for s in _text(group, "speaker") if s), "")
        record.update(metric=metric, value=float(first["_value"]), outputs=int(len(group)))
        records.append(record)
    return pd.DataFrame.from_records(records)


def next_command(
    manifest: str,
    data: str = "DATA",
    train_out: str = "TRAIN_OUT",
    syncnet: str = "EXPERT",
    init_from: str = "CHECKPOINT",
    extra: tuple[str, ...] = (),
) -> str:
    """The fine-tune command line that up-weights `manifest` (placeholders in CAPS unless given)."""
    words = ["lipsync", "train", "wav2lip", data, train_out, "--syncnet", syncnet, "--focus", manifest]
    return shlex.join([*words, "--init-from", init_from, *extra])


def select_command(scores: str, out: str, worst: str = DEFAULT_WORST, metric: str = DEFAULT_METRIC) -> str:
    """The `lipsync select` command line of a scores directory."""
    return shlex.join(["lipsync", "select", scores, out, "--worst", worst, "--metric", metric])


def run(cfg: SelectConfig, scores: str, out: str) -> dict[str, Any]:
    """Select from SCORES, write OUT/manifest.csv and OUT/select.json; returns their paths, the counts and
    the fine-tune command to run next."""
    frame = load_scores(scores)
    rows, counts = select_rows(frame, cfg)
    manifest = manifest_frame(rows, cfg.metric)
    counts["sources"] = int(len(manifest))
    store = Store(out)
    try:
        store.makedirs()
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc}") from exc
    store.write_bytes("manifest.csv", manifest.to_csv(index=False).encode("utf-8"))
    follow = next_command(store.uri("manifest.csv"))
    selected = [
        {"id": r["id"], "source": r["_source"], "language": r["language"], "value": float(r["_value"])}
        for r in rows.to_dict(orient="records")
    ]
    store.write_json(
        "select.json",
        {
            "scores": scores,
            "parameters": {
                **to_dict(cfg),
                "worst": effective_worst(cfg),
                "direction": DIRECTIONS[cfg.metric],
            },
            "counts": counts,
            "selected": selected,
            "next": follow,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "code_version": code_version(),
        },
    )
    return {
        "out": out,
        "manifest": store.uri("manifest.csv"),
        "select_json": store.uri("select.json"),
        "metric": cfg.metric,
        **counts,
        "next": follow,
    }

"""`lipsync report SCORES OUT [--mos FILE]`: report.json and a self-contained report.html.

The page has per-system and per-language tables, AV offset histograms, metric distributions, the
openness-vs-timeline traces of the worst clips and the "overall lip-sync score", whose formula is written
on the page (`FORMULA`) and can fold in MOS results from `lipsync mos results` (`MOS_FORMAT`). Plots are
matplotlib PNGs embedded as base64, so the file opens anywhere, offline."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd

from core.config import code_version, load_config
from core.errors import BadInput
from core.storage import Store, read_parquet
from evaluation import baseline
from evaluation.summary import summarise

if TYPE_CHECKING:
    pass

from evaluation.report_figures import _finite, _numeric, _records, figures

TEMPLATE = Path(__file__).with_name("report_template.html")


MOS_CRITERIA = ("sync", "realism", "naturalness", "emotion")  # emotion: only in studies that ask it


FORMULA = """overall = 100 x [(1 - w) x objective + w x mos]      (w = mos_weight, 0.5; w = 0 without MOS results)
objective = coverage x mean of the available components, each in [0, 1]:
  offset_accuracy     share of scored clips whose landmark AV offset is within +-tolerance frames (1)
  av_correlation      mean of max(0, correlation of mouth openness with the audio envelope at lag 0)
  viseme_agreement    mean viseme agreement (bilabial closures and open vowels) of clips with a timeline
  syncnet_confidence  mean of min(1, max(0, LSE-C / reference LSE-C)); reference 7.838 for syncnet_v2
                      (real LRS2 videos, Wav2Lip paper), our SyncNet only when own_lse_c_reference is set
  syncnet_offset      share of clips whose SyncNet AV offset is within +-tolerance frames
coverage = scored videos / all videos of the system (a video that could not be scored counts as a failure)
mos = mean over the criteria present (sync, realism, naturalness, emotion if the study asked it) of
      (MOS - 1) / 4, from the MOS results"""


MOS_FORMAT = """{"systems": {"<system>": {"sync": {"mos": 3.9, "ci95": [3.7, 4.1], "n": 120},
                         "realism": {"mos": 3.5, "ci95": [3.3, 3.7], "n": 120},
                         "naturalness": {"mos": 3.6, "ci95": [3.4, 3.8], "n": 120}}}}
<system> matches the `system` column of the scores; MOS is on the 1-5 scale; missing criteria are skipped;
other keys (per-language breakdowns, rater agreement) are allowed and ignored by the score."""


GLOSSARY = {
    "landmark offset": "Model-free AV offset in frames from mouth openness vs the audio (> 0: audio lags).",
    "confidence": "Best minus median correlation over the searched offsets (higher: a clearer peak).",
    "openness-envelope r": "Pearson correlation of mouth openness with the audio loudness per frame, as played.",
    "viseme agreement": "Mean of: share of p/b/m phonemes with closed lips, share of open vowels with an open "
    "mouth (relative to the clip's own openness range).",
    "LSE-D / LSE-C": "SyncNet protocol: min over offsets of the mean embedding distance (lower is better) and "
    "median minus min (higher is better). lse_* is our SyncNet, lse_v2_* the original syncnet_v2.",
    "PSNR / SSIM": "Fidelity to the reference video, when one was given.",
    "mouth sharpness ratio": "Variance of the Laplacian of the mouth region, output over source (< 1: blurrier).",
    "mouth-to-face sharpness": "Mouth sharpness over the output's own eye-region sharpness.",
    "landmark jitter": "Distance of raw landmarks from their smoothed track, in inter-ocular units.",
    "mouth flicker": "Mean absolute second temporal difference of the aligned mouth region (/255).",
    "upper-face motion ratio": "Brow and eye movement range of the output over the source's (< 1: flattened).",
}


TABLE_METRICS = (
    ("offset_within_1", "|offset|<=1"),
    ("landmark_confidence", "confidence"),
    ("openness_envelope_correlation", "openness-env r"),
    ("viseme_agreement", "viseme agr."),
    ("lse_d", "LSE-D"),
    ("lse_c", "LSE-C"),
    ("lse_v2_d", "LSE-D v2"),
    ("lse_v2_c", "LSE-C v2"),
    ("psnr", "PSNR"),
    ("ssim", "SSIM"),
    ("mouth_sharpness_ratio", "mouth sharp. ratio"),
    ("mouth_to_face_sharpness", "mouth/face sharp."),
    ("landmark_jitter", "jitter"),
    ("mouth_flicker", "flicker"),
    ("upper_face_motion_ratio", "upper-face motion"),
)
EMOTION_METRICS = (
    ("expr_smile", "smile (corner lift)"),
    ("expr_smile_correlation", "smile r vs source"),
    ("expr_smile_mad", "smile |diff| vs source"),
    ("expr_lower_lost", "lower-face class lost"),
    ("expr_brow_mad", "brow |diff| vs source"),
    ("expr_upper_lost", "upper-face class lost (control)"),
)


@dataclass(frozen=True)
class ReportConfig:
    """Weights and references of the overall score, and how many worst clips to show."""

    mos_weight: float = 0.5
    offset_tolerance: int = 1
    lse_c_reference: float = 7.838  # syncnet_v2 LSE-C of real LRS2 videos (Wav2Lip paper, Table 1)
    own_lse_c_reference: float = 0.0  # our SyncNet's LSE-C on real videos; 0 leaves it out of the score
    worst_clips: int = 6
    note: str = ""  # shown under the title (e.g. the demo's "these are demo-sized models")
    next_steps: str = ""  # command lines of the next iteration (select, fine-tune), shown near the end


def load_scores(uri: str) -> pd.DataFrame:
    """scores.parquet, given the file or the `lipsync score` OUT directory holding it."""
    target = uri if uri.endswith(".parquet") else uri.rstrip("/") + "/scores.parquet"
    fs, path = fsspec.core.url_to_fs(target)
    if not fs.exists(path):
        raise BadInput(f"scores {target} do not exist (pass a `lipsync score` OUT or its scores.parquet)")
    try:
        with fs.open(path, "rb") as fh:
            frame = read_parquet(fh).to_pandas()
    except (OSError, ValueError) as exc:  # a directory named *.parquet, or not Parquet (ArrowInvalid)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"scores {target} are not a Parquet table: {reason}") from exc
    missing = {"id", "system", "language", "status"} - set(frame.columns)
    if missing:
        raise BadInput(f"scores {target} lack column(s) {', '.join(sorted(missing))}")
    return frame


def load_mos(uri: str) -> dict[str, dict[str, Any]]:
    """The per-system MOS of a `lipsync mos results` JSON (see MOS_FORMAT)."""
    try:
        with fsspec.open(uri, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise BadInput(f"MOS results {uri} do not exist") from exc
    except json.JSONDecodeError as exc:
        raise BadInput(f"MOS results {uri} are not valid JSON: {exc}") from exc
    systems = data.get("systems") if isinstance(data, dict) else None
    if not isinstance(systems, dict):
        raise BadInput(f"MOS results {uri}: expected an object with a 'systems' mapping")
    for name, entry in systems.items():
        for criterion in MOS_CRITERIA:
            value = (entry or {}).get(criterion)
            if value is not None and not 1.0 <= float(value.get("mos", float("nan"))) <= 5.0:
                raise BadInput(f"MOS results {uri}: systems.{name}.{criterion}.mos must be within 1-5")
    return systems


def objective_components(frame: pd.DataFrame, cfg: ReportConfig) -> dict[str, float]:
    """The objective components (each in [0, 1]) present for one system's scored rows."""
    ok = frame[frame["status"] == "ok"]
    out: dict[str, float] = {}
    offsets = _finite(ok.get("landmark_offset_frames"))
    if len(offsets):
        out["offset_accuracy"] = float(np.mean(np.abs(offsets) <= cfg.offset_tolerance))
    corr = _finite(ok.get("openness_envelope_correlation"))
    if len(corr):
        out["av_correlation"] = float(np.mean(np.maximum(corr, 0.0)))
    visemes = _finite(ok.get("viseme_agreement"))
    if len(visemes):
        out["viseme_agreement"] = float(visemes.mean())
    confidences = []
    for column, reference in (("lse_v2_c", cfg.lse_c_reference), ("lse_c", cfg.own_lse_c_reference)):
        values = _finite(ok.get(column))
        if len(values) and reference > 0:
            confidences.append(float(np.mean(np.clip(values / reference, 0.0, 1.0))))
    if confidences:
        out["syncnet_confidence"] = float(np.mean(confidences))
    for column in ("lse_v2_offset_frames", "lse_offset_frames"):
        values = _finite(ok.get(column))
        if len(values):
            out["syncnet_offset"] = float(np.mean(np.abs(values) <= cfg.offset_tolerance))
            break
    return out


def mos_part(entry: dict[str, Any] | None) -> float | None:
    """Mean of (MOS - 1) / 4 over the criteria present, or None."""
    values = [(float(entry[c]["mos"]) - 1.0) / 4.0 for c in MOS_CRITERIA if entry and entry.get(c)]
    return float(np.mean(values)) if values else None


def system_scores(
    frame: pd.DataFrame, mos: dict[str, dict[str, Any]], cfg: ReportConfig
) -> dict[str, dict[str, Any]]:
    """Per system: components, coverage, objective, MOS part and the overall score (see FORMULA)."""
    out = {}
    for name, group in frame.groupby("system", sort=True):
        components = objective_components(group, cfg)
        coverage = float((group["status"] == "ok").mean())
        objective = coverage * float(np.mean(list(components.values()))) if components else 0.0
        part = mos_part(mos.get(str(name)))
        weight = cfg.mos_weight if part is not None else 0.0
        out[str(name)] = {
            "overall": round(100.0 * ((1 - weight) * objective + weight * (part or 0.0)), 2),
            "objective": round(objective, 4),
            "mos_part": None if part is None else round(part, 4),
            "coverage": round(coverage, 4),
            "components": {k: round(v, 4) for k, v in components.items()},
            "mos": mos.get(str(name)),
        }
    return out


def metric_table(
    groups: dict[str, list[dict[str, Any]]], metrics: tuple[tuple[str, str], ...] = TABLE_METRICS
) -> dict[str, Any]:
    """{"columns": [...], "rows": [{"name", "values"}]}: counts and means of `metrics` per group."""
    summaries = {name: summarise(rows) for name, rows in groups.items()}
    present = [(k, label) for k, label in metrics if any(k in s for s in summaries.values())]
    columns = ["videos", "scored", *[label for _, label in present]]
    rows = []
    for name, s in summaries.items():
        values = [s["videos"], s["scored"]]
        for key, _ in present:
            entry = s.get(key)
            values.append(entry["mean"] if isinstance(entry, dict) else entry)
        rows.append({"name": name, "values": values})
    return {"columns": columns, "rows": rows}


def _groups(frame: pd.DataFrame, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {
        " / ".join(map(str, k if isinstance(k, tuple) else (k,))): _records(g)
        for k, g in frame.groupby(keys, sort=True)
    }


def _summary_record(frame: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    return {name: summarise(rows) for name, rows in _groups(frame, keys).items()}


def worst_clips(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Scored clips with the largest |landmark offset|, then the lowest viseme agreement and correlation."""
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty:
        return ok
    ok["_abs_offset"] = pd.to_numeric(ok["landmark_offset_frames"], errors="coerce").abs()
    ok["_agreement"] = _numeric(ok, "viseme_agreement").fillna(1.0)  # absent without phoneme timelines
    ok["_corr"] = _numeric(ok, "openness_envelope_correlation").fillna(0.0)
    ranked = ok.sort_values(["_abs_offset", "_agreement", "_corr"], ascending=[False, True, True])
    return ranked.head(n).drop(columns=["_abs_offset", "_agreement", "_corr"])


def fmt(value: Any) -> str:
    """A table cell: 3 significant decimals for floats, blank for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_html(doc: dict[str, Any], images: dict[str, str]) -> str:
    """The self-contained page (jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["fmt"] = fmt
    return env.from_string(TEMPLATE.read_text(encoding="utf-8")).render(doc=doc, figures=images)


def _clip_summary(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "system", "language", "video", "landmark_offset_frames", "landmark_confidence")
    extra = ("viseme_agreement", "openness_envelope_correlation")
    out = {k: _plain(row.get(k)) for k in (*keys, *extra)}
    if out["landmark_offset_frames"] is not None:
        out["landmark_offset_frames"] = int(out["landmark_offset_frames"])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def emotion_table(frame: pd.DataFrame) -> dict[str, Any] | None:
    """Expression consistency per system and emotion tag (evaluation.expression); None without the columns."""
    if "expr_smile" not in frame.columns:
        return None
    emotion = frame["emotion"].fillna("") if "emotion" in frame.columns else pd.Series("", index=frame.index)
    tagged = frame.assign(emotion=emotion.replace("", "untagged"))
    return metric_table(_groups(tagged, ["system", "emotion"]), EMOTION_METRICS)


def build_document(
    frame: pd.DataFrame,
    scores_uri: str,
    mos: dict[str, dict[str, Any]],
    mos_uri: str | None,
    cfg: ReportConfig,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """report.json's content (and the worst clips, for their traces)."""
    scores = system_scores(frame, mos, cfg)
    worst = worst_clips(frame, cfg.worst_clips)
    not_ok = frame[frame["status"] != "ok"]
    doc = {
        "scores": scores_uri,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "code_version": code_version(),
        "videos": int(len(frame)),
        "scored": int((frame["status"] == "ok").sum()),
        "formula": FORMULA,
        "mos_format": MOS_FORMAT,
        "mos_source": mos_uri,
        "config": cfg.__dict__,
        "systems": scores,
        "component_names": sorted({c for s in scores.values() for c in s["components"]}),
        "system_table": metric_table(_groups(frame, ["system"])),
        "language_table": metric_table(_groups(frame, ["language"])),
        "system_language_table": metric_table(_groups(frame, ["system", "language"])),
        "emotion_table": emotion_table(frame),
        "summary": {
            "languages": _summary_record(frame, ["language"]),
            "systems": _summary_record(frame, ["system"]),
        },
        "baseline_comparison": baseline.comparison(frame),
        "sync_bar": baseline.sync_bar(frame),
        "worst_clips": [_clip_summary(r) for r in _records(worst)],
        "not_scored": [
            {k: _plain(r.get(k)) for k in ("id", "video", "status", "reason", "message")}
            for r in _records(not_ok)
        ],
        "glossary": GLOSSARY,
    }
    return doc, worst


def run(
    scores: str,
    out: str,
    mos: str | None = None,
    config_path: str | None = None,
    note: str | None = None,
    next_steps: str | None = None,
) -> dict[str, Any]:
    """Write OUT/report.json and OUT/report.html from a `lipsync score` output (`next_steps`: command
    lines shown under "Next iteration")."""
    cfg = load_config(ReportConfig, config_path, {"note": note, "next_steps": next_steps})
    frame = load_scores(scores)
    mos_systems = load_mos(mos) if mos else {}
    doc, worst = build_document(frame, scores, mos_systems, mos, cfg)
    doc["note"] = cfg.note
    doc["next_steps"] = cfg.next_steps
    images = figures(frame, doc["systems"], worst)
    doc["figures"] = sorted(images)
    store = Store(out)
    try:
        store.makedirs()
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc}") from exc
    store.write_json("report.json", doc)
    store.write_bytes("report.html", render_html(doc, images).encode("utf-8"))
    return {
        "out": out,
        "report_json": store.uri("report.json"),
        "report_html": store.uri("report.html"),
        "systems": {name: s["overall"] for name, s in doc["systems"].items()},
    }

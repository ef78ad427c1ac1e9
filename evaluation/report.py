"""`lipsync report SCORES OUT [--mos FILE]`: report.json and a self-contained report.html.

The page has per-system and per-language tables, AV offset histograms, metric distributions, the
openness-vs-timeline traces of the worst clips and the "overall lip-sync score", whose formula is written
on the page (`FORMULA`) and can fold in MOS results from `lipsync mos results` (`MOS_FORMAT`). Plots are
matplotlib PNGs embedded as base64, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import io
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
from core.storage import Store
from evaluation import baseline
from evaluation.summary import summarise

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEMPLATE = Path(__file__).with_name("report_template.html")
MOS_CRITERIA = ("sync", "realism", "naturalness")

FORMULA = """overall = 100 x [(1 - w) x objective + w x mos]      (w = mos_weight, 0.5; w = 0 without MOS results)
objective = coverage x mean of the available components, each in [0, 1]:
  offset_accuracy     share of scored clips whose landmark AV offset is within +-tolerance frames (1)
  av_correlation      mean of max(0, correlation of mouth openness with the audio envelope at lag 0)
  viseme_agreement    mean viseme agreement (bilabial closures and open vowels) of clips with a timeline
  syncnet_confidence  mean of min(1, max(0, LSE-C / reference LSE-C)); reference 7.838 for syncnet_v2
                      (real LRS2 videos, Wav2Lip paper), our SyncNet only when own_lse_c_reference is set
  syncnet_offset      share of clips whose SyncNet AV offset is within +-tolerance frames
coverage = scored videos / all videos of the system (a video that could not be scored counts as a failure)
mos = mean over the criteria present (sync, realism, naturalness) of (MOS - 1) / 4, from the MOS results"""

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

DISTRIBUTIONS = (
    ("landmark_offset_frames", "landmark AV offset (frames)"),
    ("landmark_confidence", "landmark sync confidence"),
    ("openness_envelope_correlation", "openness-envelope correlation"),
    ("viseme_agreement", "viseme agreement"),
    ("lse_c", "LSE-C (our SyncNet)"),
    ("lse_v2_c", "LSE-C (syncnet_v2)"),
    ("mouth_to_face_sharpness", "mouth / face sharpness"),
    ("mouth_sharpness_ratio", "mouth sharpness vs source"),
    ("landmark_jitter", "landmark jitter"),
    ("mouth_flicker", "mouth flicker"),
    ("ssim", "SSIM"),
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


# --- inputs ---------------------------------------------------------------------------------------------
def load_scores(uri: str) -> pd.DataFrame:
    """scores.parquet, given the file or the `lipsync score` OUT directory holding it."""
    target = uri if uri.endswith(".parquet") else uri.rstrip("/") + "/scores.parquet"
    fs, path = fsspec.core.url_to_fs(target)
    if not fs.exists(path):
        raise BadInput(f"scores {target} do not exist (pass a `lipsync score` OUT or its scores.parquet)")
    with fs.open(path, "rb") as fh:
        frame = pd.read_parquet(fh)
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


# --- the overall score ----------------------------------------------------------------------------------
def _finite(series: pd.Series | None) -> np.ndarray:
    if series is None:
        return np.zeros(0)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


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


# --- tables ---------------------------------------------------------------------------------------------
def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict(orient="records")


def metric_table(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """{"columns": [...], "rows": [{"name", "values"}]}: counts and means of the table metrics per group."""
    summaries = {name: summarise(rows) for name, rows in groups.items()}
    present = [(k, label) for k, label in TABLE_METRICS if any(k in s for s in summaries.values())]
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


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as numbers (NaN where it is missing or not a number)."""
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")


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


# --- figures --------------------------------------------------------------------------------------------
def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overall_figure(scores: dict[str, dict[str, Any]]) -> str:
    """Bar chart of the overall score per system."""
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.0))
    bars = ax.bar(names, [scores[n]["overall"] for n in names], color="#4a7bb7")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(0, 100)
    ax.set_ylabel("overall lip-sync score")
    return _png(fig)


def offset_figure(frame: pd.DataFrame) -> str:
    """Histograms of the landmark (and SyncNet) AV offsets per system."""
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    columns = [c for c in ("landmark_offset_frames", "lse_offset_frames", "lse_v2_offset_frames") if c in ok]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.0 * len(columns), 3.2), squeeze=False)
    bins = np.arange(-15.5, 16.5, 1.0)
    for ax, column in zip(axes[0], columns, strict=True):
        for name, group in ok.groupby("system", sort=True):
            values = _finite(group[column])
            if len(values):
                ax.hist(values, bins=bins, alpha=0.6, label=str(name))
        ax.set_title(column.replace("_", " "))
        ax.set_xlabel("frames (> 0: audio lags)")
        ax.set_ylabel("clips")
        ax.legend(fontsize=8)
    return _png(fig)


def distribution_figure(frame: pd.DataFrame) -> str | None:
    """Box plots per language of every metric present."""
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    metrics = [(c, label) for c, label in DISTRIBUTIONS if c in ok and len(_finite(ok[c]))]
    if not metrics:
        return None
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 2.8 * rows), squeeze=False)
    languages = sorted(ok["language"].astype(str).unique())
    for ax, (column, label) in zip(axes.flat, metrics, strict=False):
        data = [_finite(ok[ok["language"] == lang][column]) for lang in languages]
        keep = [(lang, d) for lang, d in zip(languages, data, strict=True) if len(d)]
        ax.boxplot([d for _, d in keep], tick_labels=[lang for lang, _ in keep])
        ax.set_title(label, fontsize=10)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _zscore(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if len(finite) < 2 or finite.std() < 1e-9:
        return values * 0
    return (values - finite.mean()) / finite.std()


def traces_figure(worst: pd.DataFrame, fps: float = 25.0) -> str | None:
    """Measured mouth openness against the timeline's target openness for each of the worst clips."""
    import matplotlib.pyplot as plt

    clips = [r for r in _records(worst) if r.get("openness_trace") is not None and len(r["openness_trace"])]
    if not clips:
        return None
    fig, axes = plt.subplots(len(clips), 1, figsize=(11.0, 2.1 * len(clips)), squeeze=False)
    for ax, clip in zip(axes[:, 0], clips, strict=True):
        measured = np.array([np.nan if v is None else v for v in clip["openness_trace"]], float)
        t = np.arange(len(measured)) / fps
        ax.plot(t, _zscore(measured), label="mouth openness (landmarks)", color="#c0392b")
        timeline = clip.get("timeline_trace")
        if timeline is not None and len(timeline):
            target = np.array([np.nan if v is None else v for v in timeline], float)
            ax.plot(np.arange(len(target)) / fps, _zscore(target), label="timeline target", color="#2c7fb8")
        agreement = clip.get("viseme_agreement")
        title = f"{clip['id']} · {clip['system']} · {clip['language']} · offset {clip.get('landmark_offset_frames')}"
        if agreement is not None and np.isfinite(agreement):
            title += f" · viseme agreement {agreement:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("z-score")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    return _png(fig)


def figures(frame: pd.DataFrame, scores: dict[str, dict[str, Any]], worst: pd.DataFrame) -> dict[str, str]:
    """Every plot of the report as base64 PNG, by name (plots without data are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    out = {"overall_scores": overall_figure(scores)}
    if (frame["status"] == "ok").any():
        out["offset_histograms"] = offset_figure(frame)
    for name, make in (
        ("distributions", lambda: distribution_figure(frame)),
        ("worst_traces", lambda: traces_figure(worst)),
        ("baseline_strips", lambda: baseline_strips_figure(frame)),
    ):
        png = make()
        if png:
            out[name] = png
    return out


def baseline_strips_figure(frame: pd.DataFrame) -> str | None:
    """Mouth strips over time, generated vs the do-nothing baseline, with the audio envelope under them."""
    fig = baseline.strip_figure(frame)
    return _png(fig) if fig is not None else None


# --- rendering ------------------------------------------------------------------------------------------
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
    scores: str, out: str, mos: str | None = None, config_path: str | None = None, note: str | None = None
) -> dict[str, Any]:
    """Write OUT/report.json and OUT/report.html from a `lipsync score` output."""
    cfg = load_config(ReportConfig, config_path, {"note": note})
    frame = load_scores(scores)
    mos_systems = load_mos(mos) if mos else {}
    doc, worst = build_document(frame, scores, mos_systems, mos, cfg)
    doc["note"] = cfg.note
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

"""The report's plots as base64 PNGs (matplotlib, Agg): overall scores, offset histograms, metric
distributions, the worst clips' traces, the baseline strips and the emotion-consistency bars."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from evaluation import baseline

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def _finite(series: pd.Series | None) -> np.ndarray:
    if series is None:
        return np.zeros(0)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict(orient="records")


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as numbers (NaN where it is missing or not a number)."""
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")


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
        ("emotion", lambda: emotion_figure(frame)),
    ):
        png = make()
        if png:
            out[name] = png
    return out


def baseline_strips_figure(frame: pd.DataFrame) -> str | None:
    """Mouth strips over time, generated vs the do-nothing baseline, with the audio envelope under them."""
    fig = baseline.strip_figure(frame)
    return _png(fig) if fig is not None else None


def emotion_figure(frame: pd.DataFrame) -> str | None:
    """Share of the source's expression frames each system's outputs lose, per emotion tag: the lower face
    (what the generator repaints) beside the upper face (the control)."""
    import matplotlib.pyplot as plt

    if "expr_lower_lost" not in frame.columns or not _numeric(frame, "expr_lower_lost").notna().any():
        return None
    emotion = frame["emotion"].fillna("") if "emotion" in frame.columns else pd.Series("", index=frame.index)
    data = frame.assign(
        emotion=emotion.replace("", "untagged"),
        lower=_numeric(frame, "expr_lower_lost"),
        upper=_numeric(frame, "expr_upper_lost"),
    )
    means = data.groupby(["system", "emotion"])[["lower", "upper"]].mean().dropna(how="all")
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(means))
    ax.bar(x - 0.2, means["lower"], 0.4, label="lower face lost")
    ax.bar(x + 0.2, means["upper"], 0.4, label="upper face lost (control)")
    ax.set_xticks(x, [f"{s} / {e}" for s, e in means.index], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of frames")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)

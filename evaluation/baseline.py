"""The "do nothing" baseline beside every generated video, and what a person needs to see the difference.

For each pair that generation produced, the baseline is the source face video, unmodified, with the new
audio muxed in (looped to the audio's length, as generation does). `lipsync score` on generation's outputs
scores it as system `baseline` next to the generated video; every scored row also keeps a strip of mouth
crops over time (`mouth_strip`, a base64 PNG) and the audio envelope per frame (`envelope_trace`), so the
report can draw, per pair, generated vs baseline mouths with the audio envelope under them.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.storage import is_remote, manifest_path, manifest_text
from pipeline.media import MediaError, video_with_new_audio

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

BASELINE_SYSTEM = "baseline"
STRIP_FRAMES = 16
"""Mouth crops per strip, evenly spaced over the video."""
CROP_W, CROP_H = 48, 32
COMPARED = ("landmark_offset_frames", "openness_envelope_correlation", "viseme_agreement")
"""The sync bar's metrics: |offset| (lower is better), r and viseme agreement (higher is better)."""


# ---------------------------------------------------------------- baseline videos


def baseline_records(frame: pd.DataFrame, base: str, out: str) -> list[dict[str, Any]]:
    """Manifest records of the baseline videos of a generation outputs table (written under OUT/baseline/);
    pairs that failed, or without a source video and audio, get none."""
    if is_remote(out):
        log.warning("score: no baseline videos when OUT is remote (%s)", out)
        return []
    records = []
    for record in frame.to_dict(orient="records"):
        video, audio = manifest_path(base, record.get("video")), manifest_path(base, record.get("audio"))
        ok = manifest_text(record.get("status")).lower() in ("", "ok")
        if not (ok and video and audio and manifest_text(record.get("output"))):
            continue
        name = manifest_text(record.get("id")) or os.path.splitext(os.path.basename(video))[0]
        target = os.path.join(os.path.abspath(out), "baseline", f"{name}.mp4")
        try:
            video_with_new_audio(video, audio, target)
        except MediaError as exc:
            log.warning("score: %s", exc)
            continue
        kept = {k: v for k, v in record.items() if k not in ("output", "audio", "system", "status", "reason")}
        # no split: a baseline row must never feed calibration (`lipsync score --calibration-out`)
        records.append({**kept, "video": target, "source": video, "system": BASELINE_SYSTEM, "split": ""})
    return records


# ---------------------------------------------------------------- per-row pictures and traces


def mouth_strip(frames: np.ndarray, landmarks: np.ndarray, n: int = STRIP_FRAMES) -> dict[str, Any]:
    """`n` mouth crops evenly spaced over the video, side by side, as a base64 PNG, with their frame indices
    (frames without a face are grey)."""
    from PIL import Image

    from pipeline.landmarks import LIPS_POINTS, inter_ocular

    idx = np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int))
    strip = np.full((CROP_H, CROP_W * len(idx), 3), 128, np.uint8)
    for j, i in enumerate(idx):
        lips = landmarks[i, list(LIPS_POINTS), :2]
        scale = float(inter_ocular(landmarks[i]))
        if not np.isfinite(lips).all() or not np.isfinite(scale) or scale <= 0:
            continue
        cx, cy = lips.mean(axis=0)
        half_w, half_h = 0.6 * scale, 0.4 * scale
        h, w = frames.shape[1:3]
        box = (
            int(max(0, cx - half_w)),
            int(max(0, cy - half_h)),
            int(min(w, cx + half_w)),
            int(min(h, cy + half_h)),
        )
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        crop = Image.fromarray(frames[i, box[1] : box[3], box[0] : box[2]]).resize((CROP_W, CROP_H))
        strip[:, j * CROP_W : (j + 1) * CROP_W] = np.asarray(crop)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return {
        "mouth_strip": base64.b64encode(buf.getvalue()).decode("ascii"),
        "mouth_strip_frames": idx.tolist(),
    }


def envelope_trace(pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float, limit: int) -> list[float]:
    """The audio's log-RMS envelope per video frame (what openness is correlated with), first `limit`."""
    from pipeline.offset import audio_envelope

    env = audio_envelope(pcm, sample_rate, n_frames, fps)[:limit]
    return [round(float(v), 4) for v in env]


# ---------------------------------------------------------------- the report's side


def _is_baseline(frame: pd.DataFrame) -> pd.Series:
    return frame["system"].fillna("") == BASELINE_SYSTEM


def pairs(frame: pd.DataFrame) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(generated row, baseline row) for every id scored both ways (status ok)."""
    if "system" not in frame or not _is_baseline(frame).any():
        return []
    ok = frame[frame["status"] == "ok"]
    base = {r["id"]: r for r in ok[_is_baseline(ok)].to_dict(orient="records")}
    return [(r, base[r["id"]]) for r in ok[~_is_baseline(ok)].to_dict(orient="records") if r["id"] in base]


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def comparison(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per language (and system): generated vs baseline means of the sync bar's metrics, and whether the
    generated video is better on each (|offset| lower; r and viseme agreement higher)."""
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for gen, base in pairs(frame):
        groups.setdefault((str(gen.get("system")), str(gen.get("language"))), []).append((gen, base))
    out = []
    for (system, language), members in sorted(groups.items()):
        entry: dict[str, Any] = {"system": system, "language": language, "videos": len(members)}
        for key in COMPARED:
            signed = (lambda v: abs(v)) if key == "landmark_offset_frames" else (lambda v: v)
            g = [signed(v) for gen, _ in members if (v := _value(gen, key)) is not None]
            b = [signed(v) for _, base in members if (v := _value(base, key)) is not None]
            name = "abs_offset" if key == "landmark_offset_frames" else key
            gm, bm = (float(np.mean(g)) if g else None), (float(np.mean(b)) if b else None)
            entry[name] = {"generated": gm, "baseline": bm}
            if gm is not None and bm is not None:
                entry[name]["generated_better"] = gm < bm if name == "abs_offset" else gm > bm
        out.append(entry)
    return out


def _strip_image(row: dict[str, Any]) -> np.ndarray | None:
    from PIL import Image

    data = row.get("mouth_strip")
    if not isinstance(data, str) or not data:
        return None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def strip_figure(frame: pd.DataFrame, max_pairs: int = 6) -> Figure | None:
    """Per pair: the generated video's mouth strip, the baseline's, and the audio envelope under them."""
    import matplotlib.pyplot as plt

    chosen = [(g, b) for g, b in pairs(frame) if _strip_image(g) is not None and _strip_image(b) is not None]
    chosen = chosen[:max_pairs]
    if not chosen:
        return None
    fig, axes = plt.subplots(3 * len(chosen), 1, figsize=(10, 2.6 * len(chosen)), squeeze=False)
    for k, (gen, base) in enumerate(chosen):
        for j, (row, label) in enumerate(((gen, str(gen.get("system"))), (base, "baseline (do nothing)"))):
            ax = axes[3 * k + j, 0]
            ax.imshow(_strip_image(row))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if j == 0:
                r = _value(gen, "openness_envelope_correlation")
                rb = _value(base, "openness_envelope_correlation")
                ax.set_title(
                    f"{gen['id']} ({gen.get('language')}): openness-envelope r {r if r is None else round(r, 2)}"
                    f" generated vs {rb if rb is None else round(rb, 2)} baseline",
                    fontsize=9,
                )
        ax = axes[3 * k + 2, 0]
        trace = gen.get("envelope_trace")
        env = np.array([np.nan if v is None else v for v in (trace if trace is not None else [])], float)
        frames = gen.get("mouth_strip_frames")
        frames = list(frames) if frames is not None else []
        if len(env):
            ax.plot(np.arange(len(env)), env, lw=0.8, color="tab:blue")
            for f in frames:
                ax.axvline(f, color="0.8", lw=0.5)
            ax.set_xlim(-0.5, max(len(env), (frames[-1] + 1) if frames else 1) - 0.5)
        ax.set_ylabel("audio\nenvelope", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xlabel("frame (grey lines: the crops above)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the sync bar (issue 27's "done")

BAR = {"abs_offset": 1.0, "openness_envelope_correlation": 0.5, "viseme_agreement": 0.8}
"""A generated video passes when its landmark AV offset is within ±1 frame with a confident meter, its
openness-envelope correlation is at least 0.5 and its viseme agreement at least 0.8 (and, per language, the
baseline is worse on each)."""


def passes_bar(row: dict[str, Any]) -> bool:
    """One scored row against BAR (the meter must not have abstained)."""
    offset, r, viseme = (_value(row, k) for k in COMPARED)
    confident = str(row.get("landmark_abstained")).lower() in ("false", "0")
    return bool(
        confident
        and offset is not None
        and abs(offset) <= BAR["abs_offset"]
        and r is not None
        and r >= BAR["openness_envelope_correlation"]
        and viseme is not None
        and viseme >= BAR["viseme_agreement"]
    )


def sync_bar(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per language: every generated video passes BAR and the baseline is worse on each metric."""
    by_language: dict[str, dict[str, Any]] = {}
    compared = {(c["system"], c["language"]): c for c in comparison(frame)}
    for gen, _ in pairs(frame):
        language = str(gen.get("language"))
        entry = by_language.setdefault(language, {"videos": 0, "passed": 0})
        entry["videos"] += 1
        entry["passed"] += int(passes_bar(gen))
        c = compared.get((str(gen.get("system")), language), {})
        entry["baseline_worse_on_each"] = all(c.get(k, {}).get("generated_better") is True for k in BAR)
    for entry in by_language.values():
        entry["pass"] = entry["passed"] == entry["videos"] and entry["baseline_worse_on_each"]
    return by_language

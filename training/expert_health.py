"""Expert health: is the SyncNet expert learning, and if not, what in the data is the likely cause?

The field's most reported training failure is an expert SyncNet stuck at BCE ≈ ln 2 = 0.69 (Rudrabha/Wav2Lip
issues #55, #195, #296, #318; LatentSync #309). At every evaluation the SyncNet job reports, beside its val
loss and accuracy, where the true offset ranks among mel shifts of -5..5 frames on the val clips
(`offset_rank_mean`, 1 is best; `offset_first_share`). When val loss is still >= STUCK_LOSS at or after
`stuck_after_steps`, it logs (and the command's --json returns) a warning naming the usual causes with what
the data card (clips.parquet) says about each: the share of clips with |AV offset| > 1 frame, the fps, the
number of speakers and the face size.

The generator job refuses an expert whose recorded val loss is above EXPERT_GATE (the reference's 0.75,
the loss below which hq_wav2lip_train.py switches the sync loss on) unless told otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from core.errors import BadInput

log = logging.getLogger(__name__)

STUCK_LOSS = 0.68
"""Val BCE at or above this is "stuck at chance" (ln 2 = 0.693)."""
EXPERT_GATE = 0.75
"""The reference's sync threshold: an expert above it does not know sync well enough to teach it."""
RECENT = 3
"""Evaluations averaged for the stuck test (`val_loss_recent`): one evaluation of a few val clips moves by
a few hundredths, enough to cross 0.68 either way by chance."""
RANK_WINDOWS = 48
"""Windows per val clip whose in-sync probabilities are averaged per shift: on the demo's expert at step
250, 12 windows ranked the true offset first on 7 of 9 val clips, 24 on 8, 48 (about every other frame of a
4-s clip) on 9: fewer windows measure noise."""
SHIFTS = tuple(range(-5, 6))
"""Mel shifts (video frames) the true offset is ranked among."""
MAX_OFFSET_OK = 1
"""|AV offset| above this many frames counts as out of sync in the data card."""
TYPICAL_FPS = 25.0
MIN_SPEAKERS = 3
MIN_FACE_PX = 64.0


# ---------------------------------------------------------------- the data card


def data_card(data: str) -> dict[str, Any]:
    """What clips.parquet of a preprocessed corpus says about the usual causes of a stuck expert."""
    from training.data import read_clips

    clips = read_clips(data)
    train = clips[clips["split"] == "train"] if "split" in clips else clips
    offsets = clips["av_offset_frames"].fillna(0).abs()
    fps = sorted({round(float(f), 3) for f in clips["fps"].dropna()}) if "fps" in clips else []
    return {
        "clips": len(clips),
        "offset_share": float((offsets > MAX_OFFSET_OK).mean()) if len(clips) else 0.0,
        "median_abs_offset": float(offsets.median()) if len(clips) else 0.0,
        "fps": fps,
        "speakers": int(train["speaker"].nunique()) if "speaker" in train else 0,
        "face_size": float(clips["face_size"].median()) if "face_size" in clips and len(clips) else None,
    }


def causes(card: dict[str, Any]) -> list[str]:
    """One line per usual cause, with the data card's figure and whether it looks like the culprit."""
    share = card.get("offset_share", 0.0)
    fps = card.get("fps") or []
    speakers = card.get("speakers", 0)
    face = card.get("face_size")
    return [
        f"AV offset: {share:.0%} of clips have |offset| > {MAX_OFFSET_OK} frame (median "
        f"{card.get('median_abs_offset', 0):g})"
        + (
            " - LIKELY CAUSE: re-run preprocess with align.mode: repair, or train with windows.correct_offset"
            if share > 0.2
            else " - fine"
        ),  # fmt: skip
        f"fps: {', '.join(f'{f:g}' for f in fps) or 'unknown'}"
        + (
            " - fine"
            if fps and all(abs(f - TYPICAL_FPS) < 0.5 for f in fps)
            else f" - expected {TYPICAL_FPS:g}"
        ),
        f"speakers (train): {speakers}"
        + (
            " - fine"
            if speakers >= MIN_SPEAKERS
            else f" - few; the expert may memorise faces (>= {MIN_SPEAKERS})"
        ),
        "face size: "
        + (f"{face:.0f} px median" if face is not None else "unknown")
        + (
            " - fine"
            if face is not None and face >= MIN_FACE_PX
            else f" - small mouths (< {MIN_FACE_PX:g} px)"
        ),
        "also: too few steps or too high a learning rate (the reference's expert needs thousands of steps)",
    ]


def stuck_warning(step: int, val_loss: float | None, after: int | None, card: dict[str, Any]) -> str | None:
    """The warning text when val loss (the mean of the last RECENT evaluations) is still >= STUCK_LOSS at or
    after step `after` (None: never)."""
    if after is None or val_loss is None or step < after or val_loss < STUCK_LOSS:
        return None
    return (
        f"expert SyncNet is stuck: val loss {val_loss:.3f} >= {STUCK_LOSS} at step {step} (chance is 0.693). "
        "Usual causes, and what the data card says: " + "; ".join(causes(card))
    )


# ---------------------------------------------------------------- offset ranking on val clips


def true_shift(row: dict[str, Any], correct_offset: bool) -> int:
    """The mel shift the training windows call in sync (training.data: the clip's offset when corrected)."""
    return int(row.get("av_offset_frames") or 0) if correct_offset else 0


def clip_windows(
    row: dict[str, Any], img_size: int, windows: int = RANK_WINDOWS
) -> tuple[Any, list[Any]] | None:
    """(face windows, mel windows per shift in SHIFTS) of `windows` evenly spaced windows of a clip, as
    tensors; None when the clip is too short for every shift. Decoded once per clip and kept by `Health`."""
    import torch

    from models.frames import SYNC_FRAMES, sync_faces, to_model_frames
    from pipeline.audio import mel_window
    from pipeline.shards import decode_crops, decode_mel
    from training.data import valid_starts

    frames = to_model_frames(decode_crops(row), img_size)
    mel, fps = decode_mel(row), float(row.get("fps") or 25.0)
    starts = valid_starts(int(row["n_frames"]), int(row["mel_frames"]))
    lo, hi = max(SHIFTS), int(starts.max()) - max(SHIFTS) if len(starts) else 0
    starts = starts[(starts >= lo) & (starts <= hi)]
    if not len(starts):
        return None
    starts = starts[np.unique(np.linspace(0, len(starts) - 1, windows).round().astype(int))]
    faces = (
        torch.from_numpy(np.stack([sync_faces(frames[s : s + SYNC_FRAMES]) for s in starts])).float() / 255
    )
    mels = [torch.from_numpy(np.stack([mel_window(mel, s + k, fps)[None] for s in starts])) for k in SHIFTS]
    return faces, mels


def clip_shift_scores(
    model: Any, row: dict[str, Any], windows: int = RANK_WINDOWS, cached: Any = None
) -> np.ndarray:
    """Mean in-sync probability of `windows` evenly spaced windows of a clip for each mel shift in SHIFTS."""
    import torch

    from models.syncnet import sync_probability

    inputs = cached if cached is not None else clip_windows(row, model.img_size, windows)
    if inputs is None:
        return np.full(len(SHIFTS), np.nan)
    param = next(model.parameters())
    faces = inputs[0].to(param.device)
    scores = []
    with torch.no_grad():
        face = model.embed_faces(faces).float()  # the faces are the same at every shift: embedded once
        for mels in inputs[1]:
            audio = model.embed_audio(mels.to(param.device)).float()
            scores.append(float(sync_probability(audio, face).mean()))
    return np.array(scores)


def offset_ranks(
    model: Any, rows: Iterable[dict[str, Any]], correct_offset: bool = False, cache: dict | None = None
) -> list[int]:
    """Per clip, the rank (1 = best) of the true shift among SHIFTS by mean in-sync probability; clips too
    short for every shift, or whose true shift lies outside SHIFTS, are left out."""
    ranks = []
    for row in rows:
        truth = true_shift(row, correct_offset)
        if cache is not None and row["clip_id"] not in cache:
            cache[row["clip_id"]] = clip_windows(row, model.img_size)
        scores = clip_shift_scores(
            model, row, cached=cache.get(row["clip_id"]) if cache is not None else None
        )
        if truth not in SHIFTS or np.isnan(scores).any():
            continue
        ranks.append(1 + int((scores > scores[SHIFTS.index(truth)]).sum()))
    return ranks


def rank_metrics(ranks: list[int]) -> dict[str, float]:
    """`offset_rank_mean` (1 is best) and `offset_first_share` of the val clips."""
    if not ranks:
        return {}
    return {
        "offset_rank_mean": float(np.mean(ranks)),
        "offset_first_share": float(np.mean(np.array(ranks) == 1)),
    }


# ---------------------------------------------------------------- the SyncNet job's side


class Health:
    """Run on every worker of the SyncNet job; rank 0 ranks offsets on the val clips and warns once."""

    def __init__(self, setup: dict[str, Any] | None, cfg: Any, rank: int) -> None:
        self.setup, self.cfg, self.enabled = setup or {}, cfg, rank == 0 and bool(setup)
        self._rows: list[dict[str, Any]] | None = None
        self.warned = False
        self.losses: list[float] = []
        self.windows: dict[str, Any] = {}  # clip_id -> its decoded windows (decoded once, not per evaluation)

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            from training.data import read_shard_clips

            ids = self.setup.get("val_clip_ids", [])
            self._rows = sorted(
                (
                    r
                    for uri in self.setup.get("val_shards", [])
                    for r in read_shard_clips(uri, ids).to_pylist()
                ),
                key=lambda r: r["clip_id"],
            )
        return self._rows

    def evaluate(self, model: Any, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Offset-rank metrics for this evaluation (rank 0 only); logs the stuck warning the first time."""
        if not self.enabled:
            return {}
        from training.distributed import unwrap

        module = unwrap(model).eval()
        out = rank_metrics(offset_ranks(module, self.rows(), self.cfg.windows.correct_offset, self.windows))
        if metrics.get("val_loss") is not None:
            self.losses.append(float(metrics["val_loss"]))
            out["val_loss_recent"] = float(np.mean(self.losses[-RECENT:]))
        recent = out.get("val_loss_recent")
        warning = stuck_warning(step, recent, self.cfg.stuck_after_steps, self.setup["card"])
        if warning and not self.warned:
            self.warned = True
            log.warning(warning)
            print(f"WARNING: {warning}", file=sys.stderr)
        return out


def job_setup(data: str, cfg: Any) -> dict[str, Any]:
    """Driver side: the data card and the val clips the workers rank offsets on (eval_clips of them)."""
    from training.config import with_defaults
    from training.streams import select_splits

    _, val = select_splits(data, with_defaults(cfg))
    return {"card": data_card(data), "val_clip_ids": list(val.clip_ids), "val_shards": list(val.shard_files)}


def job_summary(result: dict[str, Any], cfg: Any, setup: dict[str, Any]) -> dict[str, Any]:
    """The `health` entry of the SyncNet command's result: final val figures, the data card, the warning."""
    metrics = result.get("metrics", {})
    warning = stuck_warning(
        int(result.get("step", 0)),
        metrics.get("val_loss_recent", metrics.get("val_loss")),
        cfg.stuck_after_steps,
        setup["card"],
    )
    if warning:
        log.warning(warning)
    keys = ("val_loss", "val_loss_recent", "val_accuracy", "offset_rank_mean", "offset_first_share")
    return {
        **{k: metrics[k] for k in keys if k in metrics},
        "stuck_after_steps": cfg.stuck_after_steps,
        "data_card": setup["card"],
        "warning": warning,
    }


# ---------------------------------------------------------------- the generator job's side


def gate_expert(metrics: dict[str, Any], uri: str, max_val_loss: float | None) -> None:
    """BadInput (one line) when the expert's recorded val loss is above `max_val_loss` (None: no gate)."""
    val = metrics.get("val_loss")
    if max_val_loss is None:
        return
    if val is None:
        log.warning("expert %s records no val loss; it cannot be checked against %.2f", uri, max_val_loss)
        return
    if float(val) > max_val_loss:
        raise BadInput(
            f"the expert SyncNet {uri} has val loss {float(val):.3f} > {max_val_loss:g}: it has not learnt sync "
            "and would teach the generator noise; train it longer (see its health warning), or pass "
            "--allow-weak-expert (expert_max_val_loss: null) to use it anyway"
        )

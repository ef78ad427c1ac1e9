"""Scoring's configuration and the statuses and reasons its rows carry."""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.sync import (
    CLOSED_BELOW,
    OPEN_ABOVE,
)
from pipeline.preprocess_config import PoolConfig

OK_STATUSES = ("", "ok", "done", "success", "succeeded")


NO_FACE = "no_face"


TOO_SHORT = "too_short"


MIN_FRAMES = 8  # fewer video (or audio) frames than this cannot be scored


@dataclass(frozen=True)
class ScoreConfig:
    """What `lipsync score` measures and how the actor pool is sized."""

    fps: float = 25.0
    sample_rate: int = 16000
    max_side: int = 640  # frames are decoded at most this large (longer side)
    max_seconds: float = 120.0  # longer videos are scored on their first max_seconds
    max_lag: int = 15  # landmark AV offset search range (frames)
    vshift: int = 15  # SyncNet offsets searched (frames), as the reference evaluation
    syncnet_batch: int = 32
    closed_below: float = CLOSED_BELOW
    open_above: float = OPEN_ABOVE
    quality_frames: int = 50  # frames sampled for PSNR/SSIM and sharpness
    trace_frames: int = 750  # per-frame traces kept per row for the report (30 s at 25 fps)
    system: str = ""  # system name of rows without a `system` column ("" = the input's name)
    # which meter's offsets calibrate generation: landmarks, syncnet_v2 (lse_v2_* columns, needs
    # --syncnet-v2) or expert (lse_* columns, needs --syncnet); rows it abstains on are left out
    calibration_meter: str = "landmarks"
    calibration_min_confidence: float | None = None  # None: the meter's own threshold
    calibration_min_clips: int = 3  # languages / speakers with fewer validation clips get no entry
    calibration_used: str = ""  # the calibration the scored videos were generated with (default: none)
    expression: bool = True  # expr_* columns: the face's expression and, with a source, how well it is kept
    baseline: bool = True  # generation outputs: also score the "do nothing" video (source + new audio)
    # one video per call: an actor holds a whole decoded video (up to max_seconds), so calls do not overlap
    resources: PoolConfig = field(default_factory=PoolConfig)

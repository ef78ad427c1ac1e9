"""Sync meters: the readings of a clip's AV offset that alignment, generation, calibration and
`lipsync offset` act on.

- ``landmarks`` (the default): the model-free meter of :mod:`pipeline.offset` (lip shape against the audio
  spectrum). Needs no weights; its confidence threshold was calibrated on real clips.
- ``syncnet_v2``: the field's standard network (joonson/syncnet_python's ``syncnet_v2.model``, which the
  user supplies) run with SyncNet's own protocol (:mod:`pipeline.lse`): offset = the shift of the smallest
  mean embedding distance, confidence = LSE-C. Its default threshold is LatentSync's sync filter's (3).
- ``expert``: a SyncNet checkpoint this project trained on the user's corpus (``lipsync train syncnet``),
  with the same protocol on its own crops and mels.

Every meter returns a :class:`pipeline.offset.OffsetEstimate` in the clip's frames, with the DESIGN.md
sign (> 0: the audio lags), and abstains (``reason``) rather than hand over a reading below its threshold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from core.errors import BadInput
from pipeline.landmarks import lip_shape
from pipeline.offset import DEFAULT_MIN_CONFIDENCE, LOW_CONFIDENCE, NO_FACE, OffsetEstimate, estimate_offset

METERS = ("landmarks", "syncnet_v2", "expert")
DEFAULT_THRESHOLDS = {
    "landmarks": DEFAULT_MIN_CONFIDENCE,
    "syncnet_v2": 3.0,  # LatentSync's data filter keeps clips with SyncNet confidence >= 3
    # Our expert's embeddings are unit vectors (distances 0..2), so its LSE-C is on another scale than
    # syncnet_v2's; 0.1 separated in-sync from shifted val clips of the demo's expert. Calibrate it on
    # your own corpus (`lipsync offset --meter expert` on shifted copies of a few clips).
    "expert": 0.1,
}


class Signals(NamedTuple):
    """What a meter reads: the clip's frames (None for the landmark meter), landmarks and audio."""

    frames: np.ndarray | None
    landmarks: np.ndarray
    pcm: np.ndarray
    sample_rate: int
    fps: float


class SyncMeter(ABC):
    name: str
    min_confidence: float
    needs_frames: bool  # False: `frames` may be None

    def measure(
        self,
        frames: np.ndarray | None,
        landmarks: np.ndarray,
        pcm: np.ndarray,
        sample_rate: int,
        fps: float,
        max_lag: int = 15,
    ) -> OffsetEstimate:
        """The clip's AV offset within ±max_lag frames, or an abstention (``reason``)."""
        return self._estimate(Signals(frames, landmarks, pcm, sample_rate, fps), max_lag)

    @abstractmethod
    def _estimate(self, clip: Signals, max_lag: int) -> OffsetEstimate: ...


@dataclass(frozen=True)
class MeterConfig:
    """Which meter, its weights (for syncnet_v2 / expert) and its confidence threshold (None: its default)."""

    meter: str = "landmarks"
    weights: str | None = None
    min_confidence: float | None = None

    def validate(self, key: str = "meter") -> None:
        """BadInput naming the setting when the meter is unknown or lacks its weights."""
        if self.meter not in METERS:
            raise BadInput(f"{key}: unknown meter {self.meter!r}; choose one of {', '.join(METERS)}")
        if self.meter != "landmarks" and not self.weights:
            raise BadInput(f"{key}: the {self.meter} meter needs weights (a file path or URI)")

    @property
    def threshold(self) -> float:
        return DEFAULT_THRESHOLDS[self.meter] if self.min_confidence is None else float(self.min_confidence)


class LandmarkMeter(SyncMeter):
    """The model-free meter on smoothed landmarks (pipeline.offset)."""

    name = "landmarks"
    needs_frames = False

    def __init__(self, min_confidence: float | None = None) -> None:
        self.min_confidence = DEFAULT_MIN_CONFIDENCE if min_confidence is None else float(min_confidence)

    def _estimate(self, clip: Signals, max_lag: int) -> OffsetEstimate:
        shape = lip_shape(clip.landmarks)
        return estimate_offset(shape, clip.pcm, clip.sample_rate, clip.fps, max_lag, self.min_confidence)


class NetworkMeter(SyncMeter):
    """A SyncNet (syncnet_v2 or our expert) with SyncNet's evaluation protocol: offset and LSE-C."""

    needs_frames = True

    def __init__(self, name: str, embedder, min_confidence: float) -> None:  # noqa: ANN001
        self.name = name
        self.embedder = embedder
        self.min_confidence = float(min_confidence)

    def _estimate(self, clip: Signals, max_lag: int) -> OffsetEstimate:
        from pipeline.lse import lse_of_clip, window_count

        frames, landmarks, pcm, sample_rate, fps = clip
        if frames is None:
            raise ValueError(f"the {self.name} meter needs the frames")
        if not np.isfinite(landmarks[:, 0, 0]).any():
            return OffsetEstimate(0, 0.0, reason=NO_FACE, meter=self.name, min_confidence=self.min_confidence)
        if window_count(len(frames), len(pcm), sample_rate, fps) < 2 * max_lag + 1:
            max_lag = max(1, (window_count(len(frames), len(pcm), sample_rate, fps) - 1) // 2)
        result = lse_of_clip(self.embedder, frames, _filled(landmarks), pcm, sample_rate, fps, vshift=max_lag)
        distances = np.asarray(result.mean_distances)
        return OffsetEstimate(
            offset_frames=result.av_offset_frames,
            confidence=result.lse_c,
            peak_correlation=-result.lse_d,
            correlations=tuple(float(-d) for d in distances),  # higher is better, as for every meter
            min_confidence=self.min_confidence,
            reason="" if result.lse_c >= self.min_confidence else LOW_CONFIDENCE,
            meter=self.name,
            curve_fps=fps,
        )


def _filled(landmarks: np.ndarray) -> np.ndarray:
    """Frames without a face take the nearest face frame's landmarks (the crop needs a box everywhere)."""
    found = np.isfinite(landmarks[:, 0, 0])
    if found.all():
        return landmarks
    index = np.flatnonzero(found)
    nearest = index[np.clip(np.searchsorted(index, np.arange(len(found))), 0, len(index) - 1)]
    return landmarks[nearest]


def build_meter(cfg: MeterConfig) -> SyncMeter:
    """The meter a config names, with its weights loaded (BadInput when they cannot be)."""
    cfg.validate()
    if cfg.meter == "landmarks":
        return LandmarkMeter(cfg.threshold)
    from pipeline.lse import SyncNetEmbedder, SyncNetV2Embedder

    embedder = SyncNetV2Embedder(cfg.weights) if cfg.meter == "syncnet_v2" else SyncNetEmbedder(cfg.weights)
    return NetworkMeter(cfg.meter, embedder, cfg.threshold)

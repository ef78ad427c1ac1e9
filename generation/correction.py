"""AV-offset correction of a finished output: measure with the configured meter, shift the audio only
when the meter is confident and the re-measured offset moves toward 0."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from generation.composite import downscaled
from generation.config import GenerateConfig, PostprocessConfig
from generation.rows import unpack
from pipeline.audio import SAMPLE_RATE
from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
from pipeline.media import (
    read_frames,
)
from pipeline.meters import SyncMeter
from pipeline.offset import OffsetEstimate, estimate_offset


def _offset_measure(
    cfg: GenerateConfig,
    chunks: list[dict[str, Any]],
    pcm: np.ndarray,
    fps: float,
    meter: SyncMeter | None,
    tracker: FaceMeshTracker | None,
) -> tuple[Callable[[int], Any], int]:
    """(measure(shift) for correct_offset, frames it reads) over the output's opening seconds."""
    if meter is None or not meter.needs_frames:
        # The measured chunks are the first ones (CompositeStage.measured): the output's opening seconds.
        lips = np.concatenate([unpack(c["lips"]) for c in chunks if c["lips"]])
        pcm = pcm[: int(round(len(lips) / fps * SAMPLE_RATE))]
        return lip_shape_measure(lips, pcm, SAMPLE_RATE, fps, cfg.post), len(lips)
    limit = cfg.post.measure_seconds
    measured = [c for c in chunks if limit <= 0 or c["start"] < limit * fps]
    frames = np.concatenate(
        [downscaled(read_frames(c["part"], fps=None), cfg.track_max_side) for c in measured]
    )
    track = tracker.track(frames, fps)
    landmarks = smooth_landmarks(track.landmarks, track.found)
    pcm = pcm[: int(round(len(frames) / fps * SAMPLE_RATE))]
    return frames_measure(meter, frames, landmarks, pcm, SAMPLE_RATE, fps, cfg.post), len(frames)


@dataclass(frozen=True)
class OffsetCorrection:
    """The output's AV offset before and after shifting its audio by `shift_frames` (advance if > 0)."""

    before: OffsetEstimate
    after: OffsetEstimate
    shift_frames: int


def correct_offset(
    measure: Callable[[int], OffsetEstimate], n_frames: int, fps: float, cfg: PostprocessConfig
) -> OffsetCorrection:
    """Decide the audio shift that cancels the output's AV offset.

    `measure(shift)` reads the offset with the audio advanced by `shift` frames (0: as generated). The
    audio is shifted only when the first reading is confident, long enough and within the configured
    range, and only when the reading after the shift is closer to 0 than before: a correction never
    moves the measured offset away from sync.
    """
    before = measure(0)
    d = before.offset_frames
    long_enough = n_frames >= cfg.min_seconds * fps
    if not (
        cfg.correct_offset
        and before.confident
        and long_enough
        and cfg.min_abs_offset <= abs(d) <= cfg.max_abs_offset
    ):
        return OffsetCorrection(before, before, 0)
    after = measure(d)
    if abs(after.offset_frames) >= abs(d):
        return OffsetCorrection(before, after, 0)
    return OffsetCorrection(before, after, d)


def lip_shape_measure(
    lips: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, cfg: PostprocessConfig
) -> Callable[[int], OffsetEstimate]:
    """`measure(shift)` for correct_offset from the output's lip shape (the landmark meter)."""

    def measure(shift: int) -> OffsetEstimate:
        mouth, audio = advance_audio(lips, pcm, sample_rate, fps, shift)
        return estimate_offset(mouth, audio, sample_rate, fps, cfg.max_lag, min_confidence=cfg.threshold)

    return measure


def frames_measure(
    meter: SyncMeter,
    frames: np.ndarray,
    landmarks: np.ndarray,
    pcm: np.ndarray,
    sample_rate: int,
    fps: float,
    cfg: PostprocessConfig,
) -> Callable[[int], OffsetEstimate]:
    """`measure(shift)` for correct_offset from the output's frames and landmarks (a network meter)."""

    def measure(shift: int) -> OffsetEstimate:
        index, audio = advance_audio(np.arange(len(frames)), pcm, sample_rate, fps, shift)
        return meter.measure(frames[index], landmarks[index], audio, sample_rate, fps, cfg.max_lag)

    return measure


def advance_audio(
    signal: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame signal and PCM with the audio advanced by `frames` (< 0 delays), both cut to the overlap.

    Cutting instead of padding keeps digital silence (log energy -inf) out of the re-estimate.
    """
    shift = int(round(abs(frames) * sample_rate / fps))
    if frames > 0:
        return signal[: len(signal) - frames], pcm[shift:]
    if frames < 0:
        return signal[-frames:], pcm[: max(0, len(pcm) - shift)]
    return signal, pcm

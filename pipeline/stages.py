"""Preprocessing stages: probe → ffmpeg normalise → landmarks → track/smooth → aligned crops → mel →
AV offset → filters, for one input at a time.

Each stage is a small class (expensive set-up in `__init__`, work in `__call__`); `ClipPreprocessor`
chains them inside one Ray actor so decoded frames never enter the object store, and writes the input's
shard and its completion record itself. The logic lives in plain functions in media/landmarks/crops/
audio/offset/filters; the same classes run without Ray in tests (`ClipPreprocessor(cfg, out)(batch)`)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ItemFailure
from pipeline import filters
from pipeline.crops import crop_boxes, crop_faces, landmarks_in_crop
from pipeline.landmarks import (
    FaceMeshTracker,
    FaceTrack,
    scene_cuts,
    split_segments,
)
from pipeline.media import (
    MediaError,
    ProbeInfo,
    ReadAhead,
    iter_frames,
    local_path,
    probe,
    read_audio,
)
from pipeline.meters import build_meter
from pipeline.offset import OffsetEstimate
from pipeline.preprocess_config import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """An input after probing, its audio decoding in the background (frames are streamed separately)."""

    source_row: dict[str, Any]
    path: str
    info: ProbeInfo
    audio: Future  # of the 16 kHz mono PCM, or of AudioStage's ItemFailure
    size: tuple[int, int]  # decode size (w, h)
    scale: float  # decode size / source size
    sample_rate: int

    @property
    def pcm(self) -> np.ndarray:
        """The audio (waits for its decoding; raises its ItemFailure)."""
        return self.audio.result()

    @functools.cached_property
    def row(self) -> dict[str, Any]:
        """The manifest row with the transcript's cadence, which needs the audio's length."""
        cadence = transcript_cadence(self.source_row, self.pcm, self.sample_rate)
        return {**self.source_row, "phonemes_per_second": cadence}


class ProbeStage:
    """ffprobe the input; reject unreadable files, audio-only files, missing audio and 1-frame videos."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, row: dict[str, Any], path: str) -> ProbeInfo:
        try:
            info = probe(path)
        except MediaError as exc:
            raise ItemFailure("probe", exc.reason, str(exc).replace(path, row["video"])) from exc
        if not info.has_audio and not row.get("audio"):
            raise ItemFailure("probe", filters.NO_AUDIO, f"{row['video']}: no audio stream")
        if info.duration_s < self.cfg.filters.min_seconds:
            raise ItemFailure(
                "probe",
                filters.TOO_SHORT,
                f"{row['video']}: {info.duration_s:.2f} s < {self.cfg.filters.min_seconds} s",
            )
        return info


class AudioStage:
    """Decode the audio (the video's own track or the manifest's `audio` column) to 16 kHz mono."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, row: dict[str, Any], video_path: str, video_info: ProbeInfo | None = None
    ) -> np.ndarray:
        source = row.get("audio") or ""
        try:
            if source:
                with local_path(source) as audio_path:
                    pcm = read_audio(audio_path, self.cfg.sample_rate)
            else:
                pcm = read_audio(video_path, self.cfg.sample_rate, info=video_info)
        except MediaError as exc:
            raise ItemFailure(
                "audio", exc.reason, f"{source or row['video']}: {exc.reason} ({exc.detail})"
            ) from exc
        level = filters.rms_dbfs(pcm)
        if level < self.cfg.filters.silence_dbfs:
            raise ItemFailure("audio", filters.SILENT_AUDIO, f"{row['video']}: audio at {level:.1f} dBFS")
        return pcm


class NormaliseStage:
    """ffmpeg decode at a constant 25 fps, rotation applied, scaled to at most `max_side`."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.chunk = max(1, int(round(cfg.fps)))  # a second per read: FaceMesh starts on the first

    def size_for(self, info: ProbeInfo) -> tuple[tuple[int, int], float]:
        scale = min(1.0, self.cfg.max_side / max(info.width, info.height))
        w, h = int(round(info.width * scale / 2) * 2), int(round(info.height * scale / 2) * 2)
        return (w, h), w / info.width

    def start(self, path: str, info: ProbeInfo, size: tuple[int, int]) -> ReadAhead:
        """Start decoding now, a second of frames ahead of the caller (close it when done)."""
        return ReadAhead(iter_frames(path, fps=self.cfg.fps, chunk=self.chunk, size=size, info=info))

    def chunks(self, row: dict[str, Any], decoding: ReadAhead) -> Iterator[np.ndarray]:
        """The decoded frames in order, a second at a time; a decode error rejects the input."""
        try:
            yield from decoding
        except MediaError as exc:
            raise ItemFailure(
                "normalise", exc.reason, f"{row['video']}: {exc.reason} ({exc.detail})"
            ) from exc


class LandmarkStage:
    """FaceMesh in tracking mode over windows of at most `segment_seconds`: one face track per window,
    scene cuts, face segments."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.window = int(round(cfg.segment_seconds * cfg.fps))
        self.tracker = FaceMeshTracker(max_faces=2, model_path=cfg.landmarker_model)
        self._buffer: np.ndarray | None = None

    def windows(
        self, chunks: Iterator[np.ndarray]
    ) -> Iterator[tuple[int, np.ndarray, FaceTrack, list[tuple[int, int]]]]:
        """(first frame index, frames, track, segments) per window; each decoded chunk is tracked as it
        arrives, so FaceMesh works while the next chunk decodes.

        A window's frames are a view of one buffer kept across windows and inputs (in a profile of a 12 s
        input, copying each window into fresh memory cost 0.14 s): use them before asking for the next.
        """
        start, tracks, filled = 0, [], 0
        for chunk in chunks:
            buffer = self._window_buffer(chunk.shape[1:])
            while len(chunk):
                part, chunk = chunk[: self.window - filled], chunk[self.window - filled :]
                buffer[filled : filled + len(part)] = part
                tracks.append(self.tracker.track(part, fps=self.cfg.fps, resume=filled > 0))
                filled += len(part)
                if filled == self.window:
                    yield self._window(start, buffer[:filled], tracks)
                    start, tracks, filled = start + filled, [], 0
        if filled:
            yield self._window(start, self._buffer[:filled], tracks)

    def _window_buffer(self, frame_shape: tuple[int, ...]) -> np.ndarray:
        if self._buffer is None or self._buffer.shape[1:] != frame_shape:
            self._buffer = None  # let the old one go before the new one is made
            self._buffer = np.empty((self.window, *frame_shape), np.uint8)
        return self._buffer

    def _window(
        self, start: int, frames: np.ndarray, tracks: list[FaceTrack]
    ) -> tuple[int, np.ndarray, FaceTrack, list[tuple[int, int]]]:
        track = FaceTrack.concatenate(tracks)
        # A new shot, or the track jumping to another person, starts a new segment.
        cuts = sorted(
            set(scene_cuts(frames, self.cfg.scene_cut_threshold, self.cfg.scene_cut_content_threshold))
            | set(np.flatnonzero(track.switched).tolist())
        )
        min_frames = max(2, int(math.ceil(self.cfg.filters.min_seconds * self.cfg.fps)))
        return start, frames, track, split_segments(track.found, cuts, self.window, min_frames)


@dataclass
class Segment:
    """One face segment ready to become a clip."""

    start: int  # frame index in the normalised video
    frames: np.ndarray
    landmarks: np.ndarray  # smoothed, frame pixels
    track: FaceTrack
    crops: np.ndarray | None = None
    crop_landmarks: np.ndarray | None = None


class CropStage:
    """Smoothed landmarks → stable square boxes → aligned crops (mouth in the lower half)."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, seg: Segment) -> Segment:
        boxes = crop_boxes(seg.landmarks, seg.frames.shape)
        seg.crops = crop_faces(seg.frames, boxes, self.cfg.crop_size)
        seg.crop_landmarks = landmarks_in_crop(seg.landmarks, boxes, self.cfg.crop_size)
        return seg


class AlignStage:
    """A segment's AV offset from the configured meter; keep, repair (shift the audio to 0) or reject."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.meter = build_meter(cfg.align)

    def audio_for(self, pcm: np.ndarray, start: int, n_frames: int, shift_frames: int = 0) -> np.ndarray:
        """The PCM under frames [start, start+n) — taken `shift_frames` later to advance the audio."""
        per_frame = self.cfg.sample_rate / self.cfg.fps
        a = int(round((start + shift_frames) * per_frame))
        n = int(round(n_frames * per_frame))
        out = np.zeros(n, np.float32)
        lo, hi = max(a, 0), min(a + n, len(pcm))
        if hi > lo:
            out[lo - a : hi - a] = pcm[lo:hi]
        return out

    def __call__(self, seg: Segment, pcm: np.ndarray) -> tuple[OffsetEstimate, np.ndarray, bool]:
        """(estimate, the segment's PCM after any repair, whether it was repaired)."""
        n = len(seg.frames)
        seg_pcm = self.audio_for(pcm, seg.start, n)
        align = self.cfg.align
        est = self.meter.measure(
            seg.frames, seg.landmarks, seg_pcm, self.cfg.sample_rate, self.cfg.fps, align.max_lag
        )
        if est.abstained:
            if align.on_abstain == "reject":
                raise ItemFailure(
                    "align",
                    filters.LOW_SYNC_CONFIDENCE,
                    f"the {est.meter} meter abstains ({est.reason}, confidence {est.confidence:.3f}"
                    f" < {est.min_confidence})"
                    if est.reason == "low_confidence"
                    else f"the {est.meter} meter abstains ({est.reason})",
                )
            return est, seg_pcm, False
        too_large = abs(est.offset_frames) > align.max_abs_offset
        if too_large and align.mode in ("reject", "repair"):
            raise ItemFailure(
                "align",
                filters.OFFSET_TOO_LARGE,
                f"|offset| {abs(est.offset_frames)} > {align.max_abs_offset} frames ({est.meter} meter)",
            )
        if align.mode == "repair" and est.offset_frames != 0:
            return est, self.audio_for(pcm, seg.start, n, est.offset_frames), True
        return est, seg_pcm, False


def speech_seconds(pcm: np.ndarray, sample_rate: int, floor_db: float = 30.0) -> float:
    """Seconds of 10 ms frames within `floor_db` of the loudest frame (voiced speech, pauses excluded)."""
    hop = sample_rate // 100
    n = len(pcm) // hop
    if n == 0:
        return 0.0
    rms = np.sqrt((pcm[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(axis=1)) + 1e-10
    level = 20 * np.log10(rms / rms.max())
    return float((level > -floor_db).sum()) / 100.0


def transcript_cadence(row: dict[str, Any], pcm: np.ndarray, sample_rate: int) -> float | None:
    """Phonemes per second of speech when the input has a transcript in a language espeak-ng speaks."""
    from pipeline import phonemes

    text, language = row.get("transcript") or "", row.get("language") or "und"
    if not text or language not in phonemes.list_voices():
        return None
    seconds = speech_seconds(pcm, sample_rate)
    return len(phonemes.phoneme_timeline(text, language)) / seconds if seconds > 0 else None

"""Preprocessing stages: probe → ffmpeg normalise → landmarks → track/smooth → aligned crops → mel →
AV offset → filters, for one input at a time.

Each stage is a small class (expensive set-up in `__init__`, work in `__call__`); `ClipPreprocessor`
chains them inside one Ray actor so decoded frames never enter the object store, and writes the input's
shard and its completion record itself. The logic lives in plain functions in media/landmarks/crops/
audio/offset/filters; the same classes run without Ray in tests (`ClipPreprocessor(cfg, out)(batch)`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from core.config import code_version, config_hash
from core.errors import BadInput, ItemFailure
from core.malloc import reuse_freed_memory
from core.ray import WORKER_DIED, check_poll_seconds, import_deferred
from core.storage import Store
from pipeline import audio as audio_features
from pipeline import filters
from pipeline.crops import crop_boxes, crop_faces, landmarks_in_crop
from pipeline.landmarks import (
    FaceMeshTracker,
    FaceTrack,
    scene_cuts,
    smooth_landmarks,
    split_segments,
)
from pipeline.media import (
    TOOL_KILLED,
    MediaError,
    ProbeInfo,
    ReadAhead,
    iter_frames,
    local_path,
    probe,
    read_audio,
)
from pipeline.meters import MeterConfig, build_meter
from pipeline.offset import OffsetEstimate
from pipeline.shards import encode_row

log = logging.getLogger(__name__)

STATE_DIR = "_state"
SHARD_DIR = "shards"
TOOL_RETRIES = 2  # extra attempts at an input whose ffmpeg/ffprobe was killed by a signal
# One status row per input (ClipPreprocessor's output). Calls overlap within an actor, so its time and
# CPU are summed per `worker_pid` over the span of its calls, not per input (pipeline.preprocess).
STATUS_COLUMNS = (
    "input_id",
    "accepted",
    "rejected",
    "frames",
    "worker_pid",
    "cpu_at_start",  # the worker's CPU seconds so far, its finished ffmpeg children included
    "cpu_at_finish",
    "started_at",
    "finished_at",
    "peak_rss_mb",
)


@dataclass(frozen=True)
class AlignConfig(MeterConfig):
    """Which meter measures each clip's AV offset (landmarks | syncnet_v2 | expert, with `weights` for the
    last two; `min_confidence` None: the meter's own threshold), and what to do with a confident reading:
    keep it, repair it (shift the audio to 0) or reject the clip beyond `max_abs_offset`. A reading the
    meter abstains on is never repaired; `on_abstain: reject` drops such clips (low_sync_confidence)."""

    mode: str = "keep"  # keep | repair | reject
    max_abs_offset: int = 6  # frames; `reject` drops clips beyond it, `repair` only fixes up to it
    on_abstain: str = "keep"  # keep | reject
    max_lag: int = 15

    def validate(self, key: str = "align.meter") -> None:
        super().validate(key)
        if self.mode not in ("keep", "repair", "reject"):
            raise BadInput(f"align.mode must be keep, repair or reject, not {self.mode!r}")
        if self.on_abstain not in ("keep", "reject"):
            raise BadInput(f"align.on_abstain must be keep or reject, not {self.on_abstain!r}")


DEFAULT_CPUS_PER_WORKER = 0.9
"""CPUs of a pool's actor when the config leaves them to the plan (fractional: the pool never takes every
CPU); less when the cluster cannot hold even one actor each."""


@dataclass(frozen=True)
class PoolConfig:
    """Ray sizing of an actor pool that takes one input per call (scoring's; preprocessing extends it)."""

    workers: int | None = None  # actors, each on one input at a time (None: as many as the cluster holds)
    cpus_per_worker: float | None = None  # None: DEFAULT_CPUS_PER_WORKER, less on a cluster too small
    max_restarts: int = 3  # an input whose actor was killed is retried this often, then rejected
    poll_seconds: float = 0.5  # Ray Data's driver loop interval (Ray: 0.1); an input takes seconds
    stall_seconds: float = 600.0  # no input finished for this long fails the run, naming the stage (0: never)

    def validate(self) -> None:
        """BadInput naming the first bad setting."""
        if (self.workers is not None and self.workers < 1) or (
            self.cpus_per_worker is not None and self.cpus_per_worker <= 0
        ):
            raise BadInput("resources.workers must be >= 1 and resources.cpus_per_worker > 0")
        if self.max_restarts < 0 or self.stall_seconds < 0:
            raise BadInput("resources.max_restarts and resources.stall_seconds must be >= 0")
        check_poll_seconds(self.poll_seconds)

    def planned(self, what: str, inputs: int, command: str) -> PoolConfig:
        """This pool sized for the connected cluster and `inputs` inputs (core.plan): what the config
        leaves to defaults is fitted; BadInput with the one-line plan when it cannot run."""
        from core.plan import Ask, plan

        ask = Ask(
            what,
            min(self.workers, inputs) if self.workers is not None else inputs,
            DEFAULT_CPUS_PER_WORKER if self.cpus_per_worker is None else self.cpus_per_worker,
            count_flag="--workers",
            cpus_flag="--cpus-per-worker",
            fit_cpus=self.cpus_per_worker is None,
            fit_count=None if self.workers is not None else inputs,
        )
        (ask,) = plan([ask], command)
        return replace(self, workers=ask.count, cpus_per_worker=ask.cpus)


@dataclass(frozen=True)
class ResourcesConfig(PoolConfig):
    """Ray sizing of the preprocessing actor pool."""

    # inputs an actor holds at once. One is in FaceMesh; the others download, probe and decode their
    # first second meanwhile, which would otherwise leave FaceMesh idle between inputs
    inputs_per_worker: int = 2

    def validate(self) -> None:
        super().validate()
        if self.inputs_per_worker < 1:
            raise BadInput("resources.inputs_per_worker must be >= 1")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything `lipsync preprocess` does, with the reference numbers as defaults."""

    fps: float = 25.0
    sample_rate: int = 16000
    crop_size: int = 96
    max_side: int = 720  # frames are decoded at most this large (longer side) for landmarks and crops
    segment_seconds: float = 10.0
    scene_cut_threshold: float = 0.15  # a cut: consecutive luma histograms correlate below 1 - this
    scene_cut_content_threshold: float = 27.0  # ... or their pixels change by more (hue/sat/light, of 255)
    val_fraction: float = 0.2
    seed: int = 0
    landmarker_model: str | None = None  # a user-supplied face_landmarker.task; default: bundled FaceMesh
    filters: filters.FilterConfig = field(default_factory=filters.FilterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


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


# --- stages -------------------------------------------------------------------------------------
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


# --- the composite actor ------------------------------------------------------------------------
def output_hash(cfg: PreprocessConfig) -> str:
    """Hash of the settings that shape the clips: all but `resources` (pool size, CPUs, polling), so a
    re-run on another pool size resumes instead of redoing every input."""
    return config_hash(replace(cfg, resources=ResourcesConfig()))


def clip_id_of(source: str, start: int, end: int) -> str:
    """Stable clip id: hash of the source URI and the segment's frame range."""
    return hashlib.sha1(f"{source}#{start}-{end}".encode()).hexdigest()[:16]


def _reject_row(
    row: dict[str, Any], stage: str, reason: str, message: str, segment: tuple[int, int] | None = None
) -> dict[str, Any]:
    return {
        "input_id": row["input_id"],
        "source": row["video"],
        "language": row.get("language", "und"),
        "speaker": row.get("speaker", ""),
        "stage": stage,
        "reason": reason,
        "message": message,
        "segment_start_frame": segment[0] if segment else -1,
        "segment_end_frame": segment[1] if segment else -1,
    }


class ClipPreprocessor:
    """The map_batches callable: runs every stage on each input of a batch, writes its shard and its
    completion record (`_state/<input_id>.json`, written last and atomically) to OUT."""

    def __init__(self, cfg: PreprocessConfig, out: str) -> None:
        reuse_freed_memory()  # decoded frames, crops and mels: fault-free reuse between clips
        import_deferred()
        self.cfg = cfg
        self.store = Store(out)
        self.hash = output_hash(cfg)
        self.version = code_version()
        self.probe = ProbeStage(cfg)
        self.audio = AudioStage(cfg)
        self.normalise = NormaliseStage(cfg)
        self.landmarks = LandmarkStage(cfg)
        self.crop = CropStage(cfg)
        self.align = AlignStage(cfg)
        self.background = futures.ThreadPoolExecutor(1, thread_name_prefix="audio")
        # Calls can overlap (`resources.inputs_per_worker`): one input at a time tracks faces, since
        # FaceMesh's tracking state and the window buffer are the actor's; the others wait here with
        # their download, probe and first decoded second done.
        self.facemesh_turn = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = list(batch)
        out: dict[str, list] = {k: [] for k in STATUS_COLUMNS}
        for i in range(len(batch[keys[0]])):
            row = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys}
            started_at, cpu = time.time(), _cpu_seconds()
            self._finish(row, self.process_retrying_killed_tools(row), started_at, cpu, out)
        return out

    def given_up(self, row: dict[str, Any], attempts: int) -> dict[str, list]:
        """The completion record and status row of an input whose actor was killed on each of its
        `attempts` (core.ray.bounded): a `worker_died` reject, run again by the next run."""
        message = f"{row['video']}: its preprocessing actor was killed on each of {attempts} attempts"
        record = {
            "input_id": row["input_id"],
            "source": row["video"],
            "config_hash": self.hash,
            "frames": 0,
            "clips": [],
            "rejects": [_reject_row(row, "worker", WORKER_DIED, message)],
        }
        out: dict[str, list] = {k: [] for k in STATUS_COLUMNS}
        self._finish(row, record, time.time(), _cpu_seconds(), out)
        return out

    def _finish(
        self, row: dict[str, Any], record: dict[str, Any], started_at: float, cpu: float, out: dict[str, list]
    ) -> None:
        """Write the input's completion record (last, atomically) and add its status row to `out`."""
        self.store.write_json(f"{STATE_DIR}/{row['input_id']}.json", record)
        out["input_id"].append(row["input_id"])
        out["accepted"].append(len(record["clips"]))
        out["rejected"].append(len(record["rejects"]))
        out["frames"].append(record["frames"])
        out["worker_pid"].append(os.getpid())
        out["cpu_at_start"].append(cpu)
        out["cpu_at_finish"].append(_cpu_seconds())
        out["started_at"].append(started_at)
        out["finished_at"].append(time.time())
        out["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def process_retrying_killed_tools(self, row: dict[str, Any]) -> dict[str, Any]:
        """`process`, again (up to TOOL_RETRIES times) while an ffmpeg/ffprobe it ran was killed by a
        signal: that says nothing about the input, which must not be recorded as bad for good."""
        record = self.process(row)
        for attempt in range(TOOL_RETRIES):
            killed = [r for r in record["rejects"] if r["reason"] == TOOL_KILLED]
            if not killed:
                break
            log.warning("%s (attempt %d of %d)", killed[0]["message"], attempt + 2, TOOL_RETRIES + 1)
            record = self.process(row)
        return record

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """All clips and rejects of one input; writes `shards/<input_id>.parquet` when any clip passed."""
        clips: list[dict[str, Any]] = []
        shard_rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        frames_seen = 0
        try:
            with local_path(row["video"]) as path:
                info = self.probe(row, path)
                size, scale = self.normalise.size_for(info)
                audio = self.background.submit(self.audio, row, path, info)
                decoded = Decoded(row, path, info, audio, size, scale, self.cfg.sample_rate)
                found_any = False
                # FaceMesh runs while ffmpeg decodes the next second and the audio decodes.
                with _audio_rejects_first(audio), self.normalise.start(path, info, size) as decoding:
                    chunks = _until_failed(self.normalise.chunks(row, decoding), audio)
                    with self.facemesh_turn:
                        for start, frames, track, segments in self.landmarks.windows(chunks):
                            frames_seen += len(frames)
                            found_any |= bool(track.found.any())
                            for s, e in segments:
                                self._segment(decoded, start, frames, track, s, e, clips, shard_rows, rejects)
                if not clips and not rejects:
                    reason = filters.TOO_SHORT if found_any else filters.NO_FACE
                    message = (
                        "face segments shorter than the minimum" if found_any else "no face in any frame"
                    )
                    raise ItemFailure("landmarks", reason, f"{row['video']}: {message}")
        except ItemFailure as rej:
            rejects.append(_reject_row(row, rej.stage, rej.reason, rej.message))
        if shard_rows:
            self.store.write_table(f"{SHARD_DIR}/{row['input_id']}.parquet", pa.Table.from_pylist(shard_rows))
        return {
            "input_id": row["input_id"],
            "source": row["video"],
            "config_hash": self.hash,
            "frames": frames_seen,
            "clips": clips,
            "rejects": rejects,
        }

    def _segment(
        self,
        decoded: Decoded,
        window_start: int,
        frames: np.ndarray,
        track: FaceTrack,
        s: int,
        e: int,
        clips: list[dict[str, Any]],
        shard_rows: list[dict[str, Any]],
        rejects: list[dict[str, Any]],
    ) -> None:
        row, cfg = decoded.row, self.cfg
        start, end = window_start + s, window_start + e
        sub = _slice_track(track, s, e)
        seg = Segment(start, frames[s:e], smooth_landmarks(sub.landmarks, sub.found), sub)
        try:
            self.crop(seg)
            face_px = float(np.nanmedian(sub.face_size)) / decoded.scale
            est, seg_pcm, repaired = self.align(seg, decoded.pcm)
            sharpness = filters.sharpness(seg.crops)
            problem = filters.segment_rejection(
                cfg.filters,
                e - s,
                cfg.fps,
                face_px,
                sub.multi_face_fraction,
                sharpness,
                filters.rms_dbfs(seg_pcm),
            )
            if problem:
                raise ItemFailure("filters", problem[0], f"{row['video']} frames {start}-{end}: {problem[1]}")
        except ItemFailure as rej:
            rejects.append(_reject_row(row, rej.stage, rej.reason, rej.message, (start, end)))
            return
        clip_id = clip_id_of(row["video"], start, end)
        mel = audio_features.melspectrogram(seg_pcm)
        meta = {
            "clip_id": clip_id,
            "input_id": row["input_id"],
            "source": row["video"],
            "audio_source": row.get("audio") or row["video"],
            "start_frame": start,
            "end_frame": end,
            "segment_start_s": start / cfg.fps,
            "segment_end_s": end / cfg.fps,
            "language": row.get("language") or "und",
            "speaker": row.get("speaker") or f"unknown-{row['input_id'][:8]}",
            "transcript": row.get("transcript", ""),
            "accent": row.get("accent", ""),
            "emotion": row.get("emotion", ""),
            "manifest_split": row.get("split", ""),
            "extra": row.get("extra", "{}"),
            "phonemes_per_second": row.get("phonemes_per_second"),
            "fps": cfg.fps,
            "n_frames": e - s,
            "source_fps": decoded.info.fps,
            "source_width": decoded.info.width,
            "source_height": decoded.info.height,
            "face_size": face_px,
            "landmark_quality": float(sub.found.mean()),
            "multi_face_fraction": sub.multi_face_fraction,
            "sharpness": sharpness,
            "audio_dbfs": filters.rms_dbfs(seg_pcm),
            "av_offset_frames": est.offset_frames,
            "av_offset_confidence": est.confidence,
            "av_offset_confident": est.confident,
            "av_offset_meter": est.meter,
            "av_offset_repaired": repaired,
            "mel_frames": int(mel.shape[1]),
            "shard": f"{SHARD_DIR}/{row['input_id']}.parquet",
            "config_hash": self.hash,
            "code_version": self.version,
        }
        clips.append(meta)
        shard_meta = {
            k: meta[k]
            for k in (
                "input_id",
                "source",
                "language",
                "speaker",
                "start_frame",
                "end_frame",
                "av_offset_frames",
                "av_offset_confidence",
                "av_offset_confident",
                "config_hash",
            )
        }
        shard_rows.append(
            encode_row(clip_id, seg.crops, seg.crop_landmarks, seg_pcm, mel, cfg.fps, shard_meta)
        )


@contextlib.contextmanager
def _audio_rejects_first(audio: Future) -> Iterator[None]:
    """Around an input's video work: the audio's ItemFailure wins over the video's, as when the audio decoded
    first, and stands even when no segment asked for the audio. Waits for the audio either way, since the
    input may be a temporary copy that goes when its `local_path` block ends."""
    try:
        yield
    except ItemFailure:
        audio.result()
        raise
    finally:
        futures.wait([audio])
    audio.result()


def _until_failed(chunks: Iterator[np.ndarray], audio: Future) -> Iterator[np.ndarray]:
    """`chunks`, stopped by the audio's ItemFailure as soon as it is known: a silent or unreadable track
    should not cost the input's FaceMesh time."""
    for chunk in chunks:
        if audio.done() and audio.exception() is not None:
            audio.result()
        yield chunk


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg, ffprobe), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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


def _slice_track(track: FaceTrack, s: int, e: int) -> FaceTrack:
    return FaceTrack(
        landmarks=track.landmarks[s:e],
        found=track.found[s:e],
        n_faces=track.n_faces[s:e],
        second_face=track.second_face[s:e],
        face_size=track.face_size[s:e],
        switched=track.switched[s:e],
    )

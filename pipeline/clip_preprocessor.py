"""`ClipPreprocessor`: the composite actor that chains the preprocessing stages for one input at a time,
so decoded frames never enter the object store, and writes the input's shard and completion record.
The same class runs without Ray in tests (`ClipPreprocessor(cfg, out)(batch)`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from core.config import code_version, config_hash
from core.errors import ItemFailure
from core.malloc import reuse_freed_memory
from core.ray import WORKER_DIED, import_deferred
from core.storage import Store
from pipeline import audio as audio_features
from pipeline import filters
from pipeline.landmarks import (
    FaceTrack,
    smooth_landmarks,
)
from pipeline.media import (
    TOOL_KILLED,
    local_path,
)
from pipeline.preprocess_config import (
    SHARD_DIR,
    STATE_DIR,
    STATUS_COLUMNS,
    TOOL_RETRIES,
    PreprocessConfig,
    ResourcesConfig,
)
from pipeline.shards import encode_row
from pipeline.stages import (
    AlignStage,
    AudioStage,
    CropStage,
    Decoded,
    LandmarkStage,
    NormaliseStage,
    ProbeStage,
    Segment,
    log,
)

# Bumped when the code changes what a clip's crops look like, so a re-run redoes inputs cropped the old way
# instead of mixing two crop geometries in one corpus. 2: boxes that do not follow the jaw (pipeline/crops.py).
CROP_GEOMETRY = 2


def output_hash(cfg: PreprocessConfig) -> str:
    """Hash of the settings that shape the clips: all but `resources` (pool size, CPUs, polling), so a
    re-run on another pool size resumes instead of redoing every input; and the crop geometry's version."""
    settings = config_hash(replace(cfg, resources=ResourcesConfig()))
    return hashlib.sha256(f"{settings}/crops{CROP_GEOMETRY}".encode()).hexdigest()[:16]


def clip_id_of(input_id: str, start: int, end: int) -> str:
    """Stable clip id: hash of its input's id (pipeline.corpus: the path within the corpus) and the
    segment's frame range."""
    return hashlib.sha1(f"{input_id}#{start}-{end}".encode()).hexdigest()[:16]


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
        clip_id = clip_id_of(row["input_id"], start, end)
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


def _slice_track(track: FaceTrack, s: int, e: int) -> FaceTrack:
    return FaceTrack(
        landmarks=track.landmarks[s:e],
        found=track.found[s:e],
        n_faces=track.n_faces[s:e],
        second_face=track.second_face[s:e],
        face_size=track.face_size[s:e],
        switched=track.switched[s:e],
    )

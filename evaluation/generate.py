"""`lipsync generate PAIRS OUT --checkpoint CKPT`: lip-synced videos for many (video, audio) pairs on Ray Data.

Rows are chunks of a pair (about `chunk_seconds` of output frames), never whole videos::

    pairs -> PrepareStage    CPU actors: probe, audio -> mel, streamed decode, FaceMesh tracking with
                             look-ahead smoothing, square crops; ping-pong/loop/freeze past the source's end
          -> GenerateStage   the model's actor pool (a GPU each when there is one), batched inference
          -> CompositeStage  CPU actors: re-read the chunk's source frames by exact seeking, colour match,
                             feathered paste-back, H.264 chunk file, mouth tracking for the offset estimate
          -> driver          when all chunks of a pair are in, a Ray task joins them with the audio (AAC),
                             corrects the AV offset, optionally stabilises -> OUT/videos/<id>.mp4

Chunk rows carry crops, mel windows, boxes and mouth points (~35 kB a frame), not frames, so what the
object store and each worker hold does not grow with the video's length or resolution.
`OUT/outputs.parquet` has one row per pair; a failed pair is a row with status "failed", not a crash.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa

from core.config import code_version, config_hash, to_dict
from core.errors import BadInput, ItemFailure, Stalled
from core.malloc import reuse_freed_memory
from core.manifest import read_table
from core.ray import (
    check_poll_seconds,
    ensure_ray,
    executor_poll_interval,
    import_deferred,
    worker_runtime_env,
)
from core.stage import StageResources, StageSpec, on_ray
from core.storage import Store, is_remote, manifest_path, manifest_text
from evaluation.calibration import Calibration, load_calibration
from evaluation.postprocess import (
    EXTENSION_MODES,
    MOUTH_POINTS,
    SEEKABLE_FORMATS,
    BlendConfig,
    FrameRangeReader,
    PostprocessConfig,
    blend_i420,
    container_format,
    correct_offset,
    fit_length,
    frames_for_audio,
    frames_measure,
    i420_to_rgb,
    lip_shape_measure,
    mouth_mask,
    mux_output,
    read_frame_range,
    remux_video,
    resolve_stabiliser,
    source_indices,
    write_i420,
)
from pipeline.audio import SAMPLE_RATE, mel_windows, melspectrogram
from pipeline.crops import crop_boxes, crop_faces, landmarks_in_crop
from pipeline.landmarks import FaceMeshTracker, lip_shape, scene_cuts, smooth_landmarks
from pipeline.media import (
    MediaError,
    ProbeInfo,
    ReadAhead,
    iter_frames,
    local_path,
    probe,
    read_audio,
    read_frames,
)
from pipeline.meters import SyncMeter, build_meter

log = logging.getLogger(__name__)

PARTS_DIR = "_parts"
WORK_DIR = "_work"
VIDEOS_DIR = "videos"


# --- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The generator's actor pool."""

    device: str = "auto"  # auto (GPU when the cluster or this machine has one) | cpu | cuda
    actors: int = 1
    gpus_per_actor: float = 1.0
    cpus_per_actor: float | None = None  # None: 1.0, less when the cluster cannot hold every stage at once
    threads: int = 0  # torch threads of a CPU actor; 0: the node's CPUs shared among the pool's actors
    batch_size: int = 32  # frames per forward pass
    rows_per_batch: int = 1  # chunks per actor call; raise it on a GPU to fill batches
    half: bool = False  # fp16 autocast on CUDA


@dataclass(frozen=True)
class ResourcesConfig:
    """Sizing of the CPU stages and of Ray Data's buffers."""

    prepare_actors: int = 1
    prepare_cpus: float | None = None  # None: 0.5 (the CPU amounts left to defaults shrink together when
    composite_actors: int = 1  # the cluster cannot hold every stage at once; core.plan)
    composite_cpus: float | None = None  # None: 0.25
    finalize_actors: int = 1  # per-pair join + mux; started with the pipeline, so warm when a pair ends
    finalize_cpus: float | None = None  # None: 0.25
    finalize_restarts: int = 2  # a finalize actor killed mid-pair restarts and retries the pair
    object_store_mb: int = 256  # Ray Data's object-store budget for in-flight chunks (0: Ray's default)
    source_cache_files: int = 4  # remote source videos a composite actor keeps on local disk
    poll_seconds: float = 0.5  # Ray Data's driver loop interval (Ray: 0.1); chunks take seconds each
    stall_seconds: float = 600.0  # no chunk done for this long fails the run, naming the stage (0: never)


DEFAULT_CPUS = {"model": 1.0, "prepare": 0.5, "composite": 0.25, "finalize": 0.25}
"""CPUs of each stage's actors when the config leaves them to the plan (at most these)."""


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `lipsync generate` does; defaults are the reference's numbers."""

    chunk_seconds: float = 2.0  # output frames per row
    track_max_side: int = 720  # frames are tracked and cropped at most this large (longer side)
    extension: str = "pingpong"  # audio longer than the video: pingpong | loop | freeze
    calibration: str | None = None  # JSON of per-language/speaker mel offsets (evaluation/calibration.py)
    landmarker_model: str | None = None  # a face_landmarker.task; default: mediapipe's bundled FaceMesh
    scene_cut_threshold: float = 0.15  # a shot cut restarts tracking: as preprocessing's (PreprocessConfig)
    scene_cut_content_threshold: float = 27.0
    model: ModelConfig = field(default_factory=ModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)


def validate(cfg: GenerateConfig) -> None:
    """BadInput naming the first bad setting."""
    if cfg.extension not in EXTENSION_MODES:
        raise BadInput(f"extension must be one of {', '.join(EXTENSION_MODES)}, not {cfg.extension!r}")
    if cfg.model.device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"model.device must be auto, cpu or cuda, not {cfg.model.device!r}")
    try:
        resolve_stabiliser(cfg.post.stabilise)
    except ValueError as exc:
        raise BadInput(f"post.stabilise: {exc}") from exc
    if not 0 < cfg.scene_cut_threshold < 1 or cfg.scene_cut_content_threshold <= 0:
        raise BadInput("scene_cut_threshold must be in (0, 1) and scene_cut_content_threshold > 0")
    if cfg.chunk_seconds <= 0 or cfg.track_max_side < 64:
        raise BadInput("chunk_seconds must be > 0 and track_max_side >= 64")
    counts = (cfg.model.actors, cfg.model.batch_size, cfg.model.rows_per_batch)
    res = cfg.resources
    if min(counts) < 1 or min(res.prepare_actors, res.composite_actors, res.finalize_actors) < 1:
        raise BadInput("actor counts, model.batch_size and model.rows_per_batch must be >= 1")
    post = cfg.post
    if post.measure_seconds < 0 or 0 < post.measure_seconds < post.min_seconds:
        raise BadInput(
            f"post.measure_seconds must be 0 (the whole output) or >= post.min_seconds ({post.min_seconds}),"
            f" not {post.measure_seconds}"
        )
    post.validate("post.meter")
    if post.meter != "landmarks" and post.measure_offset:
        build_meter(post)  # unreadable or wrong weights fail here, before any worker starts
    check_poll_seconds(cfg.resources.poll_seconds)
    amounts = (cfg.model.cpus_per_actor, res.prepare_cpus, res.composite_cpus, res.finalize_cpus)
    if any(a is not None and a < 0 for a in amounts) or res.stall_seconds < 0:
        raise BadInput("CPU amounts and resources.stall_seconds must be >= 0")


# --- pairs --------------------------------------------------------------------------------------


def _pair_id(video: str, audio: str) -> str:
    digest = hashlib.sha1(f"{video}\n{audio}".encode()).hexdigest()[:8]
    return f"{PurePosixPath(video).stem}-{digest}"


PASSED_THROUGH = ("system", "transcript")
"""Optional pair columns copied to outputs.parquet for `lipsync score` (with `timeline`, made absolute)."""
PAIR_COLUMNS = ("id", "video", "audio", "language", "speaker", *PASSED_THROUGH, "timeline")


def read_pairs(manifest: str) -> list[dict[str, str]]:
    """Pairs of a CSV/JSONL/Parquet manifest: id, video, audio, language, speaker (paths made absolute),
    and the optional system, transcript and timeline (phoneme-timeline JSON) that scoring reads.

    `audio` may be empty (the video's own track is used); `id` defaults to the video's stem plus a hash
    of the pair and is made file-name safe. Duplicate ids are bad input.
    """
    fs, path = fsspec.core.url_to_fs(manifest)
    if not fs.exists(path):
        raise BadInput(f"pairs manifest {manifest} does not exist")
    frame = read_table(manifest)
    if "video" not in frame.columns:
        raise BadInput(f"pairs manifest {manifest} has no 'video' column")
    base = manifest.rsplit("/", 1)[0] if is_remote(manifest) else os.path.dirname(os.path.abspath(manifest))
    pairs, seen = [], set()
    for record in frame.to_dict(orient="records"):
        video = manifest_path(base, record.get("video"))
        if not video:
            continue
        audio = manifest_path(base, record.get("audio"))
        pair_id = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest_text(record.get("id")) or _pair_id(video, audio))
        if pair_id in seen:
            raise BadInput(f"pairs manifest {manifest}: duplicate id {pair_id!r}")
        seen.add(pair_id)
        language = manifest_text(record.get("language")) or "und"
        pairs.append(
            {
                "id": pair_id,
                "video": video,
                "audio": audio,
                "language": language,
                "speaker": manifest_text(record.get("speaker")),
                **{key: manifest_text(record.get(key)) for key in PASSED_THROUGH},
                "timeline": manifest_path(base, record.get("timeline")),
            }
        )
    if not pairs:
        raise BadInput(f"pairs manifest {manifest} lists no pairs")
    return pairs


# --- chunk rows ---------------------------------------------------------------------------------

ROW_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("status", pa.string()),  # ok | failed
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("start", pa.int64()),  # first output frame of the chunk
        ("n_frames", pa.int64()),
        ("n_out", pa.int64()),  # output frames of the whole pair
        ("n_source", pa.int64()),  # source frames decoded so far (exact once the source ended)
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mel_offset", pa.int64()),
        ("source", pa.string()),  # seekable video the composite stage re-reads frames from
        ("faces", pa.int64()),
        ("seconds", pa.float64()),  # compute time spent on this chunk so far
        ("crops", pa.binary()),  # packed arrays (np.save) ...
        ("mels", pa.binary()),
        ("boxes", pa.binary()),
        ("points", pa.binary()),
        ("source_index", pa.binary()),
        ("generated", pa.binary()),
        ("lips", pa.binary()),  # the output's lip shape per frame (pipeline.landmarks.lip_shape)
        ("part", pa.string()),  # the chunk's encoded file
    ]
)
_HEAVY = ("crops", "mels", "boxes", "points", "source_index", "generated")


def pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes (dtype and shape included)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack(blob: bytes) -> np.ndarray:
    """The array `pack` stored."""
    return np.load(io.BytesIO(blob), allow_pickle=False)


def new_row(pair_id: str, **fields: Any) -> dict[str, Any]:
    """A chunk row with every ROW_SCHEMA column (empty defaults)."""
    row: dict[str, Any] = {}
    for f in ROW_SCHEMA:
        row[f.name] = (
            b""
            if f.type == pa.binary()
            else ""
            if f.type == pa.string()
            else 0.0
            if f.type == pa.float64()
            else 0
        )
    row.update(pair_id=pair_id, status="ok")
    row.update(fields)
    return row


def failure_row(pair_id: str, stage: str, reason: str, message: str) -> dict[str, Any]:
    """The row that marks a pair as failed."""
    return new_row(pair_id, status="failed", stage=stage, reason=reason, message=message)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a pyarrow table with ROW_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# --- stage 1: decode, track, crop ---------------------------------------------------------------


@dataclass
class Tracked:
    """Frames [start, start + len) with their smoothed landmarks and crop boxes (NaN without a face)."""

    start: int
    frames: np.ndarray
    landmarks: np.ndarray
    boxes: np.ndarray


class FaceStream:
    """Tracks one face through streamed chunks; smooths with `context` frames of look-ahead and history.

    Landmark smoothing (window 5) and box smoothing (window 9) need at most 6 neighbours each side inside a
    run of face frames and 10 ahead at its start (the boxes' line fitted over its first 9 frames, each from
    landmarks smoothed over 5), so frames come out `context` frames late and equal what smoothing the whole
    video would give. A shot cut
    (pipeline.landmarks.scene_cuts, `cut_thresholds`; None: no cut detection) restarts tracking at its
    first frame and ends smoothing at it: no landmark or box is averaged across two shots.
    """

    def __init__(
        self,
        tracker: FaceMeshTracker,
        fps: float,
        context: int = 10,
        cut_thresholds: tuple[float, float] | None = (0.15, 27.0),
    ) -> None:
        self.tracker, self.fps, self.context, self.cut_thresholds = tracker, fps, context, cut_thresholds
        self.frames: np.ndarray | None = None
        self.raw = np.empty((0, 468, 3), np.float32)
        self.found = np.empty(0, bool)
        self.offset = 0  # absolute index of buffer[0]
        self.done = 0  # absolute index of the first frame not yet emitted
        self.pushed = 0
        self.cuts: list[int] = []  # absolute indices of the frames that start a new shot

    def push(self, frames: np.ndarray) -> list[Tracked]:
        """Track a chunk (continuing the previous chunk's track unless a shot starts); returns the frames now
        smoothed for good."""
        starts = self._shot_starts(frames)
        bounds = [0, *[s for s in starts if s > 0], len(frames)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            resume = self.pushed + a > 0 and a not in starts
            track = self.tracker.track(frames[a:b], self.fps, resume=resume)
            self.raw = np.concatenate([self.raw, track.landmarks])
            self.found = np.concatenate([self.found, track.found])
        self.cuts.extend(self.pushed + s for s in starts)
        self.frames = frames if self.frames is None else np.concatenate([self.frames, frames])
        self.pushed += len(frames)
        return self._emit(final=False)

    def _shot_starts(self, frames: np.ndarray) -> list[int]:
        """Indices in `frames` where a new shot starts (0: at the boundary with the previous chunk)."""
        if self.cut_thresholds is None:
            return []
        if self.frames is None or not len(self.frames):
            return scene_cuts(frames, *self.cut_thresholds)
        return [t - 1 for t in scene_cuts(np.concatenate([self.frames[-1:], frames]), *self.cut_thresholds)]

    def flush(self) -> list[Tracked]:
        """The remaining frames at the end of the stream."""
        return self._emit(final=True)

    def _smoothed(self) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks, boxes) of the buffer, each shot in it smoothed on its own."""
        n = len(self.raw)
        bounds = [0, *[c - self.offset for c in self.cuts if 0 < c - self.offset < n], n]
        landmarks, boxes = [], []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            landmarks.append(smooth_landmarks(self.raw[a:b], self.found[a:b]))
            boxes.append(crop_boxes(landmarks[-1], self.frames.shape))
        return np.concatenate(landmarks), np.concatenate(boxes)

    def _emit(self, final: bool) -> list[Tracked]:
        end = self.pushed if final else self.pushed - self.context
        if end <= self.done or self.frames is None:
            return []
        smoothed, boxes = self._smoothed()
        a, b = self.done - self.offset, end - self.offset
        piece = Tracked(self.done, self.frames[a:b], smoothed[a:b], boxes[a:b])
        keep = max(0, b - self.context)
        self.frames, self.raw, self.found = self.frames[keep:], self.raw[keep:], self.found[keep:]
        self.offset += keep
        self.done = end
        return [piece]


@dataclass
class PairPlan:
    """What stage 1 knows about a pair before decoding its frames."""

    pair: dict[str, Any]
    local: str  # local path of the (seekable) video decoded here
    source: str  # URI the composite stage re-reads frames from
    info: ProbeInfo
    fps: float
    track_size: tuple[int, int]
    scale: float  # track size / source size
    n_out: int
    mel: np.ndarray
    mel_offset: int
    n_source: int = 0


@dataclass
class FaceCache:
    """Per-source-frame boxes (track pixels) and mouth points (crop pixels) for the extension passes."""

    boxes: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)

    def add(self, boxes: np.ndarray, points: np.ndarray) -> None:
        self.boxes.append(boxes)
        self.points.append(points)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.boxes), np.concatenate(self.points)


class PrepareStage:
    """Stage 1 (CPU actor): one pair in, its chunk rows out, streamed as they are ready."""

    def __init__(self, cfg: GenerateConfig, img_size: int, calibration: Calibration, out: str) -> None:
        reuse_freed_memory()  # decoded frames and crops: every chunk's arrays would fault in afresh
        import_deferred()  # landmark smoothing's scipy.signal, the mel's STFT: before the first pair
        self.cfg, self.img_size, self.calibration = cfg, img_size, calibration
        self.work = f"{out.rstrip('/')}/{WORK_DIR}"
        self.tracker = FaceMeshTracker(max_faces=1, model_path=cfg.landmarker_model)

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        for pair in table.to_pylist():
            clock = time.perf_counter()
            for row in self.rows(pair):
                row["seconds"] = time.perf_counter() - clock
                yield to_table([row])
                clock = time.perf_counter()

    def rows(self, pair: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Chunk rows of one pair, or a single failed row."""
        try:
            with local_path(pair["video"]) as video:
                plan = self.plan(pair, video)
                with self.seekable(plan):
                    yield from self.chunks(plan)
        except ItemFailure as exc:
            yield failure_row(pair["id"], exc.stage, exc.reason, exc.message)
        except MediaError as exc:  # the video vanished or broke mid-way
            yield failure_row(pair["id"], "video", exc.reason, str(exc))

    def plan(self, pair: dict[str, Any], video: str) -> PairPlan:
        """Probe the video, decode the audio to mel, decide the output length and tracking size."""
        try:
            info = probe(video)
        except MediaError as exc:
            raise ItemFailure("video", exc.reason, str(exc).replace(video, pair["video"])) from exc
        try:
            pcm = (
                read_audio(pair["audio"], SAMPLE_RATE)
                if pair["audio"]
                else read_audio(video, SAMPLE_RATE, info)
            )
        except MediaError as exc:
            raise ItemFailure.of("audio", exc) from exc
        n_out = frames_for_audio(len(pcm), SAMPLE_RATE, info.fps)
        if n_out < 1:
            raise ItemFailure("audio", "too_short", f"{pair['audio'] or pair['video']}: no audio samples")
        scale = min(1.0, self.cfg.track_max_side / max(info.width, info.height))
        size = (max(2, round(info.width * scale)), max(2, round(info.height * scale)))
        return PairPlan(
            pair=pair,
            local=video,
            source=pair["video"],
            info=info,
            fps=info.fps,
            track_size=size,
            scale=size[0] / info.width,
            n_out=n_out,
            mel=melspectrogram(pcm),
            mel_offset=self.calibration.offset_for(pair["language"], pair["speaker"]),
        )

    @contextlib.contextmanager
    def seekable(self, plan: PairPlan) -> Iterator[None]:
        """Point the plan at a copy of the video stream in Matroska when its container seeks inexactly."""
        if container_format(plan.local) in SEEKABLE_FORMATS:
            yield
            return
        with tempfile.TemporaryDirectory(prefix="lipsync-remux-") as tmp:
            plan.local = remux_video(plan.local, plan.info, os.path.join(tmp, "video.mkv"))
            plan.info = probe(plan.local)
            plan.source = f"{self.work}/{plan.pair['id']}.mkv"
            fs, path = fsspec.core.url_to_fs(plan.source)
            fs.makedirs(self.work if is_remote(self.work) else os.path.dirname(path), exist_ok=True)
            fs.put_file(plan.local, path)
            yield

    def chunks(self, plan: PairPlan) -> Iterator[dict[str, Any]]:
        """Rows over the source (tracked), then past its end (extension); face-less ones held until a face."""
        cache, held, faces = FaceCache(), [], 0
        for row in self.forward(plan, cache):
            faces += row["faces"]
            held.append(row)
            if faces:
                yield from held
                held.clear()
        if not faces:
            raise ItemFailure("track", "no_face", f"{plan.pair['video']}: no face in any frame")
        yield from held
        yield from self.extension(plan, cache)

    def forward(self, plan: PairPlan, cache: FaceCache) -> Iterator[dict[str, Any]]:
        """The source decoded once in order, tracked with look-ahead smoothing, cut at n_out frames."""
        cuts = (self.cfg.scene_cut_threshold, self.cfg.scene_cut_content_threshold)
        stream = FaceStream(self.tracker, plan.fps, cut_thresholds=cuts)
        chunk = max(8, round(self.cfg.chunk_seconds * plan.fps))
        frames_iter = iter_frames(plan.local, fps=plan.fps, chunk=chunk, size=plan.track_size, info=plan.info)
        ended = True
        with ReadAhead(frames_iter) as decoding:  # the next chunk decodes while this one is tracked
            for frames in decoding:
                for piece in stream.push(frames):
                    yield from self.tracked_rows(plan, piece, cache)
                if stream.pushed >= plan.n_out + stream.context:
                    ended = False  # enough for the audio: the rest of the source is never decoded
                    break
        plan.n_source = stream.pushed if ended else max(stream.pushed, plan.info.n_frames)
        for piece in stream.flush():
            yield from self.tracked_rows(plan, piece, cache)

    def tracked_rows(self, plan: PairPlan, piece: Tracked, cache: FaceCache) -> Iterator[dict[str, Any]]:
        count = min(len(piece.frames), plan.n_out - piece.start)
        points = landmarks_in_crop(piece.landmarks[:, MOUTH_POINTS], piece.boxes, self.img_size)[..., :2]
        cache.add(piece.boxes, points)
        if count > 0:
            index = np.arange(piece.start, piece.start + count)
            yield self.chunk_row(plan, piece.start, index, piece.frames, piece.boxes, points)

    def extension(self, plan: PairPlan, cache: FaceCache) -> Iterator[dict[str, Any]]:
        """Output frames past the source's end: ping-pong (or loop/freeze) over the cached tracking."""
        if plan.n_out <= plan.n_source:
            return
        boxes, points = cache.arrays()
        chunk = max(8, round(self.cfg.chunk_seconds * plan.fps))
        for start in range(plan.n_source, plan.n_out, chunk):
            index = source_indices(start, min(chunk, plan.n_out - start), plan.n_source, self.cfg.extension)
            lo, hi = int(index.min()), int(index.max()) + 1
            frames = None
            if np.isfinite(boxes[index]).all(axis=1).any():
                frames = read_frame_range(plan.local, lo, hi, plan.fps, plan.track_size, plan.info)[
                    index - lo
                ]
            yield self.chunk_row(plan, start, index, frames, boxes[index], points[index])

    def chunk_row(
        self,
        plan: PairPlan,
        start: int,
        index: np.ndarray,
        frames: np.ndarray | None,
        boxes: np.ndarray,
        points: np.ndarray,
    ) -> dict[str, Any]:
        """One chunk: crops and mel windows of its face frames, boxes in source pixels, source indices."""
        n = len(index)
        boxes, points = boxes[:n], points[:n]
        found = np.isfinite(boxes).all(axis=1)
        crops = np.zeros((0, self.img_size, self.img_size, 3), np.uint8)
        if found.any() and frames is not None:
            crops = crop_faces(frames[:n][found], boxes[found], self.img_size)
        mels = mel_windows(plan.mel, n, plan.fps, offset_frames=start + plan.mel_offset)[found]
        return new_row(
            plan.pair["id"],
            start=start,
            n_frames=n,
            n_out=plan.n_out,
            n_source=plan.n_source,
            fps=plan.fps,
            width=plan.info.width,
            height=plan.info.height,
            mel_offset=plan.mel_offset,
            source=plan.source,
            faces=int(found.sum()),
            crops=pack(crops),
            mels=pack(mels.astype(np.float32)),
            boxes=pack((boxes / plan.scale).astype(np.float32)),
            points=pack(points[found].astype(np.float32)),
            source_index=pack(index.astype(np.int32)),
        )


# --- stage 2: the model -------------------------------------------------------------------------


class GenerateStage:
    """Stage 2 (actor pool): the Wav2Lip generator, batched over the face frames of its rows."""

    def __init__(self, checkpoint: str, cfg: ModelConfig) -> None:
        import torch

        from models.checkpoint import load_model

        reuse_freed_memory()  # activations: a third of the forward pass was page faults without it
        self.torch = torch
        self.device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        self.cfg = cfg
        self.model = load_model(checkpoint, "wav2lip", self.device).model

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = table.to_pylist()
        live = [r for r in rows if r["status"] == "ok" and r["faces"]]
        if live:
            crops = np.concatenate([unpack(r["crops"]) for r in live])
            mels = np.concatenate([unpack(r["mels"]) for r in live])
            generated = self.infer(crops, mels)
            bounds = np.cumsum([0] + [r["faces"] for r in live])
            for r, a, b in zip(live, bounds[:-1], bounds[1:], strict=True):
                r["generated"] = pack(generated[a:b])
        share = (time.perf_counter() - started) / max(1, len(rows))
        for r in rows:
            r["crops"] = r["mels"] = b""
            r["seconds"] += share
        return to_table(rows)

    def infer(self, crops: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) RGB crops + (N, 80, 16) mels -> (N, S, S, 3) RGB generated crops (uint8)."""
        torch = self.torch
        out = np.empty_like(crops)
        half = crops.shape[1] // 2
        for i in range(0, len(crops), self.cfg.batch_size):
            bgr = np.ascontiguousarray(crops[i : i + self.cfg.batch_size, ..., ::-1])  # models see BGR
            x = torch.from_numpy(bgr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            masked = x.clone()
            masked[:, :, half:] = 0.0
            audio = torch.from_numpy(mels[i : i + self.cfg.batch_size]).to(self.device).unsqueeze(1)
            autocast = torch.autocast(
                "cuda", dtype=torch.float16, enabled=self.cfg.half and self.device == "cuda"
            )
            with torch.inference_mode(), autocast:
                y = self.model(audio, torch.cat([masked, x], dim=1))
                y = (y.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)
            out[i : i + len(bgr)] = y.cpu().numpy()[..., ::-1]
        return out


def cpu_threads(cfg: ModelConfig) -> int:
    """Torch threads of one CPU model actor: `threads`, or this node's CPUs split among the actors.

    On CPU, several single-threaded actors outrun one actor with as many threads (the model alone on 2
    cores, three times each in one run of benchmarks/generate.py: 2 x 1 thread 41.2-43.7 frames/s, 1 x 2
    threads 38.5-39.7); `configs/generate_cpu.yaml` lays the pool out so.
    """
    return cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)


# --- stage 3: paste back, encode ----------------------------------------------------------------


class SourceCache:
    """Local paths and probes of source videos; remote ones are downloaded once (least recently used)."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max(1, max_files)
        self.entries: collections.OrderedDict[str, tuple[str, ProbeInfo]] = collections.OrderedDict()
        self.dir = tempfile.mkdtemp(prefix="lipsync-sources-")
        weakref.finalize(self, shutil.rmtree, self.dir, True)

    def get(self, uri: str) -> tuple[str, ProbeInfo]:
        """(local path, probe) of a source; MediaError("not_found") when it vanished."""
        if uri not in self.entries:
            self.entries[uri] = self._fetch(uri)
            while len(self.entries) > self.max_files:
                path = self.entries.popitem(last=False)[1][0]
                if path.startswith(self.dir):
                    os.remove(path)
        self.entries.move_to_end(uri)
        return self.entries[uri]

    def _fetch(self, uri: str) -> tuple[str, ProbeInfo]:
        if not is_remote(uri):
            with local_path(uri) as path:
                return path, probe(path)
        local = os.path.join(self.dir, hashlib.sha1(uri.encode()).hexdigest() + PurePosixPath(uri).suffix)
        try:
            fsspec.filesystem(uri.split("://", 1)[0]).get_file(uri, local)
        except FileNotFoundError as exc:
            raise MediaError("not_found", uri) from exc
        return local, probe(local)


class CompositeStage:
    """Stage 3 (CPU actor): generated mouths pasted into the chunk's source frames, encoded to a file."""

    def __init__(self, cfg: GenerateConfig, out: str) -> None:
        reuse_freed_memory()
        self.cfg = cfg
        self.parts = f"{out.rstrip('/')}/{PARTS_DIR}"
        self.sources = SourceCache(cfg.resources.source_cache_files)
        self.frames = FrameRangeReader()  # chunks of a pair mostly arrive in order: one ffmpeg runs on
        self.tracker = None
        if cfg.post.measure_offset and cfg.post.meter == "landmarks":  # network meters read the parts
            self.tracker = FaceMeshTracker(max_faces=1, model_path=cfg.landmarker_model)
            import_deferred()

    def __call__(self, table: pa.Table) -> pa.Table:
        return to_table([self.composite(row) for row in table.to_pylist()])

    def composite(self, row: dict[str, Any]) -> dict[str, Any]:
        """Blend, encode and measure one chunk; heavy columns are dropped from the returned row."""
        started = time.perf_counter()
        if row["status"] == "ok":
            try:
                frames = self.blend(row)
                row["part"] = f"{self.parts}/{row['pair_id']}/{row['start']:08d}.mp4"
                post = self.cfg.post
                write_i420(row["part"], frames, row["fps"], crf=post.crf, preset=post.preset)
                if self.tracker is not None and self.measured(row):
                    row["lips"] = pack(self.lips(frames, row["fps"]))
            except MediaError as exc:
                row.update(status="failed", stage="composite", reason=exc.reason, message=str(exc))
        for name in _HEAVY:
            row[name] = b""
        row["seconds"] += time.perf_counter() - started
        return row

    def blend(self, row: dict[str, Any]) -> np.ndarray:
        """The chunk's output frames (I420): source frames with the generated mouths pasted in."""
        index = unpack(row["source_index"]).astype(np.int64)
        lo, hi = int(index.min()), int(index.max()) + 1
        local, info = self.sources.get(row["source"])
        frames = self.frames.read(local, lo, hi, row["fps"], info, pix_fmt="yuv420p")
        frames = frames[index - lo] if not np.array_equal(index, np.arange(lo, hi)) else frames
        if not row["faces"]:
            return frames
        boxes = unpack(row["boxes"]).astype(np.float64)
        found = np.flatnonzero(np.isfinite(boxes).all(axis=1))
        generated, points = unpack(row["generated"]), unpack(row["points"])
        for k, t in enumerate(found):
            mask = mouth_mask(points[k], generated.shape[1], self.cfg.blend)
            blend_i420(frames[t], generated[k], boxes[t], mask, self.cfg.blend)
        return frames

    def measured(self, row: dict[str, Any]) -> bool:
        """Whether the chunk is inside the output's first post.measure_seconds (tracked for the offset).

        FaceMesh on the output took 3.8 ms of CPU per frame of the benchmark's 256x256 input, 4 % of the
        model's 90 ms on a CPU node. An offset is one number per video, and the same estimator is held to
        +-1 frame on 4 s clips in preprocessing: a minute is plenty.
        """
        limit = self.cfg.post.measure_seconds
        return limit <= 0 or row["start"] < limit * row["fps"]

    def lips(self, frames: np.ndarray, fps: float) -> np.ndarray:
        """Per-frame lip shape of the output (NaN rows without a face), for the AV-offset estimate."""
        frames = np.stack([i420_to_rgb(f) for f in frames])
        track = self.tracker.track(downscaled(frames, self.cfg.track_max_side), fps)
        return lip_shape(smooth_landmarks(track.landmarks, track.found))


def downscaled(frames: np.ndarray, max_side: int) -> np.ndarray:
    """RGB frames resized so the longer side is at most `max_side` (for tracking)."""
    height, width = frames.shape[1:3]
    scale = min(1.0, max_side / max(width, height))
    if scale >= 1.0:
        return frames
    size = (max(2, round(width * scale)), max(2, round(height * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


# --- driver: collect chunks, finish pairs -------------------------------------------------------


@dataclass
class PairProgress:
    """What the driver has seen of one pair's chunks."""

    pair: dict[str, Any]
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)  # start -> light row
    failure: dict[str, Any] | None = None
    submitted: bool = False

    def add(self, row: dict[str, Any]) -> None:
        if row["status"] != "ok":
            self.failure = self.failure or row
        elif row["start"] not in self.chunks:  # a retried actor may send a chunk twice
            self.chunks[row["start"]] = row

    @property
    def ready(self) -> bool:
        if self.failure or not self.chunks:
            return False
        first = next(iter(self.chunks.values()))
        return sum(c["n_frames"] for c in self.chunks.values()) == first["n_out"]


OUTPUT_SCHEMA = pa.schema(
    [
        *[(name, pa.string()) for name in PAIR_COLUMNS],
        ("status", pa.string()),  # ok | failed
        ("stage", pa.string()),  # where a failed pair failed: video, audio, track, composite, finalize
        ("reason", pa.string()),  # not_found, unreadable, no_audio_stream, no_face, ...
        ("message", pa.string()),
        ("output", pa.string()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("frames", pa.int64()),
        ("source_frames", pa.int64()),
        ("faces_found", pa.int64()),
        ("duration_s", pa.float64()),
        ("audio_seconds", pa.float64()),
        ("mel_offset_frames", pa.int64()),  # from the calibration file
        ("offset_before", pa.int64()),  # AV offset of the generated video (frames, > 0: audio lags)
        ("offset_confidence", pa.float64()),
        ("offset_confident", pa.bool_()),  # the meter did not abstain (only then is the audio shifted)
        ("offset_meter", pa.string()),
        ("offset_after", pa.int64()),  # after shifting the audio by offset_shift_frames
        ("offset_shift_frames", pa.int64()),  # audio advanced by this many frames (< 0: delayed)
        ("offset_frames_measured", pa.int64()),  # output frames the estimate used (post.measure_seconds)
        ("stabilised", pa.string()),
        ("seconds", pa.float64()),  # compute seconds spent on the pair across stages
        ("checkpoint", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("config_hash", pa.string()),
        ("code_version", pa.string()),
    ]
)


def _output_row(pair: dict[str, Any], **fields: Any) -> dict[str, Any]:
    row = {k: pair[k] for k in PAIR_COLUMNS}
    row.update(status="ok", stage="", reason="", message="", output="")
    row.update(fields)
    return row


def _failed_output(progress: PairProgress, stage: str, reason: str, message: str) -> dict[str, Any]:
    return _output_row(progress.pair, status="failed", stage=stage, reason=reason, message=message)


def finalize_pair(
    cfg: GenerateConfig,
    out: str,
    pair: dict[str, Any],
    chunks: list[dict[str, Any]],
    meter: SyncMeter | None = None,
    tracker: FaceMeshTracker | None = None,
) -> dict:
    """Join a pair's chunk files with its audio, correct the AV offset; the pair's outputs.parquet row.

    The landmark meter reads the lip shape the composite stage measured; a network meter (`meter`, with
    `tracker`) reads the first post.measure_seconds of the encoded chunks.
    """
    started = time.perf_counter()
    chunks = sorted(chunks, key=lambda c: c["start"])
    first = chunks[0]
    fps, n_out = first["fps"], first["n_out"]
    audio = pair["audio"] or pair["video"]
    target = f"{out.rstrip('/')}/{VIDEOS_DIR}/{pair['id']}.mp4"
    offsets: dict[str, Any] = {}
    advance = 0
    try:
        if cfg.post.measure_offset:
            pcm = fit_length(read_audio(audio, SAMPLE_RATE), int(round(n_out / fps * SAMPLE_RATE)))
            measure, n_measured = _offset_measure(cfg, chunks, pcm, fps, meter, tracker)
            fix = correct_offset(measure, n_measured, fps, cfg.post)
            advance = fix.shift_frames
            offsets = {
                "offset_before": fix.before.offset_frames,
                "offset_confidence": round(fix.before.confidence, 4),
                "offset_confident": fix.before.confident,
                "offset_meter": fix.before.meter,
                "offset_after": fix.after.offset_frames,
                "offset_frames_measured": n_measured,
            }
        parts, sizes = [c["part"] for c in chunks], [c["n_frames"] for c in chunks]
        mux_output(parts, sizes, audio, fps, target, cfg.post, advance / fps)
        info = probe(target)
    except MediaError as exc:
        return _output_row(pair, status="failed", stage="finalize", reason=exc.reason, message=str(exc))
    finally:
        _remove(f"{out.rstrip('/')}/{PARTS_DIR}/{pair['id']}")
    return _output_row(
        pair,
        output=target,
        fps=info.fps,
        width=info.width,
        height=info.height,
        frames=n_out,
        source_frames=max(c["n_source"] for c in chunks),
        faces_found=sum(c["faces"] for c in chunks),
        duration_s=round(info.duration_s, 4),
        audio_seconds=round(n_out / fps, 4),
        mel_offset_frames=first["mel_offset"],
        offset_shift_frames=advance,
        stabilised=resolve_stabiliser(cfg.post.stabilise),
        seconds=round(sum(c["seconds"] for c in chunks) + time.perf_counter() - started, 3),
        **offsets,
    )


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


def _remove(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def uses_gpu(cfg: ModelConfig, cluster_gpus: float) -> bool:
    """Whether the model's actors take a GPU: cuda, or auto on a cluster that has (or may grow) one."""
    import torch

    if cfg.device == "cuda" and not cluster_gpus:
        raise BadInput("model.device is cuda but the Ray cluster has no GPU")
    return cfg.device == "cuda" or (cfg.device == "auto" and bool(cluster_gpus or torch.cuda.is_available()))


def model_resources(cfg: ModelConfig) -> dict[str, float]:
    """CPUs (and GPUs, when the model runs on one) each model actor asks for."""
    from core.plan import Cluster

    cpus = DEFAULT_CPUS["model"] if cfg.cpus_per_actor is None else cfg.cpus_per_actor
    if uses_gpu(cfg, Cluster.current().limit.get("GPU", 0.0)):
        return {"gpus": cfg.gpus_per_actor, "cpus": cpus}
    return {"cpus": cpus}


def _stage_ask(what: str, key: str, count: int, cpus: float | None, flag: str) -> Any:
    from core.plan import Ask

    amount = DEFAULT_CPUS[key] if cpus is None else cpus
    return Ask(
        what, count, amount, count_flag=f"{flag}_actors", cpus_flag=f"{flag}_cpus", fit_cpus=cpus is None
    )


def stage_asks(cfg: GenerateConfig, pairs: int, gpu: bool) -> list[Any]:
    """What the pipeline's actors ask the cluster for, stage by stage (core.plan)."""
    from core.plan import Ask

    model, res = cfg.model, cfg.resources
    model_cpus = DEFAULT_CPUS["model"] if model.cpus_per_actor is None else model.cpus_per_actor
    return [
        Ask("model actors", model.actors, model_cpus, model.gpus_per_actor if gpu else 0.0,
            count_flag="model.actors", cpus_flag="model.cpus_per_actor", fit_cpus=model.cpus_per_actor is None),
        _stage_ask("prepare actors", "prepare", min(res.prepare_actors, pairs), res.prepare_cpus,
                   "resources.prepare"),
        _stage_ask("composite actors", "composite", res.composite_actors, res.composite_cpus,
                   "resources.composite"),
        _stage_ask("finalize actors", "finalize", min(res.finalize_actors, pairs), res.finalize_cpus,
                   "resources.finalize"),
    ]  # fmt: skip


def with_stage_cpus(cfg: GenerateConfig, asks: list[Any]) -> GenerateConfig:
    """`cfg` with the CPU amounts of fitted `stage_asks`."""
    model, prepare, composite, finalize = asks
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, cpus_per_actor=model.cpus),
        resources=dataclasses.replace(
            cfg.resources,
            prepare_cpus=prepare.cpus,
            composite_cpus=composite.cpus,
            finalize_cpus=finalize.cpus,
        ),
    )


def plan_resources(cfg: GenerateConfig, pairs: int) -> GenerateConfig:
    """`cfg` with the CPUs it leaves to defaults fitted so every stage's actors run at once on the cluster
    (core.plan); BadInput with the one-line plan when they cannot."""
    from core.plan import Cluster, fit

    cluster = Cluster.current()
    gpu = uses_gpu(cfg.model, cluster.limit.get("GPU", 0.0))
    return with_stage_cpus(cfg, fit(stage_asks(cfg, pairs, gpu), cluster, "generate"))


@contextlib.contextmanager
def _data_context(cfg: ResourcesConfig) -> Iterator[None]:
    """Small blocks (one chunk row each, emitted as soon as it is made) and a bounded object-store budget."""
    import ray

    from core.watchdog import data_stall_guard

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.target_max_block_size, ctx.enable_progress_bars, ctx.execution_options)
    ctx.target_max_block_size = 1024 * 1024
    ctx.enable_progress_bars = True
    options = ray.data.ExecutionOptions()
    if cfg.object_store_mb:
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=cfg.object_store_mb * 2**20
        )
    ctx.execution_options = options
    try:
        with (
            executor_poll_interval(cfg.poll_seconds),
            data_stall_guard(cfg.stall_seconds, "resources.stall_seconds"),
        ):
            yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars, ctx.execution_options = saved


def build_dataset(cfg: GenerateConfig, pairs: list[dict[str, Any]], out: str, checkpoint: str, img_size: int):
    """The three-stage Ray Data pipeline over `pairs` (lazy)."""
    import ray

    calibration = load_calibration(cfg.calibration)
    res, model = cfg.resources, cfg.model
    # Ray Data restarts killed actors and retries their batches itself; repeated chunks are ignored.
    specs = [
        StageSpec(
            PrepareStage,
            {"cfg": cfg, "img_size": img_size, "calibration": calibration, "out": out},
            StageResources(actors=min(res.prepare_actors, len(pairs)), cpus=res.prepare_cpus),
        ),
        StageSpec(
            GenerateStage,
            {"checkpoint": checkpoint, "cfg": model},
            StageResources(actors=model.actors, batch_size=model.rows_per_batch, **model_resources(model)),
        ),
        StageSpec(
            CompositeStage,
            {"cfg": cfg, "out": out},
            StageResources(actors=res.composite_actors, cpus=res.composite_cpus),
        ),
    ]
    ds = ray.data.from_items(pairs, override_num_blocks=len(pairs))
    return on_ray(ds, specs, batch_format="pyarrow", zero_copy_batch=True)


class FinalizeStage:
    """Actor: finishes pairs (finalize_pair). Started with the pipeline, so a pair's last chunk does not wait
    for a new Ray worker to start and import this module (3.3 s on a 2-core node, the run's tail)."""

    def __init__(self, cfg: GenerateConfig, out: str) -> None:
        self.cfg, self.out = cfg, out
        self.meter, self.tracker = None, None
        if cfg.post.measure_offset:
            import_deferred()  # the offset estimate's librosa, before the first pair's last chunk
            if cfg.post.meter != "landmarks":
                self.meter = build_meter(cfg.post)
                self.tracker = FaceMeshTracker(max_faces=1, model_path=cfg.landmarker_model)

    def finalize(self, pair: dict[str, Any], chunks: list[dict[str, Any]]) -> dict[str, Any]:
        return finalize_pair(self.cfg, self.out, pair, chunks, self.meter, self.tracker)


def _finalizers(cfg: GenerateConfig, out: str, pairs: int) -> list[Any]:
    import ray

    res = cfg.resources
    actor = ray.remote(FinalizeStage).options(
        num_cpus=res.finalize_cpus,
        max_restarts=res.finalize_restarts,
        max_task_retries=res.finalize_restarts,
        runtime_env=worker_runtime_env(),
    )
    return [actor.remote(cfg, out) for _ in range(max(1, min(res.finalize_actors, pairs)))]


def _finished(progress: PairProgress, future: Any, stall_seconds: float = 0.0) -> dict[str, Any]:
    """The finalize result of a pair, or its failed row when the actor died more often than it restarts;
    Stalled when it takes more than `stall_seconds` (0: no limit)."""
    import ray

    from core.watchdog import free_resources

    try:
        return ray.get(future, timeout=stall_seconds or None)
    except ray.exceptions.GetTimeoutError:
        raise Stalled(
            f"no progress for {stall_seconds:g} s: stage finalize (pair {progress.pair['id']}); "
            f"{free_resources()} (raise resources.stall_seconds if it is only slow)"
        ) from None
    except ray.exceptions.RayError as exc:  # the pair fails; the other pairs' rows are still written
        reason = "worker_died" if isinstance(exc, ray.exceptions.RayActorError) else "error"
        cause = getattr(exc, "cause", None)  # a RayTaskError carries finalize's own exception
        if isinstance(cause, Exception):
            message = f"{type(cause).__name__}: {cause}"
        else:
            message = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
        return _failed_output(progress, "finalize", reason, message)


def _collect(cfg: GenerateConfig, ds, pairs: list[dict[str, Any]], out: str) -> list[dict[str, Any]]:
    """Stream chunk rows; a finalize actor finishes each pair as soon as its chunks are all in."""
    import ray

    finalizers = _finalizers(cfg, out, len(pairs))
    progress = {p["id"]: PairProgress(p) for p in pairs}
    futures: dict[str, Any] = {}
    try:
        for row in ds.iter_rows():
            state = progress[row["pair_id"]]
            state.add({k: v for k, v in row.items() if k not in _HEAVY})
            if state.ready and not state.submitted:
                state.submitted = True
                actor = finalizers[len(futures) % len(finalizers)]
                futures[state.pair["id"]] = actor.finalize.remote(state.pair, list(state.chunks.values()))
        stall = cfg.resources.stall_seconds
        finished = {pair_id: _finished(progress[pair_id], f, stall) for pair_id, f in futures.items()}
    finally:
        for actor in finalizers:
            ray.kill(actor)
    rows = []
    for pair in pairs:
        state = progress[pair["id"]]
        if pair["id"] in finished:
            rows.append(finished[pair["id"]])
            continue
        failure = state.failure or {"stage": "collect", "reason": "incomplete", "message": "chunks missing"}
        rows.append(_failed_output(state, failure["stage"], failure["reason"], failure["message"]))
    return rows


def _checkpoint_info(checkpoint: str) -> tuple[str, int, str]:
    """(resolved model.pt URI, img_size, sha256) of a wav2lip checkpoint; BadInput otherwise."""
    from models.checkpoint import read_payload

    payload, target, digest = read_payload(
        checkpoint if is_remote(checkpoint) else os.path.abspath(checkpoint)
    )
    if payload["kind"] != "wav2lip":
        raise BadInput(f"checkpoint {target} holds a {payload['kind']} model, expected wav2lip")
    return target, int(payload["img_size"]), digest


def _cleanup(out: str, rows: list[dict[str, Any]]) -> None:
    """Remove chunk files of failed pairs, remuxed sources and stale videos of failed pairs."""
    for row in rows:
        _remove(f"{out}/{PARTS_DIR}/{row['id']}")
        if row["status"] != "ok":
            _remove(f"{out}/{VIDEOS_DIR}/{row['id']}.mp4")
    for directory in (PARTS_DIR, WORK_DIR):
        _remove(f"{out}/{directory}")


def run(
    cfg: GenerateConfig, pairs_uri: str, out: str, checkpoint: str, address: str | None = None
) -> dict[str, Any]:
    """Generate every pair of `pairs_uri` into `out`; writes OUT/videos/*.mp4 and OUT/outputs.parquet."""
    validate(cfg)
    pairs = read_pairs(pairs_uri)
    model_uri, img_size, digest = _checkpoint_info(checkpoint)
    load_calibration(cfg.calibration)  # bad calibration files fail here, before Ray starts
    out = out.rstrip("/") if is_remote(out) else os.path.abspath(out)  # workers may run elsewhere
    store = Store(out)
    try:
        store.makedirs(VIDEOS_DIR)
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc}") from exc
    ensure_ray(address)
    planned = plan_resources(cfg, len(pairs))  # the lineage keeps `cfg`: sizing does not change outputs
    started = time.perf_counter()
    with _data_context(planned.resources):
        ds = build_dataset(planned, pairs, out, model_uri, img_size)
        rows = _collect(planned, ds, pairs, out)
    _cleanup(out, rows)
    wall = time.perf_counter() - started
    lineage = {"checkpoint": model_uri, "checkpoint_sha256": digest, "config_hash": config_hash(cfg)}
    for row in rows:
        row.update(lineage, code_version=code_version())
    store.write_table("outputs.parquet", pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    store.write_json("run.json", {"config": to_dict(cfg), **lineage, "pairs": pairs_uri})
    ok = [r for r in rows if r["status"] == "ok"]
    frames = sum(r["frames"] for r in ok)
    for row in rows:
        if row["status"] != "ok":
            log.warning(
                "generate: %s failed at %s: %s (%s)", row["id"], row["stage"], row["reason"], row["message"]
            )
    return {
        "out": out,
        "outputs": store.uri("outputs.parquet"),
        "videos": store.uri(VIDEOS_DIR),
        "pairs": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "frames": frames,
        "wall_seconds": round(wall, 2),
        "frames_per_second": round(frames / wall, 2) if wall > 0 else 0.0,
    }

"""Step 1, prepare: decode the source video, track the face, crop, and cut the new audio's mels, chunk
by chunk."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from core.errors import ItemFailure
from core.malloc import reuse_freed_memory
from core.ray import (
    import_deferred,
)
from core.storage import is_remote
from generation.blend import MOUTH_POINTS
from generation.calibration import Calibration
from generation.config import WORK_DIR, GenerateConfig
from generation.extension import frames_for_audio, reference_positions, source_indices
from generation.rows import failure_row, new_row, pack, to_table
from pipeline.audio import SAMPLE_RATE, mel_windows, melspectrogram
from pipeline.crops import crop_boxes, crop_faces, landmarks_in_crop
from pipeline.landmarks import FaceMeshTracker, scene_cuts, smooth_landmarks
from pipeline.media import MediaError, ProbeInfo, ReadAhead, iter_frames, local_path, probe, read_audio
from pipeline.media.decoding import (
    SEEKABLE_FORMATS,
    container_format,
    read_frame_range,
    remux_video,
)


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
    cuts: list[int] = field(default_factory=list)  # source frames that start a shot (filled while tracking)


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
        plan.cuts = stream.cuts  # the same list: the extension's references see every cut found
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
            references=pack(
                reference_positions(index[found], plan.cuts, self.cfg.reference).astype(np.int32)
            ),
        )

"""Step 3, composite: paste the generated mouths back into the source frames and encode the chunk."""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import tempfile
import time
import weakref
from pathlib import PurePosixPath
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa

from core.malloc import reuse_freed_memory
from core.ray import (
    import_deferred,
)
from core.storage import is_remote
from generation.blend import blend_i420, i420_to_rgb, mouth_mask, skin_weights
from generation.config import PARTS_DIR, GenerateConfig
from generation.rows import _HEAVY, pack, to_table, unpack
from pipeline.landmarks import FaceMeshTracker, lip_shape, smooth_landmarks
from pipeline.media import (
    MediaError,
    ProbeInfo,
    local_path,
    probe,
)
from pipeline.media.decoding import (
    FrameRangeReader,
)
from pipeline.media.encoding import write_i420


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
            skin = skin_weights(mask, points[k])
            blend_i420(frames[t], generated[k], boxes[t], mask, self.cfg.blend, skin)
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

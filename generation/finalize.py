"""Step 4, finalize: join a pair's encoded chunks with its audio, correct its AV offset, and write its
output row."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from core.ray import (
    import_deferred,
)
from generation.config import PARTS_DIR, VIDEOS_DIR, GenerateConfig
from generation.correction import _offset_measure, correct_offset
from generation.extension import fit_length
from generation.pairs import PAIR_COLUMNS
from pipeline.audio import SAMPLE_RATE
from pipeline.landmarks import FaceMeshTracker
from pipeline.media import (
    MediaError,
    probe,
    read_audio,
)
from pipeline.media.encoding import mux_output, resolve_stabiliser
from pipeline.meters import SyncMeter, build_meter


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
        mux_output(
            parts,
            sizes,
            audio,
            fps,
            target,
            crf=cfg.post.crf,
            preset=cfg.post.preset,
            audio_bitrate=cfg.post.audio_bitrate,
            stabilise=cfg.post.stabilise,
            advance_seconds=advance / fps,
        )
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


def _remove(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


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

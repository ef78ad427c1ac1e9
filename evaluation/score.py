"""`lipsync score INPUT OUT`: objective lip-sync and quality scores of many videos on a Ray actor pool.

INPUT is a directory of videos, a corpus manifest (`video` column, e.g. `lipsync synth`'s manifest.csv) or
generation's `outputs.parquet` (`output` column; its `video`, if any, is the source face). Optional
columns: `id`, `language`, `speaker`, `system`, `transcript`, `timeline` (phoneme-timeline JSON file),
`phonemes` (the timeline inline), `source` (the video the output was made from), `reference`
(ground truth for PSNR/SSIM), `split`, `status` (rows generation did not finish are kept, as skipped).

Each actor (`ClipScorer`) loads FaceMesh and the SyncNets once and scores one video per call: landmark
sync, viseme agreement, LSE-D/LSE-C, visual quality. A video that cannot be scored (missing, corrupt, no
face) is a row with `status` "failed" and a `reason`, never a crash. Writes `OUT/scores.parquet` (one row
per video, with per-frame traces for the report) and `OUT/summary.json` (per language and per system);
with `calibration_out`, the calibration file generation reads (`evaluation.calibration`), from the
median landmark AV offset per language and per speaker of the validation rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from core.config import code_version, config_hash, to_dict
from core.errors import BadInput, ItemFailure
from core.malloc import reuse_freed_memory
from core.manifest import MANIFEST_EXTENSIONS, read_table
from core.ray import WORKER_DIED, ensure_ray, import_deferred, run_on_actor_pool
from core.storage import Store, is_remote, join_uri, manifest_path, manifest_text
from evaluation import baseline, quality
from evaluation.calibration import Calibration, calibration_from_offsets, load_calibration, save_calibration
from evaluation.sync import (
    CLOSED_BELOW,
    OPEN_ABOVE,
    align_transcript,
    landmark_sync,
    timeline_from_document,
    timeline_openness,
    viseme_agreement,
)
from pipeline import phonemes as ph
from pipeline.corpus import VIDEO_EXTENSIONS, discover, input_id
from pipeline.landmarks import FaceMeshTracker, fill_gaps, mouth_openness, smooth_landmarks
from pipeline.media import MediaError, ProbeInfo, iter_frames, local_path, probe, read_audio
from pipeline.meters import METERS, MeterConfig
from pipeline.stages import PoolConfig

log = logging.getLogger(__name__)

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
    baseline: bool = True  # generation outputs: also score the "do nothing" video (source + new audio)
    # one video per call: an actor holds a whole decoded video (up to max_seconds), so calls do not overlap
    resources: PoolConfig = field(default_factory=PoolConfig)


# --- inputs ---------------------------------------------------------------------------------------------
def _manifest_of(source: str) -> str | None:
    """The manifest behind INPUT: the file itself, or one inside a corpus directory; None for a plain dir."""
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        return source
    fs, path = fsspec.core.url_to_fs(source)
    for ext in MANIFEST_EXTENSIONS:
        for name in ("manifest", "outputs"):
            if fs.exists(f"{path.rstrip('/')}/{name}{ext}"):
                return f"{source.rstrip('/')}/{name}{ext}"
    return None


def _base_of(uri: str) -> str:
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def _input_row(record: dict[str, Any], base: str, system: str) -> dict[str, Any]:
    """One video to score from a manifest record (paths resolved against the manifest's directory)."""
    video, path_of = (
        manifest_path(base, record.get("video")),
        lambda key: manifest_path(base, record.get(key)),
    )
    return {
        "id": manifest_text(record.get("id")) or input_id(video or json.dumps(record, default=str)),
        "video": video,
        "audio": path_of("audio"),
        "language": manifest_text(record.get("language")) or "und",
        "speaker": manifest_text(record.get("speaker")),
        "system": manifest_text(record.get("system")) or system,
        "split": manifest_text(record.get("split")),
        "transcript": manifest_text(record.get("transcript")),
        "timeline": path_of("timeline"),
        "phonemes": manifest_text(record.get("phonemes")),
        "source": path_of("source"),
        "reference": path_of("reference"),
        "input_status": manifest_text(record.get("status")).lower(),
        "input_reason": manifest_text(record.get("reason")),
        "injected_offset_frames": manifest_text(record.get("injected_offset_frames")),
    }


def _generation_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Generation's outputs table: `output` is the video to score, its `video` the source face."""
    records = []
    for record in frame.to_dict(orient="records"):
        record = dict(record)
        if "video" in record and not manifest_text(record.get("source")):
            record["source"] = record["video"]
        record["video"] = record.pop("output")  # "" for a pair generation failed: kept as skipped
        record.pop("audio", None)  # the driving audio: the output carries its own, as it was muxed
        records.append(record)
    return records


def _default_system(source: str, manifest: str | None) -> str:
    """The input's name: its directory for a manifest or a video file, else the directory itself."""
    target = manifest if manifest else source
    if target.lower().endswith((*MANIFEST_EXTENSIONS, *VIDEO_EXTENSIONS)):
        target = posixpath.dirname(target.rstrip("/")) or os.path.dirname(os.path.abspath(target))
    return posixpath.basename(target.rstrip("/")) or "default"


def discover_inputs(source: str, system: str = "") -> list[dict[str, Any]]:
    """Videos to score from a directory, a corpus manifest or generation's outputs table."""
    manifest = _manifest_of(source)
    system = system or _default_system(source, manifest)
    if manifest is None:  # a plain directory (or one video): the pipeline's scan
        base, records = source, discover(source)
    else:
        try:
            frame = read_table(manifest)
        except FileNotFoundError as exc:
            raise BadInput(f"manifest {manifest} does not exist") from exc
        except (ValueError, pd.errors.ParserError) as exc:
            raise BadInput(f"manifest {manifest} cannot be read: {exc}") from exc
        base = _base_of(manifest)
        if "output" in frame.columns:
            records = _generation_records(frame)
        elif "video" in frame.columns:
            records = frame.to_dict(orient="records")
        else:
            raise BadInput(f"manifest {manifest} has neither a 'video' nor an 'output' column")
    keep = [
        r
        for r in records
        if manifest_text(r.get("video")) or manifest_text(r.get("status")).lower() not in OK_STATUSES
    ]
    rows = [_input_row(r, base, system) for r in keep]
    if not rows:
        raise BadInput(f"input {source} holds no videos to score")
    return rows


def baseline_inputs(source: str, out: str) -> list[dict[str, Any]]:
    """The "do nothing" videos of a generation outputs table, muxed into OUT/baseline/ (evaluation.baseline)."""
    manifest = _manifest_of(source)
    if manifest is None:
        return []
    frame = read_table(manifest)
    if "output" not in frame.columns or "video" not in frame.columns or "audio" not in frame.columns:
        return []
    base = _base_of(manifest)
    return [
        _input_row(r, base, baseline.BASELINE_SYSTEM) for r in baseline.baseline_records(frame, base, out)
    ]


def attach_references(rows: list[dict[str, Any]], manifest: str) -> None:
    """Fill `reference` from a manifest with a `reference` column keyed by `id` or by `video`."""
    try:
        frame = read_table(manifest)
    except FileNotFoundError as exc:
        raise BadInput(f"reference manifest {manifest} does not exist") from exc
    if "reference" not in frame.columns or not ({"id", "video"} & set(frame.columns)):
        raise BadInput(
            f"reference manifest {manifest} needs a 'reference' column and an 'id' or 'video' column"
        )
    base = _base_of(manifest)
    by_key: dict[str, str] = {}
    for record in frame.to_dict(orient="records"):
        ref = join_uri(base, manifest_text(record["reference"]))
        if manifest_text(record.get("id")):
            by_key[manifest_text(record["id"])] = ref
        if manifest_text(record.get("video")):
            video = manifest_text(record["video"])
            by_key[join_uri(base, video)] = ref
            by_key[posixpath.basename(video)] = ref
    for row in rows:
        ref = (
            by_key.get(row["id"]) or by_key.get(row["video"]) or by_key.get(posixpath.basename(row["video"]))
        )
        if ref:
            row["reference"] = ref


# --- one video ------------------------------------------------------------------------------------------
def decode_size(info: ProbeInfo, max_side: int) -> tuple[int, int]:
    """(width, height) to decode at: at most `max_side` on the longer side, even sides."""
    scale = min(1.0, max_side / max(info.width, info.height))
    return int(round(info.width * scale / 2) * 2), int(round(info.height * scale / 2) * 2)


def decode(uri: str, cfg: ScoreConfig, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames at cfg.fps (first max_seconds) and 16 kHz mono PCM of the same span."""
    max_frames = int(round(cfg.max_seconds * cfg.fps))
    with local_path(uri) as path:
        info = probe(path)
        size = size or decode_size(info, cfg.max_side)
        chunks, total = [], 0
        for chunk in iter_frames(path, fps=cfg.fps, chunk=128, size=size):
            chunks.append(chunk[: max_frames - total])
            total += len(chunks[-1])
            if total >= max_frames:
                break
        pcm = read_audio(path, cfg.sample_rate) if info.has_audio else np.zeros(0, np.float32)
    frames = np.concatenate(chunks) if chunks else np.zeros((0, size[1], size[0], 3), np.uint8)
    return frames, pcm[: int(round(len(frames) * cfg.sample_rate / cfg.fps))]


def _json_safe(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _trace(values: np.ndarray, limit: int) -> list[float | None]:
    return [_json_safe(v) for v in np.asarray(values, np.float64)[:limit]]


class ClipScorer:
    """The map_batches callable: FaceMesh and the SyncNets loaded once per actor, one video per row."""

    def __init__(self, cfg: ScoreConfig, syncnet: str | None = None, syncnet_v2: str | None = None) -> None:
        reuse_freed_memory()
        import_deferred()
        self.cfg = cfg
        self.tracker = FaceMeshTracker(max_faces=1)
        self.embedders: list[Any] = []  # torch is imported only when a SyncNet is used
        if syncnet:
            from pipeline.lse import SyncNetEmbedder

            self.embedders.append(SyncNetEmbedder(syncnet, cfg.syncnet_batch))
        if syncnet_v2:
            from pipeline.lse import SyncNetV2Embedder

            self.embedders.append(SyncNetV2Embedder(syncnet_v2, cfg.syncnet_batch))
        self.lineage = {"config_hash": config_hash(cfg), "code_version": code_version()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = list(batch)
        out: dict[str, list] = {"id": [], "row": []}
        for i in range(len(batch[keys[0]])):
            row = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys}
            scored = self.score(row)
            out["id"].append(row["id"])
            out["row"].append(json.dumps(scored))
        return out

    def given_up(self, row: dict[str, Any], attempts: int) -> dict[str, list]:
        """The failed row of an input whose actor was killed on each of its `attempts`."""
        message = f"{row['video']}: its scoring actor was killed on each of {attempts} attempts"
        failed = {**self.base_row(row), "status": "failed", "reason": WORKER_DIED, "message": message}
        return {"id": [row["id"]], "row": [json.dumps({k: _json_safe(v) for k, v in failed.items()})]}

    def base_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """The columns every row of `row` has, before its scores."""
        return {
            **{k: row[k] for k in ("id", "video", "language", "speaker", "system", "split")},
            "injected_offset_frames": int(row["injected_offset_frames"])
            if row["injected_offset_frames"]
            else None,
            "status": "ok",
            "reason": "",
            "message": "",
            "worker_pid": os.getpid(),
            **self.lineage,
        }

    def score(self, row: dict[str, Any]) -> dict[str, Any]:
        """The scored row of one input; failures become status "failed" with a reason and a message."""
        started = time.perf_counter()
        result = self.base_row(row)
        if row["input_status"] not in OK_STATUSES:  # e.g. a pair generation failed: nothing to score
            reason = row["input_reason"] or f"input_{row['input_status']}"
            return {
                **result,
                "status": "skipped",
                "reason": reason,
                "message": f"input status {row['input_status']}",
            }
        try:
            result.update(self.measure(row))
        except (MediaError, ItemFailure) as exc:
            result.update(status="failed", reason=exc.reason, message=str(exc))
        except BadInput as exc:
            result.update(status="failed", reason="bad_input", message=str(exc))
        result["seconds"] = round(time.perf_counter() - started, 3)
        return {k: _json_safe(v) for k, v in result.items()}

    def measure(self, row: dict[str, Any]) -> dict[str, Any]:
        """Every score of one video (raises MediaError / ItemFailure when it cannot be scored)."""
        cfg = self.cfg
        frames, pcm = decode(row["video"], cfg)
        if row["audio"]:
            pcm = read_audio(row["audio"], cfg.sample_rate)[: len(pcm) or None]
        if len(pcm) == 0:
            raise ItemFailure("score", "no_audio_stream", f"{row['video']}: no audio to score against")
        if min(len(frames), int(len(pcm) * cfg.fps / cfg.sample_rate)) < MIN_FRAMES:
            raise ItemFailure(
                "score", TOO_SHORT, f"{row['video']}: {len(frames)} frames are too few to score"
            )
        track = self.tracker.track(frames, fps=cfg.fps)
        if not track.found.any():
            raise ItemFailure("score", NO_FACE, f"{row['video']}: no face in any frame")
        smooth = smooth_landmarks(track.landmarks, track.found)
        raw = fill_gaps(track.landmarks, track.found)[0]
        openness = mouth_openness(smooth)
        est, scores = landmark_sync(smooth, pcm, cfg.sample_rate, cfg.fps, cfg.max_lag)
        scores.update(
            n_frames=len(frames),
            duration_s=len(frames) / cfg.fps,
            face_fraction=track.found_fraction,
            width=int(frames.shape[2]),
            height=int(frames.shape[1]),
        )
        scores.update(self._visemes(row, pcm, mouth_openness(raw), len(frames)))
        for embedder in self.embedders:
            from pipeline.lse import lse_of_clip

            lse = lse_of_clip(embedder, frames, smooth, pcm, cfg.sample_rate, cfg.fps, cfg.vshift)
            scores.update(lse.to_dict(embedder.name))
            scores[f"{embedder.name}_curve"] = [round(d, 5) for d in lse.mean_distances]
        scores.update(self._quality(row, frames, track.landmarks, smooth))
        scores["openness_trace"] = _trace(openness, cfg.trace_frames)
        scores["envelope_trace"] = baseline.envelope_trace(
            pcm, cfg.sample_rate, len(frames), cfg.fps, cfg.trace_frames
        )
        scores.update(baseline.mouth_strip(frames, smooth))
        scores["landmark_correlations"] = [round(c, 5) for c in est.correlations]
        return scores

    def _visemes(self, row: dict[str, Any], pcm: np.ndarray, openness: np.ndarray, n: int) -> dict[str, Any]:
        timeline, source = self._timeline(row, pcm)
        out: dict[str, Any] = {"timeline_source": source}
        if timeline:
            agreement = viseme_agreement(
                openness, timeline, self.cfg.fps, self.cfg.closed_below, self.cfg.open_above
            )
            out.update(agreement.to_dict())
            out["timeline_trace"] = _trace(
                timeline_openness(timeline, n, self.cfg.fps), self.cfg.trace_frames
            )
        return out

    def _timeline(self, row: dict[str, Any], pcm: np.ndarray) -> tuple[list[ph.Phoneme], str]:
        """The phoneme timeline in the clip's audio time and where it came from (json, espeak or none)."""
        if row["phonemes"]:
            return timeline_from_document(row["phonemes"]), "json"
        if row["timeline"]:
            try:
                with fsspec.open(row["timeline"], "rt", encoding="utf-8") as fh:
                    return timeline_from_document(fh.read()), "json"
            except FileNotFoundError as exc:
                raise ItemFailure(
                    "score", "timeline_not_found", f"timeline {row['timeline']} does not exist"
                ) from exc
        language = row["language"]
        if row["transcript"] and language in ph.list_voices():
            try:
                return align_transcript(row["transcript"], language, pcm, self.cfg.sample_rate), "espeak"
            except ValueError as exc:
                log.warning("%s: transcript not aligned: %s", row["video"], exc)
        return [], "none"

    def _quality(
        self, row: dict[str, Any], frames: np.ndarray, raw: np.ndarray, smooth: np.ndarray
    ) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = quality.sharpness(frames, smooth, cfg.quality_frames)
        out["landmark_jitter"] = quality.landmark_jitter(raw)
        out["mouth_flicker"] = quality.mouth_flicker(frames, smooth)
        out["upper_face_motion"] = quality.expression_motion(smooth)
        size = (frames.shape[2], frames.shape[1])
        if row["reference"]:
            reference, _ = decode(row["reference"], cfg, size)
            out.update(quality.psnr_ssim(frames, reference, cfg.quality_frames))
        if row["source"]:
            out.update(self._against_source(row["source"], frames, smooth, out["mouth_sharpness"]))
        return out

    def _against_source(
        self, source: str, frames: np.ndarray, smooth: np.ndarray, mouth_sharpness: float
    ) -> dict[str, Any]:
        """Mouth sharpness ratio and upper-face consistency against the source face video."""
        src_frames, _ = decode(source, self.cfg, (frames.shape[2], frames.shape[1]))
        track = self.tracker.track(src_frames, fps=self.cfg.fps)
        if not track.found.any():
            return {}
        src_smooth = smooth_landmarks(track.landmarks, track.found)
        src_sharp = quality.sharpness(src_frames, src_smooth, self.cfg.quality_frames)["mouth_sharpness"]
        ratio = mouth_sharpness / src_sharp if src_sharp and np.isfinite(src_sharp) else float("nan")
        return {"mouth_sharpness_ratio": ratio, **quality.upper_face_consistency(smooth, src_smooth)}


# --- the job --------------------------------------------------------------------------------------------
def _validate(cfg: ScoreConfig) -> None:
    if cfg.fps <= 0 or cfg.max_side < 64 or cfg.vshift < 1 or cfg.max_lag < 1:
        raise BadInput("fps must be > 0, max_side >= 64, vshift and max_lag >= 1")
    if cfg.calibration_meter not in METERS:
        raise BadInput(f"calibration_meter must be one of {', '.join(METERS)}, not {cfg.calibration_meter!r}")
    cfg.resources.validate()


def _check_models(syncnet: str | None, syncnet_v2: str | None) -> None:
    """Fail fast, on the driver, with one line, when a model file is missing or of the wrong kind."""
    if syncnet:
        from models.checkpoint import read_payload

        payload, target, _ = read_payload(syncnet)
        if payload["kind"] != "syncnet":
            raise BadInput(f"checkpoint {target} holds a {payload['kind']} model, expected syncnet")
    if syncnet_v2:
        from models.syncnet_v2 import load_syncnet_v2

        load_syncnet_v2(syncnet_v2)


def _run_pool(
    cfg: ScoreConfig, rows: list[dict[str, Any]], syncnet: str | None, syncnet_v2: str | None
) -> list:
    """Stream the inputs through the actor pool (progress bar on stderr); returns the scored rows."""
    import ray

    from core.watchdog import data_stall_guard

    ray.data.DataContext.get_current().enable_progress_bars = True
    pool = cfg.resources.planned("scoring actors", len(rows), "score")  # rows keep `cfg`'s config hash
    with data_stall_guard(pool.stall_seconds, "resources.stall_seconds"):
        scored = run_on_actor_pool(
            rows,
            ClipScorer,
            {"cfg": cfg, "syncnet": syncnet, "syncnet_v2": syncnet_v2},
            actors=pool.workers,
            cpus_per_actor=pool.cpus_per_worker,
            max_restarts=pool.max_restarts,
            key="id",
            poll_seconds=pool.poll_seconds,  # a video takes seconds to score
        )
    return [json.loads(r["row"]) for r in scored]


def scores_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One Parquet-ready table from scored rows whose columns differ (failed rows have no metrics)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns})


# --- summaries ------------------------------------------------------------------------------------------
SUMMARY_METRICS = (
    "landmark_offset_frames",
    "landmark_confidence",
    "openness_envelope_correlation",
    "viseme_agreement",
    "bilabial_closed",
    "open_vowel_open",
    "lse_d",
    "lse_c",
    "lse_v2_d",
    "lse_v2_c",
    "psnr",
    "ssim",
    "mouth_sharpness_ratio",
    "mouth_to_face_sharpness",
    "landmark_jitter",
    "mouth_flicker",
    "upper_face_shape_distance",
    "upper_face_motion_ratio",
)


def _finite(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    values = [r.get(key) for r in rows]
    return np.array([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], float)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, failures by reason, mean and median of every metric, and the share of |offset| <= 1."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["status"] != "ok":
            failed[r["reason"]] += 1
    out: dict[str, Any] = {
        "videos": len(rows),
        "scored": len(ok),
        "not_scored_by_reason": dict(sorted(failed.items())),
    }
    for key in SUMMARY_METRICS:
        values = _finite(ok, key)
        if len(values):
            out[key] = {"mean": round(float(values.mean()), 4), "median": round(float(np.median(values)), 4)}
    for key in ("landmark_offset_frames", "lse_offset_frames", "lse_v2_offset_frames"):
        values = _finite(ok, key)
        if len(values):
            out[key.replace("offset_frames", "offset_within_1")] = round(
                float(np.mean(np.abs(values) <= 1)), 4
            )
    return out


def _grouped(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r.get(key) or ""].append(r)
    return {name: summarise(group) for name, group in sorted(groups.items())}


def summary_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: overall, per language, per system and per system x language."""
    systems = defaultdict(list)
    for r in rows:
        systems[r["system"]].append(r)
    return {
        "overall": summarise(rows),
        "languages": _grouped(rows, "language"),
        "systems": {
            name: {**summarise(g), "languages": _grouped(g, "language")}
            for name, g in sorted(systems.items())
        },
    }


CALIBRATION_COLUMNS = {  # meter -> (offset column, confidence column) of scores.parquet
    "landmarks": ("landmark_offset_frames", "landmark_confidence"),
    "syncnet_v2": ("lse_v2_offset_frames", "lse_v2_c"),
    "expert": ("lse_offset_frames", "lse_c"),
}


def calibration_from_scores(rows: list[dict[str, Any]], cfg: ScoreConfig) -> Calibration:
    """Per-language and per-speaker calibration from the AV offsets the chosen meter read on the
    validation rows.

    Validation rows are those with split "val" (all rows when no row has a split); readings the meter
    abstains on (below `calibration_min_confidence`, by default its own threshold) are left out; `calibration_used` is the calibration the videos were
    generated with (entries become k_used - round(median offset), see `evaluation.calibration`).
    """
    offset_key, confidence_key = CALIBRATION_COLUMNS[cfg.calibration_meter]
    threshold = MeterConfig(cfg.calibration_meter, min_confidence=cfg.calibration_min_confidence).threshold
    usable = [
        r
        for r in rows
        if r["status"] == "ok"
        and r.get(offset_key) is not None
        and (r.get(confidence_key) or 0.0) >= threshold
        and not (cfg.calibration_meter == "landmarks" and r.get("landmark_reason"))
    ]
    if any(r.get("split") for r in usable):
        usable = [r for r in usable if r.get("split") in ("val", "validation")]
    if not usable:
        raise BadInput("no scored validation rows to calibrate from")
    by_language: dict[str, list[float]] = defaultdict(list)
    by_speaker: dict[str, list[float]] = defaultdict(list)
    for r in usable:
        by_language[r["language"]].append(r[offset_key])
        if r.get("speaker"):
            by_speaker[r["speaker"]].append(r[offset_key])
    return calibration_from_offsets(
        by_language,
        by_speaker,
        used=load_calibration(cfg.calibration_used or None),
        min_clips=cfg.calibration_min_clips,
        extra={"source": f"lipsync score: {offset_key} ({cfg.calibration_meter} meter)", "fps": cfg.fps},
    )


def run(
    cfg: ScoreConfig,
    source: str,
    out: str,
    syncnet: str | None = None,
    syncnet_v2: str | None = None,
    reference: str | None = None,
    calibration_out: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Score every video of `source` into `out` (scores.parquet, summary.json); returns the paths written."""
    _validate(cfg)
    started = time.perf_counter()
    rows = discover_inputs(source, cfg.system)
    if cfg.baseline:
        rows += baseline_inputs(source, out)
    if reference:
        attach_references(rows, reference)
    _check_models(syncnet, syncnet_v2)
    needs = {"syncnet_v2": (syncnet_v2, "--syncnet-v2"), "expert": (syncnet, "--syncnet")}
    if calibration_out and cfg.calibration_meter in needs and not needs[cfg.calibration_meter][0]:
        flag = needs[cfg.calibration_meter][1]
        raise BadInput(f"calibration_meter {cfg.calibration_meter} reads that network's scores: pass {flag}")
    store = Store(out)
    try:
        store.makedirs()
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc}") from exc
    log.info("score: %d videos from %s", len(rows), source)
    ensure_ray(address)
    scored = _run_pool(cfg, rows, syncnet, syncnet_v2)
    order = {r["id"]: i for i, r in enumerate(rows)}
    scored.sort(key=lambda r: order.get(r["id"], len(order)))
    store.write_table("scores.parquet", scores_table(scored))
    wall = time.perf_counter() - started
    summary = {
        **summary_document(scored),
        "throughput": {"wall_seconds": round(wall, 2), "videos_per_second": round(len(scored) / wall, 3)},
        "models": {"syncnet": syncnet, "syncnet_v2": syncnet_v2},
        "source": source,
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
    }
    store.write_json("summary.json", summary)
    result = {
        "out": out,
        "scores": store.uri("scores.parquet"),
        "summary": store.uri("summary.json"),
        "videos": len(scored),
        "scored": summary["overall"]["scored"],
        "not_scored": len(scored) - summary["overall"]["scored"],
        "videos_per_second": summary["throughput"]["videos_per_second"],
    }
    if calibration_out:
        calibration = calibration_from_scores(scored, cfg)
        result["calibration"] = save_calibration(calibration_out, calibration)
        result["calibrated_languages"] = sorted(calibration.languages)
        left_out = sorted({r["language"] for r in scored if r["status"] == "ok"} - set(calibration.languages))
        if left_out:
            log.warning(
                "calibration: no entry for %s (fewer than %d validation clips each)",
                ", ".join(left_out),
                cfg.calibration_min_clips,
            )
    return result

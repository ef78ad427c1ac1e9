"""`ClipScorer`: the scoring actor. Loads FaceMesh and the SyncNets once and scores one video per call:
landmark sync, viseme agreement, LSE-D/LSE-C, visual quality; a video that cannot be scored is a failed row
with its reason."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import fsspec
import numpy as np

from core.config import code_version, config_hash
from core.errors import BadInput, ItemFailure
from core.malloc import reuse_freed_memory
from core.ray import WORKER_DIED, import_deferred
from evaluation import baseline, quality
from evaluation.expression import expression_consistency, expression_summary
from evaluation.score_config import MIN_FRAMES, NO_FACE, OK_STATUSES, TOO_SHORT, ScoreConfig
from evaluation.sync import (
    align_transcript,
    landmark_sync,
    timeline_from_document,
    timeline_openness,
    viseme_agreement,
    warm_up_alignment,
)
from pipeline import phonemes as ph
from pipeline.landmarks import FaceMeshTracker, fill_gaps, mouth_openness, smooth_landmarks
from pipeline.media import MediaError, ProbeInfo, iter_frames, local_path, probe, read_audio

log = logging.getLogger(__name__)


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
        warm_up_alignment()
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
            "emotion": row.get("emotion", ""),
            "source": row.get("source", ""),
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
        if cfg.expression:
            scores.update(expression_summary(smooth))
        scores["openness_trace"] = _trace(openness, cfg.trace_frames)
        scores["envelope_trace"] = baseline.envelope_trace(
            pcm, cfg.sample_rate, len(frames), cfg.fps, cfg.trace_frames
        )
        scores.update(baseline.mouth_strip(frames, smooth))
        scores["landmark_correlations"] = [round(c, 5) for c in est.correlations]
        return scores

    def _visemes(self, row: dict[str, Any], pcm: np.ndarray, openness: np.ndarray, n: int) -> dict[str, Any]:
        timeline, source = self.timeline(row, pcm)
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

    def timeline(self, row: dict[str, Any], pcm: np.ndarray) -> tuple[list[ph.Phoneme], str]:
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
        """Mouth sharpness ratio, upper-face and expression consistency against the source face video (its
        landmarks are tracked once and serve all three)."""
        src_frames, _ = decode(source, self.cfg, (frames.shape[2], frames.shape[1]))
        track = self.tracker.track(src_frames, fps=self.cfg.fps)
        if not track.found.any():
            return {}
        src_smooth = smooth_landmarks(track.landmarks, track.found)
        src_sharp = quality.sharpness(src_frames, src_smooth, self.cfg.quality_frames)["mouth_sharpness"]
        ratio = mouth_sharpness / src_sharp if src_sharp and np.isfinite(src_sharp) else float("nan")
        return {
            "mouth_sharpness_ratio": ratio,
            **quality.upper_face_consistency(smooth, src_smooth),
            **(expression_consistency(smooth, src_smooth) if self.cfg.expression else {}),
        }

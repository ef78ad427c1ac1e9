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
with `calibration_out`, the calibration file generation reads (`generation.calibration`), from the
median landmark AV offset per language and per speaker of the validation rows."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from core.config import code_version, config_hash, to_dict
from core.errors import BadInput
from core.ray import ensure_ray, run_on_actor_pool
from core.storage import Store
from evaluation.clip_scorer import ClipScorer
from evaluation.inputs import attach_references, baseline_inputs, discover_inputs
from evaluation.score_config import ScoreConfig
from evaluation.summary import calibration_from_scores, scores_table, summary_document
from generation.calibration import save_calibration
from pipeline.meters import METERS

log = logging.getLogger(__name__)


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

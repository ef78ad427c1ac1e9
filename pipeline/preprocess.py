"""`lipsync preprocess INPUT OUT`: corpus → aligned Parquet shards on Ray Data, resumable.

Inputs stream through an actor pool of `ClipPreprocessor`s (one input per batch). Each actor writes the
input's shard and then, last and atomically, its completion record `_state/<input_id>.json`. A re-run
skips inputs whose record exists with the same config hash and source file, so a killed driver or worker
loses nothing and duplicates nothing; an input whose ffmpeg/ffprobe was killed by a signal on every attempt
is run again.
The driver then folds the records into `clips.parquet` (speaker-disjoint split), `rejects.parquet` and
`summary.json`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa

from core.config import code_version, to_dict
from core.errors import BadInput
from core.ray import WORKER_DIED, ensure_ray, run_on_actor_pool
from core.storage import Store
from pipeline.clip_preprocessor import ClipPreprocessor, output_hash
from pipeline.corpus import discover
from pipeline.media import TOOL_KILLED
from pipeline.meters import build_meter
from pipeline.preprocess_config import STATE_DIR, AlignConfig, PreprocessConfig

log = logging.getLogger(__name__)

REJECT_COLUMNS = (
    "input_id",
    "source",
    "language",
    "speaker",
    "stage",
    "reason",
    "message",
    "segment_start_frame",
    "segment_end_frame",
)


def _validate(cfg: PreprocessConfig) -> None:
    cfg.align.validate()
    if cfg.align.meter != "landmarks":
        build_meter(cfg.align)  # unreadable or wrong weights fail here, before any worker starts
    if cfg.crop_size < 32 or cfg.crop_size % 2:
        raise BadInput(f"crop_size must be an even number >= 32, not {cfg.crop_size}")
    if not 0 < cfg.scene_cut_threshold < 1 or cfg.scene_cut_content_threshold <= 0:
        raise BadInput("scene_cut_threshold must be in (0, 1) and scene_cut_content_threshold > 0")
    cfg.resources.validate()


def finished_inputs(store: Store, cfg_hash: str, inputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Completion records of `inputs` already processed with this config, from the same source file (an
    input id is a path within the corpus: another corpus with the same layout, or the same corpus moved,
    written to the same output is processed again)."""
    wanted = {r["input_id"]: r["video"] for r in inputs}
    done = {}
    for name in store.listdir(STATE_DIR, ".json"):
        input_id = name[: -len(".json")]
        if input_id not in wanted:
            continue
        record = store.read_json(f"{STATE_DIR}/{name}")
        if record.get("config_hash") == cfg_hash and record.get("source") == wanted[input_id]:
            done[input_id] = record
    return done


def to_process(
    store: Store, cfg_hash: str, inputs: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(inputs to process, records of those done). An input whose ffmpeg/ffprobe, or whose worker, was killed
    on every attempt has a record (its `tool_killed` or `worker_died` reject is reported) but was never
    judged: run it again."""
    records = finished_inputs(store, cfg_hash, inputs)
    unjudged = (TOOL_KILLED, WORKER_DIED)
    done = {k: r for k, r in records.items() if not any(x["reason"] in unjudged for x in r["rejects"])}
    return [r for r in inputs if r["input_id"] not in done], done


def _run_pool(cfg: PreprocessConfig, out: str, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream the pending inputs through the actor pool; returns one small status row per input."""
    import ray

    from core.watchdog import data_stall_guard

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    pool = cfg.resources.planned("preprocessing actors", len(pending), "preprocess")
    with data_stall_guard(pool.stall_seconds, "resources.stall_seconds"):
        return run_on_actor_pool(
            pending,
            ClipPreprocessor,
            {"cfg": cfg, "out": out},
            actors=pool.workers,
            cpus_per_actor=pool.cpus_per_worker,
            max_restarts=pool.max_restarts,
            key="input_id",
            calls_per_actor=pool.inputs_per_worker,
            poll_seconds=pool.poll_seconds,
        )


def _calls_by_worker(status: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The status rows of each worker process, in the order its calls started."""
    workers: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in sorted(status, key=lambda s: s["started_at"]):
        workers[s["worker_pid"]].append(s)
    return list(workers.values())


def worker_busy_and_cpu_seconds(status: list[dict[str, Any]]) -> tuple[float, float]:
    """(busy, CPU) seconds summed over workers. A worker is busy while it holds at least one input (its
    calls overlap, so their durations would count the overlap twice); its CPU is what it and its ffmpeg
    children used from its first input's start to its last one's finish."""
    busy = cpu = 0.0
    for calls in _calls_by_worker(status):
        end = -math.inf
        for call in calls:
            busy += max(0.0, call["finished_at"] - max(call["started_at"], end))
            end = max(end, call["finished_at"])
        cpu += max(c["cpu_at_finish"] for c in calls) - min(c["cpu_at_start"] for c in calls)
    return busy, cpu


def max_inputs_in_flight(status: list[dict[str, Any]]) -> int:
    """The most inputs any worker held at once (`resources.inputs_per_worker` caps it)."""
    most = 0
    for calls in _calls_by_worker(status):
        events = sorted(
            (t, step) for c in calls for t, step in ((c["started_at"], 1), (c["finished_at"], -1))
        )
        held = 0
        for _, step in events:  # at equal times a finish (-1) sorts before a start
            held += step
            most = max(most, held)
    return most


def assign_splits(clips: list[dict[str, Any]], val_fraction: float, seed: int) -> dict[str, str]:
    """Speaker-disjoint train/val per language: a speaker's clips all go one way.

    A split given in the manifest wins (per speaker); otherwise speakers are ordered by a seeded hash and
    the first ceil(val_fraction x n) of each language (at least one when it has two or more) go to val.
    """
    by_language: dict[str, set[str]] = defaultdict(set)
    given: dict[str, str] = {}
    for clip in clips:
        by_language[clip["language"]].add(clip["speaker"])
        if clip.get("manifest_split"):
            given.setdefault(clip["speaker"], clip["manifest_split"])
    split: dict[str, str] = dict(given)
    for _, speakers in sorted(by_language.items()):
        free = sorted(
            (s for s in speakers if s not in given),
            key=lambda s: hashlib.sha1(f"{seed}:{s}".encode()).hexdigest(),
        )
        n_val = 0 if len(free) < 2 else max(1, round(val_fraction * len(free)))
        for i, speaker in enumerate(free):
            split[speaker] = "val" if i < n_val else "train"
    return split


def data_card(
    clips: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    n_inputs: int,
    align: AlignConfig | None = None,
) -> dict[str, Any]:
    """Hours, speakers and clips per language (and accent, emotion), cadence, rejects by reason, and the
    meter that aligned the corpus."""
    per_language: dict[str, dict[str, Any]] = {}
    for lang in sorted({c["language"] for c in clips}):
        mine = [c for c in clips if c["language"] == lang]
        cadence = [c["phonemes_per_second"] for c in mine if c.get("phonemes_per_second")]
        per_language[lang] = {
            "clips": len(mine),
            "hours": round(sum(c["n_frames"] / c["fps"] for c in mine) / 3600, 4),
            "speakers": len({c["speaker"] for c in mine}),
            "train_clips": sum(c["split"] == "train" for c in mine),
            "val_clips": sum(c["split"] == "val" for c in mine),
            "phonemes_per_second": round(sum(cadence) / len(cadence), 2) if cadence else None,
            "mean_abs_av_offset_frames": round(sum(abs(c["av_offset_frames"]) for c in mine) / len(mine), 3),
            "av_offset_confident_share": round(
                sum(bool(c.get("av_offset_confident")) for c in mine) / len(mine), 3
            ),
        }
    return {
        "inputs": n_inputs,
        "accepted_clips": len(clips),
        "accepted_inputs": len({c["input_id"] for c in clips}),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "hours_total": round(sum(c["n_frames"] / c["fps"] for c in clips) / 3600, 4),
        "languages": per_language,
        "accents": dict(sorted(Counter(c["accent"] for c in clips if c.get("accent")).items())),
        "emotions": dict(sorted(Counter(c["emotion"] for c in clips if c.get("emotion")).items())),
        "aligned_by": None
        if align is None
        else {
            "meter": align.meter,
            "weights": align.weights,
            "min_confidence": align.threshold,
            "mode": align.mode,
            "max_abs_offset": align.max_abs_offset,
            "on_abstain": align.on_abstain,
        },
    }


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> pa.Table:
    if rows:
        return pa.Table.from_pylist(rows)
    return pa.table({c: pa.array([], pa.string()) for c in columns or ()})


def run(cfg: PreprocessConfig, source: str, out: str, address: str | None = None) -> dict[str, Any]:
    """Preprocess corpus `source` into `out` (both local paths or s3:// URIs); resumes a previous run."""
    _validate(cfg)
    started = time.perf_counter()
    inputs = discover(source)
    store = Store(out)
    try:
        store.makedirs()
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc}") from exc
    cfg_hash = output_hash(cfg)
    pending, done = to_process(store, cfg_hash, inputs)
    log.info("preprocess: %d inputs, %d already done, %d to process", len(inputs), len(done), len(pending))
    status: list[dict[str, Any]] = []
    if pending:
        ensure_ray(address)
        status = _run_pool(cfg, out, pending)
    frames = sum(int(s["frames"]) for s in status)
    busy, cpu = worker_busy_and_cpu_seconds(status)
    span = max((s["finished_at"] for s in status), default=0.0) - min(
        (s["started_at"] for s in status), default=0.0
    )
    records = finished_inputs(store, cfg_hash, inputs)
    missing = [r["video"] for r in inputs if r["input_id"] not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} inputs have no completion record, e.g. {missing[0]}")
    clips = [c for r in inputs for c in records[r["input_id"]]["clips"]]
    rejects = [x for r in inputs for x in records[r["input_id"]]["rejects"]]
    splits = assign_splits(clips, cfg.val_fraction, cfg.seed)
    for clip in clips:
        clip["split"] = splits[clip["speaker"]]
    clips.sort(key=lambda c: c["clip_id"])
    store.write_table("clips.parquet", _table(clips))
    store.write_table("rejects.parquet", _table(rejects, REJECT_COLUMNS))
    wall = time.perf_counter() - started
    summary = {
        **data_card(clips, rejects, len(inputs), cfg.align),
        "processed_inputs": len(pending),
        "skipped_inputs": len(done),
        "throughput": {
            "wall_seconds": round(wall, 2),
            "frames": frames,
            "frames_per_second": round(frames / wall, 2),
            "worker_busy_seconds": round(busy, 2),
            "processing_seconds": round(span, 2),  # first input started to last finished (no start-up)
            "frames_per_processing_second": round(frames / span, 2) if span > 0 else None,
            "frames_per_busy_second": round(frames / busy, 2) if busy else None,
            "worker_cpu_seconds": round(cpu, 2),  # the workers' and their ffmpeg children's
            "frames_per_cpu_second": round(frames / cpu, 2) if cpu else None,
            "max_inputs_in_flight_per_worker": max_inputs_in_flight(status),
            "peak_worker_rss_mb": round(max((float(s["peak_rss_mb"]) for s in status), default=0.0), 1),
        },
        "config_hash": cfg_hash,
        "config": to_dict(cfg),
        "code_version": code_version(),
        "source": source,
    }
    store.write_json("summary.json", summary)
    return {
        "out": out,
        "clips": store.uri("clips.parquet"),
        "rejects": store.uri("rejects.parquet"),
        "summary": store.uri("summary.json"),
        "shards": store.uri("shards"),
        "accepted_clips": len(clips),
        "rejected": len(rejects),
        "processed_inputs": len(pending),
        "skipped_inputs": len(done),
    }

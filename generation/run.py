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
`OUT/outputs.parquet` has one row per pair; a failed pair is a row with status "failed", not a crash."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from core.config import code_version, config_hash, to_dict
from core.errors import BadInput, Stalled
from core.ray import (
    ensure_ray,
    executor_poll_interval,
    worker_runtime_env,
)
from core.stage import StageResources, StageSpec, on_ray
from core.storage import Store, is_remote
from generation.calibration import load_calibration
from generation.composite import CompositeStage
from generation.config import (
    DEFAULT_CPUS,
    PARTS_DIR,
    VIDEOS_DIR,
    WORK_DIR,
    GenerateConfig,
    ModelConfig,
    ResourcesConfig,
    validate,
)
from generation.finalize import OUTPUT_SCHEMA, FinalizeStage, PairProgress, _failed_output, _remove
from generation.infer import GenerateStage
from generation.pairs import read_pairs
from generation.prepare import PrepareStage
from generation.rows import _HEAVY

log = logging.getLogger(__name__)


def uses_gpu(cfg: ModelConfig, cluster_gpus: float) -> bool:
    """Whether the model's actors take a GPU: cuda, or auto on a cluster that has (or may grow) one."""
    import torch

    if cfg.device == "cuda" and not cluster_gpus:
        raise BadInput("model.device is cuda but the Ray cluster has no GPU")
    return cfg.device == "cuda" or (cfg.device == "auto" and bool(cluster_gpus or torch.cuda.is_available()))


def model_resources(cfg: ModelConfig) -> dict[str, float]:
    """CPUs (and GPUs, when the model runs on one) each model actor asks for; without Ray (a sequential
    run) the GPUs are this machine's."""
    import ray

    from core.plan import Cluster

    cpus = DEFAULT_CPUS["model"] if cfg.cpus_per_actor is None else cfg.cpus_per_actor
    cluster_gpus = Cluster.current().limit.get("GPU", 0.0) if ray.is_initialized() else 0.0
    if uses_gpu(cfg, cluster_gpus):
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


def stage_specs(
    cfg: GenerateConfig, pairs: list[dict[str, Any]], out: str, checkpoint: str, img_size: int
) -> list[StageSpec]:
    """prepare → infer → composite: the stages, their arguments and each pool's resources."""
    calibration = load_calibration(cfg.calibration)
    res, model = cfg.resources, cfg.model
    return [
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


def build_dataset(cfg: GenerateConfig, pairs: list[dict[str, Any]], out: str, checkpoint: str, img_size: int):
    """The three-stage Ray Data pipeline over `pairs` (lazy). Ray Data restarts killed actors and retries
    their batches itself; repeated chunks are ignored."""
    import ray

    ds = ray.data.from_items(pairs, override_num_blocks=len(pairs))
    return on_ray(
        ds, stage_specs(cfg, pairs, out, checkpoint, img_size), batch_format="pyarrow", zero_copy_batch=True
    )


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

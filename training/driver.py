"""The driver of a training command: fit the run to the cluster, open its MLflow run, and run a recipe's
per-worker `train_loop` on Ray Train under the stall watchdog (or do nothing when OUT already finished).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from core.config import to_dict
from core.errors import BadInput
from training.checkpoints import checkpoint_summary, finished, latest_checkpoint, storage_root
from training.config import DEFAULT_CPUS, TrainConfig, with_defaults
from training.distributed import torch_config
from training.metrics import Follower, mlflow_client, open_mlflow_run, tracking_uri
from training.streams import WAITING_FOR_WINDOWS, datasets, select_splits, train_mix

log = logging.getLogger(__name__)


def waiting_for(cfg: TrainConfig) -> Any:
    """What a stalled training loop's phase waits for, for the watchdog's message."""
    from core.watchdog import free_resources

    def describe(phase: str) -> str:
        free = free_resources()
        if phase == "starting the workers":
            gpu = " + 1 GPU" if cfg.gpu else ""
            return f"{cfg.workers} worker(s) ask {cfg.cpus_per_worker:g} CPU{gpu} each; {free}"
        if phase == WAITING_FOR_WINDOWS:
            return f"the Ray Data window tasks ask {cfg.data_cpus_per_task:g} CPU each; {free}"
        return free

    return describe


def plan_resources(cfg: TrainConfig, command: str) -> TrainConfig:
    """`cfg` with the CPUs it leaves to defaults fitted to the cluster: the workers and one Ray Data window
    task at once (the stream stalls without one). BadInput with the one-line plan when it cannot run."""
    from core.plan import Ask, plan

    workers = Ask(
        "workers",
        cfg.workers,
        DEFAULT_CPUS if cfg.cpus_per_worker is None else cfg.cpus_per_worker,
        gpus=1.0 if cfg.gpu else 0.0,
        resources=dict(cfg.worker_resources),
        count_flag="--workers",
        cpus_flag="--cpus-per-worker",
        gpus_advice="leave out --gpu",
        fit_cpus=cfg.cpus_per_worker is None,
    )
    data = Ask(
        "data tasks",
        1,
        DEFAULT_CPUS if cfg.data_cpus_per_task is None else cfg.data_cpus_per_task,
        cpus_flag="data_cpus_per_task",
        fit_cpus=cfg.data_cpus_per_task is None,
    )
    workers, data = plan([workers, data], command)
    return dataclasses.replace(cfg, cpus_per_worker=workers.cpus, data_cpus_per_task=data.cpus)


def scaling_config(cfg: TrainConfig) -> Any:
    """`num_workers` workers with `cpus_per_worker` CPUs (+ one GPU with --gpu, + `worker_resources`)."""
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.gpu else {}) | dict(cfg.worker_resources)
    return ScalingConfig(
        num_workers=cfg.workers,
        use_gpu=cfg.gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.placement_strategy,
    )


def data_config() -> Any:
    """Train windows reach the loop in their seeded order (Ray Data's `preserve_order`), not in the order
    their tasks finish: a one-worker run on the same corpus and seed trains the same model run after run
    (two seed-0 demo experts split at step ~215 of 350 without it)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options={"train": options})


def run_config(cfg: TrainConfig, out: str, name: str) -> Any:
    """Checkpoints and Ray Train state under OUT/<name> (local or s3://); restarts on worker failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=storage_root(out),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
    )


def check_init(uri: str, kind: str, img_size: int) -> None:
    """--init-from must hold a model of this kind and size (BadInput otherwise)."""
    from models.checkpoint import load_model

    loaded = load_model(uri, expected_kind=kind)
    if loaded.img_size != img_size:
        raise BadInput(f"--init-from {uri} is a {loaded.img_size}px {kind}, the config trains {img_size}px")


def fit_job(
    name: str,
    train_loop: Any,
    cfg: TrainConfig,
    data: str,
    out: str,
    address: str | None = None,
    init_from: str | None = None,
    loop_config: dict[str, Any] | None = None,
) -> dict:
    """A recipe's command: train (or resume, or do nothing if OUT already reached cfg.steps) on Ray Train
    and return {checkpoint, step, metrics}. `loop_config` adds recipe-specific entries for `train_loop`."""
    from ray.train.torch import TorchTrainer

    from core.ray import ensure_ray
    from core.watchdog import loop_watchdog

    cfg = with_defaults(cfg)
    train, val = select_splits(data, cfg)
    if init_from:
        check_init(init_from, name, cfg.img_size)
    done = finished(out, name, cfg.steps)
    if done:
        log.info("%s already reached step %d; nothing to do", done[0], done[1])
        return checkpoint_summary(done[0], already_finished=True)
    ensure_ray(address)
    cfg = plan_resources(cfg, f"train {name}")
    uri = tracking_uri(cfg, out)
    run_id = open_mlflow_run(uri, out, name, cfg)
    mix = train_mix(data, train)
    mlflow_client(uri).log_dict(run_id, mix, "data_mix.json")
    log.info(
        "%s: windows by language %s", name, {k: v["window_share"] for k, v in mix.get("language", {}).items()}
    )
    log.info(
        "%s: %d train clips (%d frames), %d val clips",
        name,
        len(train.clip_ids),
        train.frames,
        len(val.clip_ids),
    )
    follower = Follower(uri, run_id)
    follower.start()
    try:
        with loop_watchdog(cfg.stall_seconds, f"train {name}", waiting_for(cfg)) as dog:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={
                    "cfg": to_dict(cfg),
                    "out": storage_root(out),
                    "init_from": storage_root(init_from) if init_from else None,
                    "mlflow_uri": uri,
                    "mlflow_run_id": run_id,
                    "has_val": bool(val.clip_ids),
                    "progress": dog.board if dog else None,
                    **(loop_config or {}),
                },
                scaling_config=scaling_config(cfg),
                run_config=run_config(cfg, out, name),
                torch_config=torch_config(cfg.gpu),
                datasets=datasets(train, val, name, cfg),
                dataset_config=data_config(),
            )
            trainer.fit()
    finally:
        follower.stop.set()
    final = latest_checkpoint(out, name)
    if final is None:
        raise RuntimeError(f"training finished without a checkpoint under {out}")
    return checkpoint_summary(final[0], mlflow_run_id=run_id, mlflow_tracking_uri=uri, data_mix=mix)

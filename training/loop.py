"""Ray Train's per-worker loop, the same for every recipe: set-up (resume or init), steps, logging,
evaluation and checkpoints at the config's cadence, beating on the driver's watchdog board.
"""

from __future__ import annotations

import logging
from typing import Any

from core.config import from_dict
from core.watchdog import Beats
from models.checkpoint import MODEL_FILE
from training.checkpoints import find_resume, report_checkpoint
from training.config import check_resumable
from training.devices import use_worker_threads, worker_device
from training.distributed import global_mean, prepare, world
from training.metrics import MetricsLog
from training.recipe import Recipe
from training.streams import WAITING_FOR_WINDOWS, Throughput, batches, one_pass

log = logging.getLogger(__name__)


def set_up(
    recipe_cls: type[Recipe], config: dict[str, Any], rank: int, world_size: int
) -> tuple[Recipe, int]:
    """(the recipe on this worker's device, DDP-wrapped; the step it starts at): resumed from Ray Train's or
    OUT's newest checkpoint, else initialised from `init_from`, else fresh."""
    cfg = from_dict(recipe_cls.config, config["cfg"])
    device = worker_device()
    use_worker_threads(cfg)
    resume = find_resume(config["out"], recipe_cls.name)
    if resume is not None:
        check_resumable(resume.payloads[MODEL_FILE].get("config", {}), cfg)
    recipe = recipe_cls(
        cfg,
        device,
        resume=resume.payloads if resume is not None else None,
        init_from=None if resume is not None else config.get("init_from"),
        expert=config.get("syncnet"),
    )
    step, resumed_from = 0, []
    if resume is not None:
        step = resume.step
        resumed_from = [*recipe.train_state.get("resumed_from", []), step]
        log.info("rank %d: resuming from %s at step %d", rank, resume.source, step)
    recipe.train_state["resumed_from"] = resumed_from
    recipe.parallelize(lambda model: prepare(model, cfg, world_size))
    return recipe, step


def train_loop(recipe_cls: type[Recipe], config: dict[str, Any]) -> None:
    """Set-up, loop, checkpoint. `config`: cfg (dict), out, init_from, mlflow_uri, mlflow_run_id, has_val,
    progress (the watchdog's board), and what the recipe needs (syncnet: the expert of a generator)."""
    rank, world_size = world()
    beat = Beats(config.get("progress"), rank == 0)  # the driver's watchdog (core.watchdog)
    beat("setting up the worker", 0)
    recipe, step = set_up(recipe_cls, config, rank, world_size)
    recipe.watch(config.get("health"), rank)
    cfg, device = recipe.cfg, recipe.device
    metrics_log = MetricsLog(config.get("mlflow_uri"), config.get("mlflow_run_id"), rank == 0)
    train_batches = batches("train", cfg.batch_size // world_size, device, cfg)
    has_val = config.get("has_val", False)

    def validation() -> Any:
        return one_pass("val", max(1, cfg.batch_size // world_size), device)

    if has_val and getattr(cfg, "eval_at_start", False) and step == 0:
        metrics_log.log(0, recipe.evaluate(validation()))

    # -- loop
    window: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    throughput = Throughput()
    while step < cfg.steps:
        beat(WAITING_FOR_WINDOWS, step)
        batch = throughput.next(train_batches)
        beat("training a step", step)
        window.append({k: global_mean(v, device) for k, v in recipe.step(batch).items()})
        step += 1
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]} | throughput.read()
            window = []
            if has_val and (step % cfg.eval_every == 0 or last):
                beat("evaluating", step)
                metrics.update(recipe.evaluate(validation()))
                metrics.update(recipe.after_evaluation(step, metrics))
            metrics.update(recipe.logged() | {"lr": cfg.lr * recipe.lr_share})
            metrics_log.log(step, {**metrics, "step": step})

        # -- checkpoint: the recipe's payloads (weights, optimisers, step, config, train_state)
        if step % cfg.checkpoint_every == 0 or last:
            beat("checkpointing", step)
            report_checkpoint(step, recipe.payloads(step, metrics), metrics, rank)
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0:
            throughput.reset()  # evaluation and checkpoint time are not training throughput

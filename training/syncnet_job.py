"""`lipsync train syncnet DATA OUT`: the expert lip-sync discriminator on Ray Train, one recipe top to bottom.

Reference: Rudrabha/Wav2Lip `color_syncnet_train.py` (Adam lr 1e-4, batch 64, BCE of the cosine similarity
of the face and audio embeddings). Each worker streams its shard of in-sync/off-sync windows from Ray Data;
rank 0 checkpoints every `checkpoint_every` steps into OUT/syncnet/checkpoint_<step>/model.pt, which
generation and scoring load by path (`models.checkpoint.load_model`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import config_hash, from_dict, to_dict
from core.watchdog import Beats
from models.checkpoint import MODEL_FILE, checkpoint_payload, read_payload
from models.registry import build_model, sync_loss
from models.syncnet import sync_probability
from training import expert_health
from training.common import (
    WAITING_FOR_WINDOWS,
    Amp,
    MetricsLog,
    Throughput,
    TrainConfig,
    batches,
    build_optimizer,
    check_resumable,
    find_resume,
    fit_job,
    global_mean,
    global_sum,
    images,
    one_pass,
    prepare,
    report_checkpoint,
    seed_everything,
    unwrap,
    use_worker_threads,
    validate,
    worker_amp,
    worker_device,
    world,
)

log = logging.getLogger(__name__)

NAME = "syncnet"


@dataclass(frozen=True)
class SyncNetConfig(TrainConfig):
    """SyncNet training with the reference hparams (lr 1e-4, global batch 64, Adam)."""

    batch_size: int = 64
    lr: float = 1e-4
    eval_at_start: bool = False  # a validation pass before the first step (the untrained baseline)
    stuck_after_steps: int | None = 5000  # warn if val loss is still >= 0.68 from this step (None: never)


# ---------------------------------------------------------------- one step, one evaluation


def sync_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, amp: Amp
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE loss, in-sync probabilities) of a batch of windows."""
    with amp.autocast(device):
        audio, face = model(batch["mel"].to(device), images(batch["faces"], device))
    return sync_loss(audio, face, batch["label"]), sync_probability(audio.float(), face.float())


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: Amp,
    batch: dict[str, torch.Tensor],
    device: torch.device,
) -> float:
    """One optimiser step; returns this worker's loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, _ = sync_batch_loss(model, batch, device, amp)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, cfg: SyncNetConfig, device: torch.device, amp: Amp, world_size: int) -> dict:
    """Validation BCE and accuracy over every worker's shard of the val windows."""
    model = unwrap(model).eval()
    loss_sum = correct = count = 0.0
    for batch in one_pass("val", max(1, cfg.batch_size // world_size), device):
        loss, prob = sync_batch_loss(model, batch, device, amp)
        n = len(prob)
        loss_sum += float(loss) * n
        correct += float(((prob > 0.5).float() == batch["label"].to(device)).sum())
        count += n
    loss_sum, correct, count = global_sum([loss_sum, correct, count], device)
    return {"val_loss": loss_sum / count, "val_accuracy": correct / count} if count else {}


# ---------------------------------------------------------------- the recipe (runs on every worker)


def train_loop(config: dict[str, Any]) -> None:
    """Set-up, loop, checkpoint. `config`: cfg (dict), out, init_from, mlflow_uri, mlflow_run_id."""
    # -- set-up: device, model, optimiser, state to resume from
    cfg = from_dict(SyncNetConfig, config["cfg"])
    rank, world_size = world()
    Beats(config.get("progress"), rank == 0)("setting up the worker", 0)  # the driver's watchdog
    device, amp = worker_device(), worker_amp(cfg.gpu)
    use_worker_threads(cfg)
    seed_everything(cfg.seed)
    model = build_model(NAME, cfg.img_size, cfg.width).to(device)  # before the optimiser (its state follows)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr)
    scaler = amp.grad_scaler()
    step, resumed_from = 0, []
    resume = find_resume(config["out"], NAME)
    if resume is not None:
        payload = resume.payloads[MODEL_FILE]
        check_resumable(payload.get("config", {}), cfg)
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(resume.train_state.get("scaler", {}) or scaler.state_dict())
        step = resume.step
        resumed_from = [*resume.train_state.get("resumed_from", []), step]
        log.info("rank %d: resuming from %s at step %d", rank, resume.source, step)
    elif config.get("init_from"):
        model.load_state_dict(read_payload(config["init_from"])[0]["state_dict"])
    model = prepare(model, cfg, world_size)
    metrics_log = MetricsLog(config.get("mlflow_uri"), config.get("mlflow_run_id"), rank == 0)
    train_batches = batches("train", cfg.batch_size // world_size, device, cfg)
    has_val = config.get("has_val", False)
    beat = Beats(config.get("progress"), rank == 0)  # the driver's watchdog (core.watchdog)
    health = expert_health.Health(config.get("health"), cfg, rank)  # offset ranks, stuck warning
    if has_val and cfg.eval_at_start and step == 0:
        metrics_log.log(0, evaluate(model, cfg, device, amp, world_size))

    # -- loop
    losses: list[float] = []
    metrics: dict[str, float] = {}
    throughput = Throughput()
    while step < cfg.steps:
        beat(WAITING_FOR_WINDOWS, step)
        batch = throughput.next(train_batches)
        beat("training a step", step)
        losses.append(global_mean(train_step(model, optimizer, scaler, amp, batch, device), device))
        step += 1
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            metrics = {"train_loss": sum(losses) / len(losses), **throughput.read()}
            losses = []
            if has_val and (step % cfg.eval_every == 0 or last):
                beat("evaluating", step)
                metrics.update(evaluate(model, cfg, device, amp, world_size))
                metrics.update(health.evaluate(model, step, metrics))
            metrics_log.log(step, {**metrics, "step": step})

        # -- checkpoint: model + optimiser + step + config (+ the resume trail)
        if step % cfg.checkpoint_every == 0 or last:
            payload = checkpoint_payload(
                model, NAME, cfg.img_size, step, to_dict(cfg) | {"config_hash": config_hash(cfg)},
                metrics, optimizer,
            )  # fmt: skip
            payload["train_state"] = {"resumed_from": resumed_from, "scaler": scaler.state_dict()}
            beat("checkpointing", step)
            report_checkpoint(step, {MODEL_FILE: payload}, metrics, rank)
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0:
            throughput.reset()  # evaluation and checkpoint time are not training throughput


# ---------------------------------------------------------------- the driver


def run(
    cfg: SyncNetConfig, data: str, out: str, address: str | None = None, init_from: str | None = None
) -> dict:
    """Train (or resume, or do nothing if finished) and return {checkpoint, step, metrics}."""
    validate(cfg)
    health = expert_health.job_setup(data, cfg)
    result = fit_job(NAME, train_loop, cfg, data, out, address=address, init_from=init_from,
                     loop_config={"health": health})  # fmt: skip
    return {**result, "health": expert_health.job_summary(result, cfg, health)}

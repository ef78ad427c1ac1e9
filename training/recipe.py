"""The shape every training recipe has (torchtune's): set-up from a config, a device and optional resume
payloads; `step(batch)` → losses; `evaluate(batches)` → metrics; `payloads(step, metrics)` → checkpoint
files. One recipe per model (`syncnet_job.SyncNetRecipe`, `wav2lip_job.Wav2LipRecipe`).

Three drivers run the same recipe object: Ray Train's per-worker loop (`training.loop`), a Tune trial in
its own process (`tuning.trial`), and any plain Python loop. Importing a recipe imports no Ray: a machine
with torch alone can set one up, step it on batches from `training.streams.BatchStream` and save it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from core.config import config_hash, to_dict
from models.checkpoint import MODEL_FILE, checkpoint_payload
from training.devices import seed_everything, worker_amp
from training.optim import lr_factor, set_lr

if TYPE_CHECKING:
    from training.config import TrainConfig

Batch = dict[str, torch.Tensor]
Payloads = dict[str, dict[str, Any]]


class Recipe:
    """One model's training in one process (one worker of several with DDP).

    `train_state` is what a checkpoint carries besides weights and optimiser state (the loss scaler, the
    recipe's own switches); drivers add their own entries (the resume trail, a trial's stream position).
    """

    name: ClassVar[str]  # the job and checkpoint kind: syncnet | wav2lip
    config: ClassVar[type]  # its TrainConfig subclass

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        resume: Payloads | None = None,
        init_from: str | None = None,
        expert: str | None = None,
    ) -> None:
        """Models (seeded), optimisers and loss scalers on `device`; then the weights, optimiser state and
        train_state of `resume` (a checkpoint's payloads), else the weights of `init_from` (a checkpoint
        URI). `expert`: the frozen SyncNet a generator recipe needs."""
        self.cfg, self.device = cfg, device
        self.amp = worker_amp(device.type == "cuda")
        self.train_state: dict[str, Any] = {}
        self.steps_done = 0  # optimiser steps taken, counting those of the checkpoint resumed from
        self.lr_share = 1.0  # the share of each configured lr the last step trained at (cfg.lr_schedule)
        seed_everything(cfg.seed)
        self.build(expert)
        if resume is not None:
            self.train_state = {**self.train_state, **self.load(resume)}
            self.steps_done = int(resume[MODEL_FILE]["step"])
        elif init_from:
            self.init_from(init_from)

    # -- set-up
    def build(self, expert: str | None) -> None:
        """Models before their optimisers, so the optimiser state lands on the device too."""
        raise NotImplementedError

    def load(self, payloads: Payloads) -> dict[str, Any]:
        """Weights, optimisers and scalers from a checkpoint's payloads; returns its train_state."""
        raise NotImplementedError

    def init_from(self, uri: str) -> None:
        """Weights only (fine-tuning), from a checkpoint of this kind."""
        raise NotImplementedError

    def parallelize(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Each trained model replaced by `wrap(model)` (DDP on a Ray Train worker)."""
        raise NotImplementedError

    # -- training and evaluation
    def step(self, batch: Batch) -> dict[str, float]:
        """One training step, whatever drives it (Ray Train, a Tune trial, a plain loop): every optimiser's
        lr for this step (`schedule`), then the recipe's `update`; this worker's losses."""
        self.schedule(self.steps_done)
        losses = self.update(batch)
        self.steps_done += 1
        return losses

    def schedule(self, step: int) -> float:
        """Set each optimiser's learning rate for step `step` (0-based) under cfg.lr_schedule; the factor.
        A function of the step alone, so a resumed run continues on the same curve."""
        self.lr_share = lr_factor(self.cfg.lr_schedule, step, self.cfg.steps)
        for optimizer, lr in self.optimizers():
            set_lr(optimizer, lr * self.lr_share)
        return self.lr_share

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """Each optimiser with the learning rate its config gives it."""
        raise NotImplementedError

    def update(self, batch: Batch) -> dict[str, float]:
        """One optimiser step (per model) at the lr `schedule` set; this worker's losses."""
        raise NotImplementedError

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation metrics over `batches` and every other worker's (a single process: its own)."""
        raise NotImplementedError

    def watch(self, setup: dict[str, Any] | None, rank: int) -> None:
        """Take the driver's monitoring set-up (e.g. the expert's health checks); most recipes need none."""

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived after each evaluation (e.g. the expert's offset ranks); most recipes add none."""
        return {}

    def logged(self) -> dict[str, float]:
        """Recipe state logged beside the metrics at every log step."""
        return {}

    def finite_on(self, batch: Batch) -> bool:
        """Whether the weights, and the model's outputs for `batch`, are all finite."""
        raise NotImplementedError

    # -- checkpoint
    def payloads(self, step: int, metrics: dict[str, float]) -> Payloads:
        """The checkpoint's files by name (model.pt, ...), `training.checkpoints.write_payloads` writes them."""
        raise NotImplementedError


def load_trained(
    payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """A trained model's weights, optimiser state and loss scaler from its payload; returns its train_state."""
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(payload["optimizer"])
    train_state = payload.get("train_state", {})
    if train_state.get("scaler"):
        scaler.load_state_dict(train_state["scaler"])
    return train_state


def trained_payload(
    model: nn.Module,
    kind: str,
    cfg: TrainConfig,
    step: int,
    metrics: dict[str, float],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_state: dict[str, Any],
) -> dict[str, Any]:
    """The payload of a trained model: weights, optimiser, step, config (+ hash), metrics, train_state."""
    config = to_dict(cfg) | {"config_hash": config_hash(cfg)}
    payload = checkpoint_payload(model, kind, cfg.img_size, step, config, metrics, optimizer)
    payload["train_state"] = train_state | {"scaler": scaler.state_dict()}
    return payload


def finite(*items: nn.Module | torch.Tensor | None) -> bool:
    """True when every tensor, and every floating parameter and buffer of every module, is finite."""
    for item in items:
        if item is None:
            continue
        tensors = [item] if isinstance(item, torch.Tensor) else list(item.state_dict().values())
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return False
    return True


def recipe_class(name: str) -> type[Recipe]:
    """SyncNetRecipe or Wav2LipRecipe."""
    if name == "syncnet":
        from training.syncnet_job import SyncNetRecipe

        return SyncNetRecipe
    if name == "wav2lip":
        from training.wav2lip_job import Wav2LipRecipe

        return Wav2LipRecipe
    raise ValueError(f"unknown recipe {name!r} (syncnet, wav2lip)")


def config_class(name: str) -> type[TrainConfig]:
    """SyncNetConfig or Wav2LipConfig."""
    return recipe_class(name).config

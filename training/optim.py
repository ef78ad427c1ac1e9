"""The optimisers a training config may name (`optimizer:`), built the same way by every recipe."""

from __future__ import annotations

import math
from typing import Any

import torch

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
"""`lr_schedule:` constant (the reference's) or cosine (from lr at step 0 down to 0 at the last step)."""


def build_optimizer(
    params: Any, name: str, lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """Adam with `betas` (the reference's) or SGD with momentum 0.9; `name` is one of OPTIMIZERS."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=betas)


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Backward through the loss scaler, one optimiser step, and the scaler's update."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The share of the configured lr that step `step` (0-based) of `steps` trains at. A function of the step
    alone, not a torch scheduler's state, so that a resumed run and a Tune trial continue on the same curve."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of `optimizer` at `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr

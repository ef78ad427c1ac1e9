"""The optimisers a training config may name (`optimizer:`), built the same way by every recipe."""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = ("adam", "sgd")


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

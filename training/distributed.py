"""Several workers as one: rank and world size, sums and means over workers, DDP wrapping with global-batch
BatchNorm, and the collective backend.

With one process (no process group) the sums and means are the values themselves, so a recipe's
evaluation runs unchanged in a plain loop. Ray is imported only by the calls that need a Ray Train worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import TrainConfig


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all workers (no-op with one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def global_mean(value: float, device: torch.device) -> float:
    """Mean over all workers of a per-worker scalar (equal batch sizes: the global-batch mean)."""
    total, n = global_sum([value, 1.0], device)
    return total / n


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers; the gradient of each worker's input is the sum of every worker's output gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd signature
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd signature
        out = grad.clone()
        torch.distributed.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all workers' samples (the global batch), on any backend.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces (with autograd) the per-channel sums, so
    it also works over gloo on CPUs. Its state dict is BatchNorm2d's; with one worker it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16/bf16 → fp32; fp32 and fp64 stay
        channels = x.shape[1]
        count = torch.tensor([xf.numel() / channels], device=x.device)
        totals = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)


def global_batchnorm(model: nn.Module, gpu: bool) -> nn.Module:
    """The model with every BatchNorm2d computing global-batch statistics (torch's SyncBatchNorm on GPU)."""
    if gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(replacement, key, tensor)  # the same tensors: optimiser references stay valid
            setattr(model, name, replacement)
        else:
            global_batchnorm(child, gpu)
    return model


def prepare(model: nn.Module, cfg: TrainConfig, world_size: int) -> nn.Module:
    """On the worker's device, DDP-wrapped when there are several workers (with global-batch BatchNorm)."""
    import ray.train.torch

    if world_size > 1 and cfg.sync_batchnorm:
        model = global_batchnorm(model, cfg.gpu)
    return ray.train.torch.prepare_model(model)


def torch_config(gpu: bool) -> Any:
    """NCCL between GPUs, gloo between CPUs."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if gpu else "gloo")

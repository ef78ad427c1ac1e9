"""One worker's device: which one, mixed precision (AMP), torch threads, seeding, images onto it.

Nothing here imports Ray at module level: a recipe uses it in a plain Python loop as well as on a Ray Train
worker (`worker_device` asks Ray Train, and is only called there).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.malloc import reuse_freed_memory

if TYPE_CHECKING:
    from training.config import TrainConfig


@dataclass(frozen=True)
class Amp:
    """Mixed precision of one worker: bf16 autocast where supported, else fp16 autocast with a GradScaler."""

    enabled: bool
    dtype: torch.dtype = torch.float32
    scaler: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.scaler)


def amp_settings(gpu: bool, bf16_supported: bool) -> Amp:
    """GPU: AMP in bf16 if supported, else fp16 with loss scaling. CPU: full precision."""
    if not gpu:
        return Amp(enabled=False)
    if bf16_supported:
        return Amp(enabled=True, dtype=torch.bfloat16)
    return Amp(enabled=True, dtype=torch.float16, scaler=True)


def worker_amp(gpu: bool) -> Amp:
    """This worker's AMP settings (asks CUDA about bf16 only on GPU)."""
    return amp_settings(gpu, gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def worker_device() -> torch.device:
    """The device Ray Train assigned to this worker (CUDA with --gpu, else CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def use_worker_threads(cfg: TrainConfig) -> int:
    """Torch intra-op threads of this worker: threads_per_worker, else its CPUs rounded up (Ray sets
    OMP_NUM_THREADS to the whole part). More threads than reserved CPUs lets a worker use cores Ray Data's
    tasks leave idle without reserving them (reserving every CPU starves those tasks)."""
    threads = cfg.threads_per_worker or max(1, math.ceil(cfg.cpus_per_worker))
    torch.set_num_threads(threads)
    reuse_freed_memory()  # activations and batches reused without page faults every step
    return threads


def images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images from the data stream → float32 in [0, 1] on `device`."""
    return batch.to(device, non_blocking=True).float().div_(255.0)


def seed_everything(seed: int) -> None:
    """Same initial weights on every worker and in every run with this seed."""
    torch.manual_seed(seed)

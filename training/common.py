"""What both training recipes share: config fields, device and AMP, the DDP backend, Ray Train run settings,
batches from Ray Data shards, checkpoint save/resume and metrics (MLflow + printed).

The recipes (`syncnet_job.py`, `wav2lip_job.py`) read top to bottom and call these helpers; nothing here
knows which model is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import posixpath
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import nn

from core.config import config_hash, to_dict
from core.errors import BadInput
from core.malloc import reuse_freed_memory
from core.storage import is_remote
from models.checkpoint import CHECKPOINT_PREFIX, MODEL_FILE, read_payload, save_checkpoint
from training.data import (
    DataSelection,
    Selected,
    WindowConfig,
    describe_empty,
    read_clips,
    select,
    windows_dataset,
)

log = logging.getLogger(__name__)

EXPERIMENT = "lipsync-train"
EXTRA_KEYS = (
    "steps",
    "workers",
    "gpu",
    "cpus_per_worker",
    "data_cpus_per_task",
    "threads_per_worker",
    "placement_strategy",
    "max_failures",
    "stall_seconds",
)
"""Config fields that may change between a run and its resumption without a warning."""

DEFAULT_CPUS = 1.0
"""CPUs of a worker, and of a Ray Data window task, when the config leaves them to the plan: at most this,
less when the cluster cannot hold the workers and a window task at once (core.plan)."""
REFERENCE_EVERY = 1000
"""The reference's checkpoint and evaluation interval (steps), the most a run's default cadence takes."""


@dataclass(frozen=True)
class TrainConfig:
    """Fields every training job has; the recipes subclass it with their reference hparams."""

    steps: int = 100_000
    batch_size: int = 64  # global: split evenly over the workers
    lr: float = 1e-4
    optimizer: str = "adam"  # "adam" (the reference) or "sgd" (momentum 0.9)
    img_size: int = 96
    width: float = 1.0  # channel multiplier of the trained model(s) (1.0: the reference; 0.25: a quarter)
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float | None = None  # None: fitted to the cluster, at most DEFAULT_CPUS
    threads_per_worker: int | None = None  # torch threads (None: cpus_per_worker rounded up); may exceed it
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra (custom) resources per worker
    data_cpus_per_task: float | None = None  # CPUs of each Ray Data window task (None: like cpus_per_worker)
    placement_strategy: str = "PACK"  # SPREAD puts one worker per node when it can
    sync_batchnorm: bool = True  # BatchNorm statistics over the global batch (reference: per replica)
    checkpoint_every: int | None = None  # None: a tenth of the steps, at most REFERENCE_EVERY
    eval_every: int | None = None  # None: as checkpoint_every
    eval_clips: int | None = 32  # val clips evaluated (a seeded choice, the same every time; None: all)
    eval_windows_per_clip: int = 8  # their windows: a fixed set, cut once and kept in the object store
    log_every: int = 10
    shuffle_buffer: int = 512  # samples in each worker's local shuffle buffer
    seed: int = 0
    max_failures: int = 3  # worker failures Ray Train recovers from (from the last checkpoint)
    stall_seconds: float = 600.0  # no training step for this long fails the run, naming what it waits for
    num_to_keep: int | None = 3  # checkpoints kept under OUT (None: all)
    mlflow_tracking_uri: str | None = None  # default: a file store under OUT (local OUT only)
    data: DataSelection = field(default_factory=DataSelection)
    windows: WindowConfig = field(default_factory=WindowConfig)


def cadence(steps: int) -> int:
    """The default checkpoint and evaluation interval of a run of `steps` steps: a tenth of them, at least 1
    and at most REFERENCE_EVERY (the reference's, for its 100k-step runs)."""
    return max(1, min(REFERENCE_EVERY, steps // 10))


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the intervals it leaves to defaults scaled to its steps."""
    every = cadence(cfg.steps)
    return dataclasses.replace(
        cfg,
        checkpoint_every=every if cfg.checkpoint_every is None else cfg.checkpoint_every,
        eval_every=every if cfg.eval_every is None else cfg.eval_every,
    )


def validate(cfg: TrainConfig) -> None:
    """BadInput for settings that cannot work (intervals and CPUs left to defaults are not checked)."""
    if cfg.steps < 1 or cfg.workers < 1 or cfg.batch_size < 1:
        raise BadInput("steps, workers and batch_size must be >= 1")
    if cfg.batch_size % cfg.workers:
        raise BadInput(f"batch_size {cfg.batch_size} is not divisible by workers {cfg.workers}")
    if cfg.width <= 0:
        raise BadInput(f"width must be > 0, not {cfg.width}")
    if cfg.img_size < 96 or cfg.img_size % 2:
        raise BadInput(f"img_size must be an even number >= 96, not {cfg.img_size}")
    if cfg.threads_per_worker is not None and cfg.threads_per_worker < 1:
        raise BadInput(f"threads_per_worker must be >= 1, not {cfg.threads_per_worker}")
    if min(v for v in (cfg.checkpoint_every, cfg.eval_every, cfg.log_every) if v is not None) < 1:
        raise BadInput("checkpoint_every, eval_every and log_every must be >= 1")
    if (cfg.cpus_per_worker or 0) < 0 or (cfg.data_cpus_per_task is not None and cfg.data_cpus_per_task <= 0):
        raise BadInput("cpus_per_worker must be >= 0 and data_cpus_per_task > 0")
    if cfg.stall_seconds < 0:
        raise BadInput(f"stall_seconds must be >= 0 (0: never), not {cfg.stall_seconds}")
    if cfg.windows.passes is not None and cfg.windows.passes < 1:
        raise BadInput(f"windows.passes must be >= 1, not {cfg.windows.passes}")
    if cfg.optimizer not in OPTIMIZERS:
        raise BadInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")


OPTIMIZERS = ("adam", "sgd")


def build_optimizer(
    params: Any, name: str, lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """Adam with `betas` (the reference's) or SGD with momentum 0.9; `name` is one of OPTIMIZERS."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=betas)


def select_splits(data: str, cfg: TrainConfig) -> tuple[Selected, Selected]:
    """(train, val) clips of a preprocessed corpus; BadInput when the selection leaves no training clips."""
    clips = read_clips(data)
    train = select(data, cfg.data, "train", clips)
    if not train.clip_ids:
        raise BadInput(f"{data}: {describe_empty(clips, cfg.data)} in the train split")
    return train, select(data, cfg.data, "val", clips, max_clips=cfg.eval_clips, seed=cfg.seed)


MAX_WINDOW_PASSES = 8
"""Distinct window draws per clip in the train dataset; longer runs cycle through them."""


def window_passes(cfg: TrainConfig, kind: str, train_clips: int) -> int:
    """WindowConfig.passes, else the passes of distinct windows the run's steps consume (1..MAX_WINDOW_PASSES)."""
    if cfg.windows.passes is not None:
        return cfg.windows.passes
    per_pass = max(1, train_clips * cfg.windows.windows_per_clip * (2 if kind == "syncnet" else 1))
    return max(1, min(MAX_WINDOW_PASSES, math.ceil(cfg.steps * cfg.batch_size / per_pass)))


WAITING_FOR_WINDOWS = "waiting for a batch of windows"
"""The training loop's phase while it waits on the Ray Data window stream (core.watchdog)."""


def datasets(train: Selected, val: Selected, kind: str, cfg: TrainConfig) -> dict[str, Any]:
    """Ray Datasets: "train" streams windows epoch after epoch; "val" is a fixed set cut once (here, under
    the stall guard). The train stream has no Ray Data stall timeout of its own: it waits on the training
    loop, whose steps the loop watchdog watches."""
    from core.watchdog import data_stall_guard

    cpus = cfg.data_cpus_per_task
    passes = window_passes(cfg, kind, len(train.clip_ids))
    out = {"train": windows_dataset(train, kind, cfg.windows, cfg.img_size, cpus, passes)}
    out["train"].context.execution_no_progress_timeout_s = -1
    if val.clip_ids:
        val_windows = dataclasses.replace(cfg.windows, windows_per_clip=cfg.eval_windows_per_clip)
        with data_stall_guard(cfg.stall_seconds, "stall_seconds"):
            out["val"] = windows_dataset(val, kind, val_windows, cfg.img_size, cpus).materialize()
    return out


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


# ---------------------------------------------------------------- device, AMP, DDP backend


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


def torch_config(gpu: bool) -> Any:
    """NCCL between GPUs, gloo between CPUs."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if gpu else "gloo")


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


def run_config(cfg: TrainConfig, out: str, name: str) -> Any:
    """Checkpoints and Ray Train state under OUT/<name> (local or s3://); restarts on worker failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=storage_root(out),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
    )


def storage_root(out: str) -> str:
    """A path as workers and Ray Train want it: URIs as they are, local paths absolute."""
    return out.rstrip("/") if is_remote(out) else os.path.abspath(out)


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


def images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images from the data stream → float32 in [0, 1] on `device`."""
    return batch.to(device, non_blocking=True).float().div_(255.0)


# ---------------------------------------------------------------- distributed helpers


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


def batches(
    name: str, batch_size: int, device: torch.device, cfg: TrainConfig
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless local batches from this worker's shard of dataset `name`, one epoch after another."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        seen = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(cfg.shuffle_buffer, batch_size) if cfg.shuffle_buffer else None,
            local_shuffle_seed=cfg.seed + epoch,
            device=device,
            pin_memory=cfg.gpu,
        ):
            seen += 1
            yield batch
        if not seen:
            raise RuntimeError(f"dataset {name!r} has fewer samples per worker than one batch ({batch_size})")
        epoch += 1


class Throughput:
    """Steps per second and the share of that time spent waiting for the next batch, between readings."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.waited, self.steps = time.perf_counter(), 0.0, 0

    def next(self, stream: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        batch = next(stream)
        self.waited += time.perf_counter() - began
        self.steps += 1
        return batch

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"steps_per_s": self.steps / elapsed, "data_wait_fraction": self.waited / elapsed}
        self.reset()
        return out


def one_pass(name: str, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's shard of dataset `name` (validation)."""
    import ray.train

    yield from ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=batch_size, device=device)


# ---------------------------------------------------------------- checkpoints and resume


@dataclass
class Resume:
    """What a worker starts from: payloads by file name (model.pt, ...) and the step they reached."""

    payloads: dict[str, dict[str, Any]]
    step: int
    source: str

    @property
    def train_state(self) -> dict[str, Any]:
        return self.payloads[MODEL_FILE].get("train_state", {})


def checkpoint_dir_name(step: int) -> str:
    """checkpoint_00001000: sortable, and `models.checkpoint.resolve` reads the step from it."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def read_checkpoint_dir(directory: str) -> dict[str, dict[str, Any]]:
    """Every *.pt payload of a checkpoint directory, by file name."""
    fs, path = fsspec.core.url_to_fs(directory)
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith(".pt"))
    return {n: read_payload(posixpath.join(directory.rstrip("/"), n))[0] for n in names}


def checkpoint_dirs(out: str, name: str) -> list[str]:
    """Checkpoint directories under OUT/<name> holding a model.pt, newest first."""
    root = posixpath.join(storage_root(out), name)
    fs, path = fsspec.core.url_to_fs(root)
    found = fs.glob(posixpath.join(path, f"{CHECKPOINT_PREFIX}*", MODEL_FILE))
    dirs = sorted((posixpath.dirname(p) for p in found), key=posixpath.basename, reverse=True)
    return [f"{root.split('://')[0]}://{d}" if "://" in root else d for d in dirs]


def latest_checkpoint(out: str, name: str) -> tuple[str, int] | None:
    """(directory, step) of the newest readable checkpoint under OUT/<name>, if any."""
    for directory in checkpoint_dirs(out, name):
        try:
            return directory, int(read_payload(posixpath.join(directory, MODEL_FILE))[0]["step"])
        except BadInput as exc:  # a checkpoint cut short by a crash: fall back to the one before
            log.warning("skipping %s: %s", directory, exc)
    return None


def find_resume(out: str, name: str) -> Resume | None:
    """On a worker: Ray Train's checkpoint after a restart, else the newest readable one under OUT/<name>
    (the command was re-run, or a crash came between writing a checkpoint and registering it)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as directory:
            payloads = read_checkpoint_dir(directory)
        return Resume(payloads, int(payloads[MODEL_FILE]["step"]), ckpt.path)
    for directory in checkpoint_dirs(out, name):
        try:
            payloads = read_checkpoint_dir(directory)
        except BadInput as exc:
            log.warning("skipping %s: %s", directory, exc)
            continue
        return Resume(payloads, int(payloads[MODEL_FILE]["step"]), directory)
    return None


def report_checkpoint(
    step: int, payloads: dict[str, dict[str, Any]], metrics: dict[str, float], rank: int
) -> None:
    """Rank 0 writes the payloads into a Ray Train checkpoint named by step; every rank reports."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            for name, payload in payloads.items():
                if name == MODEL_FILE:
                    save_checkpoint(tmp, payload)
                else:
                    torch.save(payload, os.path.join(tmp, name))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(
            {**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step)
        )


def check_resumable(previous: dict[str, Any], cfg: TrainConfig) -> None:
    """Warn when a run is resumed with a different config (other than steps and resources)."""
    old = {k: v for k, v in previous.items() if k not in EXTRA_KEYS}
    new = {k: v for k, v in to_dict(cfg).items() if k not in EXTRA_KEYS}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        log.warning("resuming with a changed config (%s); the checkpoint's weights are kept", changed)


def seed_everything(seed: int) -> None:
    """Same initial weights on every worker and in every run with this seed."""
    torch.manual_seed(seed)


# ---------------------------------------------------------------- metrics: MLflow and printed


def tracking_uri(cfg: TrainConfig, out: str) -> str:
    """The MLflow tracking URI: the configured one, else a file store under OUT (or /tmp for remote OUT)."""
    if cfg.mlflow_tracking_uri:
        return cfg.mlflow_tracking_uri
    root = os.path.join(tempfile.gettempdir(), "lipsync-mlruns") if is_remote(out) else storage_root(out)
    return "file://" + os.path.join(root, "mlruns")


def mlflow_client(uri: str) -> Any:
    """An MlflowClient; file stores are allowed (MLflow 3 keeps them in maintenance mode)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_mlflow_run(uri: str, out: str, job: str, cfg: TrainConfig) -> str:
    """The MLflow run of (OUT, job): reused when the command is re-run, created (with params) otherwise."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    out_tag = storage_root(out)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`lipsync.out` = '{out_tag}' and tags.`lipsync.job` = '{job}'"
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        exp_id, run_name=f"{job}-{config_hash(cfg)}", tags={"lipsync.out": out_tag, "lipsync.job": job}
    )
    for key, value in flatten(to_dict(cfg)).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLog:
    """Rank 0's metric sink: MLflow (the run opened by the driver) and the worker's stderr."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = enabled
        self.client = mlflow_client(uri) if enabled and uri and run_id else None
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        print(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr)
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)


class Follower(threading.Thread):
    """Driver-side progress: prints the run's newest metrics from MLflow while training runs."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.client, self.run_id, self.every_s = mlflow_client(uri), run_id, every_s
        self.stop = threading.Event()
        self.last_step: float | None = None

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # progress display only; never fail the run
                metrics = self.client.get_run(self.run_id).data.metrics
                if metrics.get("step") != self.last_step and "step" in metrics:
                    self.last_step = metrics["step"]
                    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k != "step")
                    print(f"train step {int(metrics['step'])}: {shown}", file=sys.stderr)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of an MLflow run, by step."""
    client = mlflow_client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- the driver's part


def finished(out: str, name: str, steps: int) -> tuple[str, int] | None:
    """The final checkpoint when a run under OUT already reached `steps` (re-running does no more)."""
    latest = latest_checkpoint(out, name)
    return latest if latest and latest[1] >= steps else None


def summary(directory: str, step: int, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The command's result: {checkpoint, step, metrics, ...}."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    return {"checkpoint": directory, "step": step, "metrics": clean, **extra}


def checkpoint_summary(directory: str, **extra: Any) -> dict[str, Any]:
    """`summary` of a checkpoint directory from its model.pt."""
    payload = read_payload(posixpath.join(directory, MODEL_FILE))[0]
    return summary(directory, int(payload["step"]), payload.get("metrics", {}), **extra)


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that ignores None values (CLI flags not given)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


# ---------------------------------------------------------------- the driver of a training command


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
            )
            trainer.fit()
    finally:
        follower.stop.set()
    final = latest_checkpoint(out, name)
    if final is None:
        raise RuntimeError(f"training finished without a checkpoint under {out}")
    return checkpoint_summary(final[0], mlflow_run_id=run_id, mlflow_tracking_uri=uri)

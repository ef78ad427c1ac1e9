"""The fields every training job has, their defaults scaled to a run, and the checks a config must pass.

The recipes (`syncnet_job.py`, `wav2lip_job.py`) subclass TrainConfig with their reference hparams.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from core.config import to_dict
from core.errors import BadInput
from training.augment import AugmentConfig
from training.balance import FocusConfig, check_balance
from training.data import DataSelection, WindowConfig
from training.optim import LR_SCHEDULES, OPTIMIZERS

log = logging.getLogger(__name__)

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
    lr_schedule: str = "constant"  # "constant" (the reference) or "cosine" (down to 0 at the last step)
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # train windows only
    balance: dict[str, Any] = field(default_factory=dict)  # e.g. {language: uniform} (training.balance)
    balance_strength: float = 1.0  # 0: the corpus's own mix ... 1: the configured one
    focus: FocusConfig = field(default_factory=FocusConfig)  # up-weight a `lipsync select` manifest's clips

    def validate_own(self) -> None:
        """BadInput for a bad setting among a recipe's own fields (a subclass's); `validate` calls it."""


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
    if cfg.augment.strength < 0:
        raise BadInput(f"augment.strength must be >= 0, not {cfg.augment.strength}")
    check_balance(cfg.balance, cfg.balance_strength, cfg.focus)
    if cfg.optimizer not in OPTIMIZERS:
        raise BadInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise BadInput(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")
    cfg.validate_own()


def check_resumable(previous: dict[str, Any], cfg: TrainConfig) -> None:
    """Warn when a run is resumed with a different config (other than steps and resources)."""
    old = {k: v for k, v in previous.items() if k not in EXTRA_KEYS}
    new = {k: v for k, v in to_dict(cfg).items() if k not in EXTRA_KEYS}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        log.warning("resuming with a changed config (%s); the checkpoint's weights are kept", changed)

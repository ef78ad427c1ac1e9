"""One trial of a sweep: the training recipe with the trial's hyperparameters, reporting to Ray Tune.

Two ways to run it, picked by the sweep's `resources.workers`:
- `in_process_trial` (1 worker, the default): the recipe's own step and loss functions
  (`syncnet_job.train_step`, `wav2lip_job.train_step`, ...) in the trial's process, with windows cut there
  from the selected shard rows (no Ray Data tasks competing with trials for CPUs). It validates, reports
  and checkpoints every `report_every` steps through `ray.tune.report`; a restarted trial continues from
  its checkpoint, data stream position included. A trial whose weights or losses stop being finite
  (a learning rate far too high) reports `DIVERGED_LOSS` from then on without training, so the scheduler,
  not the trial, decides when it ends.
- `train_run_trial` (> 1 worker): the recipe's `train_loop` as a Ray Train run (DDP, Ray Data streaming)
  whose reports reach Tune through a `TuneReportCallback`; its checkpoints live under
  OUT/train_runs/<trial id>/ and a restarted trial resumes from the newest one.

Every trial validates on the same clips: the val split of the sweep's base data selection. The tuned
selection thresholds choose training clips only, so their trials stay comparable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import config_hash, from_dict, to_dict
from core.storage import join_uri
from core.watchdog import Beats
from models.checkpoint import MODEL_FILE, checkpoint_payload, save_checkpoint
from training.common import TrainConfig, read_checkpoint_dir, validate, worker_amp
from training.data import Selected, WindowMaker, for_pass, read_clips, read_shard_clips, select
from tuning.space import apply

DIVERGED_LOSS = 1000.0
"""Validation loss reported by a diverged trial: worse than any real one, finite so ASHA can rank it."""

WAV2LIP_SYNC_SHARE = 0.03
"""Wav2Lip's val_loss = (1 - s) · val_l1 + s · val_sync with the reference's final sync weight s, fixed so
trials with different tuned weights are compared on one scale."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (the sampled parameters come in Tune's `config`)."""

    target: str  # syncnet | wav2lip
    data: str  # preprocess OUT
    out: str  # sweep OUT
    base: dict[str, Any]  # training config dict before the trial's parameters
    steps: int  # steps of a trial whose space has no `steps`
    report_every: int
    checkpoint_every: int
    workers: int = 1
    cpus: float = 1.0  # per worker
    gpus: float = 0.0  # per worker
    syncnet: str | None = None  # the expert's model.pt (wav2lip)
    data_cpus: float = 0.5  # Ray Data window tasks of a Ray Train trial
    progress: Any = None  # the sweep's ProgressBoard (core.watchdog): trials beat on it every step


class Diverged(Exception):
    """Weights or losses are no longer finite."""


# ---------------------------------------------------------------- the trial's training config and data


def config_class(target: str) -> type[TrainConfig]:
    """SyncNetConfig or Wav2LipConfig."""
    if target == "syncnet":
        from training.syncnet_job import SyncNetConfig

        return SyncNetConfig
    from training.wav2lip_job import Wav2LipConfig

    return Wav2LipConfig


def trial_config(setup: TrialSetup, params: dict[str, Any]) -> TrainConfig:
    """The training config of one trial: base, then the sampled parameters, then the sweep's cadence."""
    d = apply(setup.base, params)
    d["steps"] = int(params.get("steps", setup.steps))
    every = setup.report_every
    d.update(eval_every=every, log_every=every, checkpoint_every=setup.checkpoint_every)
    d.update(workers=setup.workers, gpu=setup.gpus > 0, cpus_per_worker=setup.cpus, max_failures=0)
    d.update(data_cpus_per_task=setup.data_cpus)
    cfg = from_dict(config_class(setup.target), d)
    validate(cfg)
    return cfg


def base_config(setup: TrialSetup) -> TrainConfig:
    """The sweep's base training config (its data selection picks the validation clips)."""
    return from_dict(config_class(setup.target), setup.base)


def trial_splits(setup: TrialSetup, cfg: TrainConfig) -> tuple[Selected, Selected]:
    """(train clips of the trial's selection, val clips of the base selection)."""
    clips = read_clips(setup.data)
    train = select(setup.data, cfg.data, "train", clips)
    if not train.clip_ids:
        raise ValueError(f"the trial's data selection {cfg.data} leaves no training clips")
    base = base_config(setup)
    return train, select(setup.data, base.data, "val", clips, max_clips=base.eval_clips, seed=base.seed)


def shard_rows(selected: Selected) -> list[dict[str, Any]]:
    """The selected clips' shard rows (the columns windows are cut from), read into this process."""
    rows = [
        row for uri in selected.shard_files for row in read_shard_clips(uri, selected.clip_ids).to_pylist()
    ]
    return sorted(rows, key=lambda row: row["clip_id"])


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Samples → a batch of tensors (images stay uint8, as Ray Data hands them to the recipes)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


class BatchStream:
    """Endless shuffled training batches, epoch after epoch; `position` makes a restart continue exactly.

    Each epoch visits the clips in a seeded order through a shuffle buffer, with windows drawn anew per
    epoch (the window seed is offset by the epoch).
    """

    def __init__(self, rows: list[dict], cfg: TrainConfig, kind: str, epoch: int = 0, index: int = 0) -> None:
        self.rows, self.cfg, self.kind = rows, cfg, kind
        self.epoch, self.index = epoch, index
        self._batches = self._epoch(epoch, skip=index)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                self.index += 1
                return batch
            if self.index == 0:
                break
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch, skip=0)
        raise ValueError(f"the selected clips give fewer windows than one batch ({self.cfg.batch_size})")

    def _epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        windows = for_pass(cfg.windows, epoch)
        maker = WindowMaker(self.kind, windows, cfg.img_size)
        size = max(cfg.shuffle_buffer, cfg.batch_size)
        buffer: list[dict[str, np.ndarray]] = []
        n = 0
        for i in rng.permutation(len(self.rows)):
            buffer.extend(maker(self.rows[i]))
            while len(buffer) >= size:
                n += 1
                batch = [
                    buffer.pop(int(j)) for j in sorted(rng.choice(len(buffer), cfg.batch_size, False))[::-1]
                ]
                if n > skip:
                    yield collate(batch)
        rng.shuffle(buffer)
        for start in range(0, len(buffer) - cfg.batch_size + 1, cfg.batch_size):
            n += 1
            if n > skip:
                yield collate(buffer[start : start + cfg.batch_size])


def val_batches(rows: list[dict], cfg: TrainConfig, kind: str) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: `eval_windows_per_clip` windows of each val clip, in batches."""
    windows = dataclasses.replace(cfg.windows, windows_per_clip=cfg.eval_windows_per_clip)
    maker = WindowMaker(kind, windows, cfg.img_size)
    samples = [s for row in rows for s in maker(row)]
    return [collate(samples[i : i + cfg.batch_size]) for i in range(0, len(samples), cfg.batch_size)]


# ---------------------------------------------------------------- divergence


def finite(*items: nn.Module | torch.Tensor | None) -> bool:
    """True when every tensor, and every floating parameter and buffer of every module, is finite."""
    for item in items:
        if item is None:
            continue
        tensors = [item] if isinstance(item, torch.Tensor) else list(item.state_dict().values())
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return False
    return True


@contextlib.contextmanager
def divergence_guard(still_finite: Callable[[], bool]) -> Iterator[None]:
    """Turns an error into Diverged when the model no longer computes finite outputs (BCE refuses NaN)."""
    try:
        yield
    except RuntimeError as exc:
        if still_finite():
            raise
        raise Diverged(str(exc)) from exc


def check_finite(values: dict[str, float]) -> dict[str, float]:
    """`values` unchanged, or Diverged when one is NaN or infinite."""
    if not all(math.isfinite(v) for v in values.values()):
        raise Diverged(f"non-finite losses {values}")
    return values


# ---------------------------------------------------------------- the two recipes, step by step


class SyncNetSteps:
    """The SyncNet recipe's model, optimiser, step, validation and checkpoint, in one process."""

    penalty = {"val_loss": DIVERGED_LOSS, "val_accuracy": 0.0}

    def __init__(self, cfg: Any, device: torch.device, expert: str | None = None) -> None:
        from models.registry import build_model
        from training.common import seed_everything

        self.cfg, self.device, self.amp = cfg, device, worker_amp(device.type == "cuda")
        seed_everything(cfg.seed)
        self.model = build_model("syncnet", cfg.img_size, cfg.width).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.scaler = self.amp.grad_scaler()

    def load(self, payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
        main = payloads[MODEL_FILE]
        self.model.load_state_dict(main["state_dict"])
        self.optimizer.load_state_dict(main["optimizer"])
        state = main.get("train_state", {})
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state

    def step(self, batch: dict[str, torch.Tensor], state: dict[str, Any]) -> float:
        from training.syncnet_job import train_step

        with divergence_guard(lambda: self.finite_on(batch)):
            loss = train_step(self.model, self.optimizer, self.scaler, self.amp, batch, self.device)
        return check_finite({"train_loss": loss})["train_loss"]

    @torch.no_grad()
    def finite_on(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the weights and the embeddings of `batch` are finite."""
        from training.common import images

        self.model.eval()
        audio, face = self.model(batch["mel"].to(self.device), images(batch["faces"], self.device))
        return finite(self.model, audio, face)

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]], state: dict[str, Any]) -> dict[str, float]:
        from training.syncnet_job import sync_batch_loss

        self.model.eval()
        loss_sum = correct = count = 0.0
        for batch in batches:
            with divergence_guard(lambda b=batch: self.finite_on(b)):
                loss, prob = sync_batch_loss(self.model, batch, self.device, self.amp)
            labels = batch["label"].to(self.device)
            loss_sum += float(loss) * len(prob)
            correct += float(((prob > 0.5).float() == labels).sum())
            count += len(prob)
        return check_finite({"val_loss": loss_sum / count, "val_accuracy": correct / count})

    def payloads(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> dict[str, dict]:
        cfg = self.cfg
        config = to_dict(cfg) | {"config_hash": config_hash(cfg)}
        main = checkpoint_payload(self.model, "syncnet", cfg.img_size, step, config, metrics, self.optimizer)
        main["train_state"] = state | {"scaler": self.scaler.state_dict()}
        return {MODEL_FILE: main}


class Wav2LipSteps:
    """The Wav2Lip recipe's generator (+ discriminator), step, validation and checkpoint, in one process."""

    penalty = {"val_loss": DIVERGED_LOSS, "val_l1": DIVERGED_LOSS, "val_sync": DIVERGED_LOSS}

    def __init__(self, cfg: Any, device: torch.device, expert: str | None = None) -> None:
        from training.wav2lip_job import build_state

        if not expert:
            raise ValueError("a wav2lip trial needs the expert SyncNet checkpoint")
        self.cfg, self.device, self.amp = cfg, device, worker_amp(device.type == "cuda")
        self.state = build_state(cfg, expert, device, self.amp)
        for key in ("gen", "disc"):
            if self.state[key] is not None:
                self.state[key] = self.state[key].to(device)

    def load(self, payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from training.wav2lip_job import load_state

        return load_state(self.state, payloads)

    def step(self, batch: dict[str, torch.Tensor], state: dict[str, Any]) -> float:
        from training.wav2lip_job import train_step

        weight = state.get("sync_weight", 0.0)
        with divergence_guard(lambda: self.finite_on(batch)):
            losses = train_step(self.state, batch, self.device, self.amp, self.cfg, weight)
        return check_finite(losses)["train_loss"]

    @torch.no_grad()
    def finite_on(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the weights and the frames generated for `batch` are finite."""
        from training.common import images

        gen = self.state["gen"].eval()
        frames = gen(batch["indiv_mels"].to(self.device), images(batch["x"], self.device))
        return finite(gen, self.state["disc"], frames)

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]], state: dict[str, Any]) -> dict[str, float]:
        from training.wav2lip_job import generator_losses

        gen = self.state["gen"].eval()
        disc = self.state["disc"].eval() if self.state["disc"] is not None else None
        l1 = sync = n = 0.0
        for batch in batches:
            with divergence_guard(lambda b=batch: self.finite_on(b)):
                _, losses = generator_losses(gen, disc, self.state["expert"], batch, self.device, self.amp)
            k = len(batch["x"])
            l1, sync, n = l1 + float(losses["l1"]) * k, sync + float(losses["sync"]) * k, n + k
        metrics = check_finite({"val_l1": l1 / n, "val_sync": sync / n})
        if metrics["val_sync"] < self.cfg.sync_threshold:  # the reference's switch, as in the recipe
            state["sync_weight"] = self.cfg.target_sync_weight
        return metrics | {"val_loss": wav2lip_val_loss(metrics), "sync_weight": state.get("sync_weight", 0.0)}

    def payloads(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> dict[str, dict]:
        from training.wav2lip_job import payloads_of

        return payloads_of(self.state, self.cfg, step, metrics, state)


def wav2lip_val_loss(metrics: dict[str, float]) -> float:
    """One comparable Wav2Lip validation loss from val_l1 and val_sync."""
    return (1 - WAV2LIP_SYNC_SHARE) * metrics["val_l1"] + WAV2LIP_SYNC_SHARE * metrics["val_sync"]


STEPS = {"syncnet": SyncNetSteps, "wav2lip": Wav2LipSteps}


# ---------------------------------------------------------------- in-process trials


def trial_device(gpus: float) -> torch.device:
    """The GPU Ray gave this trial (CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def save_payloads(directory: str, payloads: dict[str, dict[str, Any]]) -> None:
    """model.pt in the shared checkpoint format, other payloads (disc.pt) beside it."""
    for name, payload in payloads.items():
        if name == MODEL_FILE:
            save_checkpoint(directory, payload)
        else:
            torch.save(payload, os.path.join(directory, name))


def restored() -> dict[str, dict[str, Any]] | None:
    """Payloads of the checkpoint Tune restarts this trial from, if any."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return read_checkpoint_dir(directory)


def in_process_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function trainable: train, validate, report and checkpoint in this process."""
    cfg = trial_config(setup, config)
    torch.set_num_threads(max(1, int(setup.cpus)))
    steps = STEPS[setup.target](cfg, trial_device(setup.gpus), setup.syncnet)
    step, state = resume(steps)
    if step >= cfg.steps:
        return  # it finished before the driver recorded it
    state["starts"] = [*state.get("starts", []), step]
    train, val = trial_splits(setup, cfg)
    position = state.get("stream", {})
    stream = BatchStream(
        shard_rows(train), cfg, setup.target, position.get("epoch", 0), position.get("index", 0)
    )
    train_and_report(steps, stream, val_batches(shard_rows(val), cfg, setup.target), state, step, setup)


def resume(steps: Any) -> tuple[int, dict[str, Any]]:
    """(step, train state) of the checkpoint Tune restarts this trial from, loaded into `steps`."""
    payloads = restored()
    if payloads is None:
        return 0, {}
    return int(payloads[MODEL_FILE]["step"]), steps.load(payloads)


def train_and_report(
    steps: Any, stream: BatchStream, validation: list[dict], state: dict, step: int, setup: TrialSetup
) -> None:
    """The loop: a step, and every `report_every` steps validation, a report and maybe a checkpoint."""
    from ray import tune

    cfg = steps.cfg
    run = {"start_step": step, "run_started_at": time.time()}
    losses: list[float] = []
    diverged = False
    beat, trial = Beats(setup.progress), tune.get_context().get_trial_id()
    while step < cfg.steps:
        beat(f"trial {trial} training a step", step)
        if not diverged:
            try:
                losses.append(steps.step(next(stream), state))
            except Diverged:
                diverged = True
        step += 1
        if step % setup.report_every and step < cfg.steps:
            continue
        metrics = report_metrics(steps, validation, state, losses, diverged) | run | {"step": step}
        diverged, losses = bool(metrics["diverged"]), []
        checkpoint = None
        if not diverged and (step % setup.checkpoint_every == 0 or step == cfg.steps):
            state["stream"] = stream.position()
            checkpoint = steps.payloads(step, metrics, state)
        report(metrics, checkpoint, tune)


def report_metrics(
    steps: Any, validation: list[dict], state: dict[str, Any], losses: list[float], diverged: bool
) -> dict[str, float]:
    """Validation metrics and mean train loss since the last report (the penalty once diverged)."""
    if not diverged:
        try:
            metrics = steps.evaluate(validation, state) if validation else {}
            return metrics | {"train_loss": sum(losses) / len(losses) if losses else math.nan, "diverged": 0}
        except Diverged:
            pass
    return steps.penalty | {"train_loss": DIVERGED_LOSS, "diverged": 1}


def report(metrics: dict[str, float], payloads: dict[str, dict] | None, tune: Any) -> None:
    """`tune.report`, with a checkpoint directory when there are payloads."""
    if payloads is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_payloads(tmp, payloads)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- Ray Train trials


def train_run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function trainable that runs the recipe's `train_loop` as a Ray Train run."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.common import datasets, latest_checkpoint, storage_root, torch_config

    cfg = trial_config(setup, config)
    target = setup.target
    out = join_uri(setup.out, f"train_runs/{tune.get_context().get_trial_id()}")
    latest = latest_checkpoint(out, target)
    if latest and latest[1] >= cfg.steps:
        return
    train, val = trial_splits(setup, cfg)
    if not val.clip_ids:
        raise ValueError("the base data selection has no val clips to compare trials on")
    # the recipe's loop resumes from `out`
    loop_config = {"cfg": to_dict(cfg), "out": storage_root(out), "has_val": True, "progress": setup.progress}
    if target == "wav2lip":
        loop_config["syncnet"] = setup.syncnet
    per_worker = {"CPU": setup.cpus} | ({"GPU": setup.gpus} if setup.gpus else {})
    trainer = TorchTrainer(
        recipe_loop(target),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=setup.workers, use_gpu=setup.gpus > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=target,
            storage_path=storage_root(out),
            callbacks=[metrics_callback(target, latest[1] if latest else 0)],
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        torch_config=torch_config(setup.gpus > 0),
        datasets=datasets(train, val, target, cfg),
    )
    trainer.fit()


def recipe_loop(target: str) -> Any:
    """The recipe's per-worker `train_loop`."""
    if target == "syncnet":
        from training.syncnet_job import train_loop

        return train_loop
    from training.wav2lip_job import train_loop as wav2lip_loop

    return wav2lip_loop


def metrics_callback(target: str, start_step: int) -> Any:
    """A TuneReportCallback that adds what in-process trials report (val_loss for Wav2Lip, the run)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    run = {"start_step": start_step, "run_started_at": time.time(), "diverged": 0}

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            first = dict(metrics[0]) | run
            if target == "wav2lip" and {"val_l1", "val_sync"} <= set(first):
                first["val_loss"] = wav2lip_val_loss(first)
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ReportToTune()

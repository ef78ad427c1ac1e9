"""One trial of a sweep: a training recipe with the trial's hyperparameters, reporting to Ray Tune.

The recipes (`training.recipe`) do the training; this module is Tune's side of it. Two ways to run a trial,
picked by the sweep's `resources.workers`:
- `in_process_trial` (1 worker, the default): the recipe in the trial's process, on batches cut there
  from the selected shard rows (`training.streams.BatchStream`: no Ray Data tasks competing with trials for
  CPUs). It validates, reports and checkpoints every `report_every` steps through `ray.tune.report`; a
  restarted trial continues from its checkpoint, data stream position included. A trial whose weights or
  losses stop being finite (a learning rate far too high) reports `DIVERGED_LOSS` from then on without
  training, so the scheduler, not the trial, decides when it ends.
- `train_run_trial` (> 1 worker): the recipe's `train_loop` as a Ray Train run (DDP, Ray Data streaming)
  whose reports reach Tune through a `TuneReportCallback`; its checkpoints live under
  OUT/train_runs/<trial id>/ and a restarted trial resumes from the newest one.

Every trial validates on the same clips: the val split of the sweep's base data selection. The tuned
selection thresholds choose training clips only, so their trials stay comparable.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from core.config import from_dict, to_dict
from core.storage import join_uri
from core.watchdog import Beats
from models.checkpoint import MODEL_FILE
from training.checkpoints import latest_checkpoint, read_checkpoint_dir, storage_root, write_payloads
from training.config import TrainConfig, validate
from training.data import Selected, read_clips, select
from training.distributed import torch_config
from training.recipe import Recipe, config_class, recipe_class
from training.streams import BatchStream, datasets, shard_rows, val_batches, weigh
from tuning.space import apply

DIVERGED_LOSS = 1000.0
"""Validation loss reported by a diverged trial: worse than any real one, finite so ASHA can rank it."""

PENALTY = {
    "syncnet": {"val_loss": DIVERGED_LOSS, "val_accuracy": 0.0},
    "wav2lip": {"val_loss": DIVERGED_LOSS, "val_l1": DIVERGED_LOSS, "val_sync": DIVERGED_LOSS},
}
"""The validation metrics a diverged trial reports."""

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
    return weigh(train, clips, cfg), select(
        setup.data, base.data, "val", clips, max_clips=base.eval_clips, seed=base.seed
    )


# ---------------------------------------------------------------- divergence


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


def train_step(recipe: Recipe, batch: dict[str, torch.Tensor]) -> float:
    """The recipe's step; its train loss, or Diverged."""
    with divergence_guard(lambda: recipe.finite_on(batch)):
        return check_finite(recipe.step(batch))["train_loss"]


def evaluate(recipe: Recipe, validation: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The recipe's validation metrics (+ Wav2Lip's comparable val_loss, + its logged state), or Diverged."""
    with divergence_guard(lambda: all(recipe.finite_on(b) for b in validation)):
        metrics = check_finite(recipe.evaluate(validation))
    if recipe.name == "wav2lip":
        metrics["val_loss"] = wav2lip_val_loss(metrics)
    return metrics | recipe.logged()


def wav2lip_val_loss(metrics: dict[str, float]) -> float:
    """One comparable Wav2Lip validation loss from val_l1 and val_sync."""
    return (1 - WAV2LIP_SYNC_SHARE) * metrics["val_l1"] + WAV2LIP_SYNC_SHARE * metrics["val_sync"]


# ---------------------------------------------------------------- in-process trials


def trial_device(gpus: float) -> torch.device:
    """The GPU Ray gave this trial (CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def restored() -> dict[str, dict[str, Any]] | None:
    """Payloads of the checkpoint Tune restarts this trial from, if any."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return read_checkpoint_dir(directory)


def in_process_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function trainable: the recipe trained, validated, reported and checkpointed in this process."""
    cfg = trial_config(setup, config)
    torch.set_num_threads(max(1, int(setup.cpus)))
    payloads = restored()
    recipe = recipe_class(setup.target)(cfg, trial_device(setup.gpus), resume=payloads, expert=setup.syncnet)
    step = int(payloads[MODEL_FILE]["step"]) if payloads is not None else 0
    if step >= cfg.steps:
        return  # it finished before the driver recorded it
    state = recipe.train_state
    state["starts"] = [*state.get("starts", []), step]
    train, val = trial_splits(setup, cfg)
    position = state.get("stream", {})
    stream = BatchStream(
        shard_rows(train, cfg.augment.changes_audio),
        cfg,
        setup.target,
        position.get("epoch", 0),
        position.get("index", 0),
    )
    train_and_report(recipe, stream, val_batches(shard_rows(val), cfg, setup.target), step, setup)


def train_and_report(
    recipe: Recipe, stream: BatchStream, validation: list[dict], step: int, setup: TrialSetup
) -> None:
    """The loop: a step, and every `report_every` steps validation, a report and maybe a checkpoint."""
    from ray import tune

    cfg = recipe.cfg
    run = {"start_step": step, "run_started_at": time.time()}
    losses: list[float] = []
    diverged = False
    beat, trial = Beats(setup.progress), tune.get_context().get_trial_id()
    while step < cfg.steps:
        beat(f"trial {trial} training a step", step)
        if not diverged:
            try:
                losses.append(train_step(recipe, next(stream)))
            except Diverged:
                diverged = True
        step += 1
        if step % setup.report_every and step < cfg.steps:
            continue
        metrics = report_metrics(recipe, validation, losses, diverged) | run | {"step": step}
        diverged, losses = bool(metrics["diverged"]), []
        checkpoint = None
        if not diverged and (step % setup.checkpoint_every == 0 or step == cfg.steps):
            recipe.train_state["stream"] = stream.position()
            checkpoint = recipe.payloads(step, metrics)
        report(metrics, checkpoint, tune)


def report_metrics(
    recipe: Recipe, validation: list[dict], losses: list[float], diverged: bool
) -> dict[str, float]:
    """Validation metrics and mean train loss since the last report (the penalty once diverged)."""
    if not diverged:
        try:
            metrics = evaluate(recipe, validation) if validation else {}
            return metrics | {"train_loss": sum(losses) / len(losses) if losses else math.nan, "diverged": 0}
        except Diverged:
            pass
    return PENALTY[recipe.name] | {"train_loss": DIVERGED_LOSS, "diverged": 1}


def report(metrics: dict[str, float], payloads: dict[str, dict] | None, tune: Any) -> None:
    """`tune.report`, with a checkpoint directory when there are payloads."""
    if payloads is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_payloads(tmp, payloads)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- Ray Train trials


def train_run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function trainable that runs the recipe's `train_loop` as a Ray Train run."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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

"""`lipsync tune DATA OUT`: a hyperparameter sweep of one training recipe on Ray Tune.

Set-up (config, space, data, cluster checked before anything starts), then the Tuner (ASHA on the
training step by default, random or Optuna search, trials sized from config and as many at once as the
pool holds), then results: OUT/trials.parquet, OUT/best.yaml (a `lipsync train --config` file) and
OUT/metric_vs_step.png. Tune keeps its state and the trials' checkpoints under OUT/sweep/, so `--resume`
continues an interrupted sweep (`Tuner.restore`): finished trials are kept, unfinished ones continue
from their last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from core.config import config_hash, from_dict, to_dict
from core.errors import BadInput
from core.ray import scoped_environ
from tuning.space import (
    DEFAULT_SPACES,
    METRICS,
    TARGETS,
    grid_size,
    max_value,
    normalise,
    spec_values,
    to_tune,
    validate_space,
)

if TYPE_CHECKING:
    from tuning.trial import TrialSetup

log = logging.getLogger(__name__)

EXPERIMENT = "sweep"
TRAIN_DRIVER_CPUS = 0.01
"""CPU of a Ray Train trial's own process, which only drives the run (Tune needs a non-empty request)."""
SWEEP_FILE = "sweep.yaml"


DEFAULT_CPUS = 1.0
"""CPUs per trial worker when `resources.cpus` is left to the plan: at most this, less when one trial would
not fit the cluster (core.plan)."""
DEFAULT_DATA_CPUS = 0.5
"""Likewise for `resources.data_cpus`, the Ray Data window tasks of a Ray Train trial."""
REPORT_SHARE, GRACE_SHARE, CHECKPOINT_SHARE = 1 / 20, 1 / 10, 1 / 4
"""Default report_every, grace_period and checkpoint_every as shares of the largest trial's steps (2000
steps: 100, 200 and 500); grace_period and checkpoint_every are multiples of report_every."""


@dataclass(frozen=True)
class TrialResources:
    """What one trial takes from the pool."""

    workers: int = 1  # > 1: each trial is a Ray Train run (DDP) with this many workers
    cpus: float | None = None  # per worker (None: fitted to the cluster, at most DEFAULT_CPUS)
    gpus: float = 0.0  # per worker: fractional (0.5: two trials share a GPU) or whole
    data_cpus: float | None = None  # Ray Data window tasks of a Ray Train trial (None: fitted, at most 0.5)
    max_concurrent: int | None = None  # cap on trials at once (default: as many as the pool holds)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: which recipe, what to optimise, the search space, scheduler and budget."""

    target: str = "syncnet"  # syncnet | wav2lip
    metric: str = "val_loss"  # see METRICS
    search: str = "random"  # random | optuna
    scheduler: str = "asha"  # asha (early stopping) | fifo (every trial runs to its steps)
    trials: int = 8  # samples drawn from the space (each runs every grid combination)
    steps: int = 2000  # steps of a trial, unless `steps` is in the space
    grace_period: int | None = None  # ASHA: steps before a trial may be stopped (None: a tenth of the steps)
    reduction_factor: float = 2.0  # ASHA: keep the best 1/rf at each rung
    report_every: int | None = None  # steps between validation reports (None: a twentieth of the steps)
    checkpoint_every: int | None = None  # steps between trial checkpoints, a multiple of report_every
    # (None: a quarter of the steps)
    resources: TrialResources = field(default_factory=TrialResources)
    max_failures: int = 0  # retries of a trial that raised (from its last checkpoint)
    resume_errored: bool = False  # --resume also retries errored trials from their last checkpoint
    seed: int = 0  # seed of the search (random sampling, Optuna's sampler)
    syncnet: str | None = None  # wav2lip: the expert SyncNet checkpoint (or --syncnet)
    state_save_s: float = 2.0  # how often Tune saves the sweep state that --resume reads
    stall_seconds: float = 600.0  # no training step in any trial for this long fails the sweep (0: never)
    base: dict[str, Any] = field(default_factory=dict)  # training config keys every trial starts from
    space: dict[str, Any] = field(default_factory=dict)  # parameter → value or distribution (space.py)


# ---------------------------------------------------------------- validation


def effective(cfg: SweepConfig) -> SweepConfig:
    """`cfg` with the target's default space when it names none, numbers read as numbers, and the cadence
    it leaves to defaults scaled to its steps."""
    space = cfg.space or DEFAULT_SPACES.get(cfg.target, {})
    return scaled_cadence(dataclasses.replace(cfg, space=normalise(space)))


def _multiple(every: int, share: float, steps: int) -> int:
    """The multiple of `every` nearest to `share` of `steps` (at least `every`)."""
    return every * max(1, round(share * steps / every))


def scaled_cadence(cfg: SweepConfig) -> SweepConfig:
    """report_every, grace_period and checkpoint_every left to defaults, as shares of the largest trial's
    steps (REPORT_SHARE, GRACE_SHARE, CHECKPOINT_SHARE); a default grace period never exceeds the steps."""
    if isinstance(cfg.steps, int) and cfg.steps < 1:
        return cfg  # validate names it
    top = max_steps(cfg)
    report = cfg.report_every or max(1, round(REPORT_SHARE * top))
    grace = cfg.grace_period or min(top, _multiple(report, GRACE_SHARE, top))
    checkpoint = cfg.checkpoint_every or _multiple(report, CHECKPOINT_SHARE, top)
    return dataclasses.replace(cfg, report_every=report, grace_period=grace, checkpoint_every=checkpoint)


def validate(cfg: SweepConfig) -> None:
    """BadInput for a sweep that cannot run, naming what is wrong."""
    if cfg.target not in TARGETS:
        raise BadInput(f"target {cfg.target!r} is not one of {', '.join(TARGETS)}")
    if cfg.metric not in METRICS[cfg.target]:
        raise BadInput(f"metric {cfg.metric!r} is not one of {', '.join(METRICS[cfg.target])}")
    if cfg.search not in ("random", "optuna"):
        raise BadInput(f"search {cfg.search!r} is not one of random, optuna")
    if cfg.scheduler not in ("asha", "fifo"):
        raise BadInput(f"scheduler {cfg.scheduler!r} is not one of asha, fifo")
    for name in ("trials", "steps", "report_every", "checkpoint_every", "grace_period"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"{name} must be >= 1")
    if cfg.checkpoint_every % cfg.report_every:
        raise BadInput(f"checkpoint_every {cfg.checkpoint_every} is not a multiple of report_every")
    if cfg.stall_seconds < 0:
        raise BadInput(f"stall_seconds must be >= 0 (0: never), not {cfg.stall_seconds}")
    if cfg.reduction_factor <= 1:
        raise BadInput(f"reduction_factor must be > 1, not {cfg.reduction_factor}")
    validate_resources(cfg.resources)
    validate_space(cfg.target, cfg.space, cfg.search)
    check_batch_sizes(cfg)
    if cfg.scheduler == "asha" and cfg.grace_period > max_steps(cfg):
        raise BadInput(f"grace_period {cfg.grace_period} exceeds the largest trial steps {max_steps(cfg)}")


def validate_resources(res: TrialResources) -> None:
    """BadInput for impossible per-trial resources."""
    cpus = DEFAULT_CPUS if res.cpus is None else res.cpus
    data_cpus = DEFAULT_DATA_CPUS if res.data_cpus is None else res.data_cpus
    if res.workers < 1 or cpus <= 0 or res.gpus < 0 or data_cpus <= 0:
        raise BadInput("resources: workers >= 1, cpus > 0, data_cpus > 0 and gpus >= 0 are required")
    if res.gpus > 1 and not float(res.gpus).is_integer():
        raise BadInput(f"resources.gpus {res.gpus} must be a fraction below 1 or a whole number")
    if res.max_concurrent is not None and res.max_concurrent < 1:
        raise BadInput("resources.max_concurrent must be >= 1")


def check_batch_sizes(cfg: SweepConfig) -> None:
    """Every batch size a trial can get must split evenly over its workers."""
    spec = cfg.space.get("batch_size", cfg.base.get("batch_size"))
    if spec is None or cfg.resources.workers == 1:
        return
    values = spec_values("batch_size", spec)
    if isinstance(spec, dict) and next(iter(spec)) in ("uniform", "loguniform", "randint"):
        raise BadInput("batch_size: use choice or grid with resources.workers > 1 (it must divide evenly)")
    bad = [v for v in values if v % cfg.resources.workers]
    if bad:
        raise BadInput(f"batch_size {bad[0]} is not divisible by resources.workers {cfg.resources.workers}")


def max_steps(cfg: SweepConfig) -> int:
    """The most steps any trial can run (ASHA's max_t)."""
    return max_value(cfg.space, "steps", cfg.steps)


def total_trials(cfg: SweepConfig) -> int:
    return cfg.trials * grid_size(cfg.space)


# ---------------------------------------------------------------- the pool


def per_trial(res: TrialResources) -> dict[str, float]:
    """CPUs and GPUs one trial holds (a Ray Train trial: its workers plus its data tasks)."""
    each = DEFAULT_CPUS if res.cpus is None else res.cpus
    data = DEFAULT_DATA_CPUS if res.data_cpus is None else res.data_cpus
    cpus = res.workers * each + (data + TRAIN_DRIVER_CPUS if res.workers > 1 else 0.0)
    return {"CPU": cpus, "GPU": res.workers * res.gpus}


def trial_asks(res: TrialResources) -> list[Any]:
    """What one trial asks the cluster for (core.plan): in-process, or a Ray Train run."""
    from core.plan import Ask

    cpus = DEFAULT_CPUS if res.cpus is None else res.cpus
    fit = res.cpus is None
    if res.workers == 1:
        return [Ask("trial", 1, cpus, gpus=res.gpus, cpus_flag="resources.cpus", fit_cpus=fit)]
    data = DEFAULT_DATA_CPUS if res.data_cpus is None else res.data_cpus
    return [
        Ask("trial workers", res.workers, cpus, res.gpus, count_flag="resources.workers",
            cpus_flag="resources.cpus", fit_cpus=fit),
        Ask("trial data tasks", 1, data, cpus_flag="resources.data_cpus", fit_cpus=res.data_cpus is None),
        Ask("trial driver", 1, TRAIN_DRIVER_CPUS),
    ]  # fmt: skip


def plan_resources(res: TrialResources) -> TrialResources:
    """`res` with the CPUs it leaves to defaults fitted so one trial fits the cluster; BadInput with the
    one-line plan when not even one does."""
    from core.plan import plan

    asks = plan(trial_asks(res), "tune (one trial)")
    data = asks[1].cpus if len(asks) > 1 else (DEFAULT_DATA_CPUS if res.data_cpus is None else res.data_cpus)
    return dataclasses.replace(res, cpus=asks[0].cpus, data_cpus=data)


def concurrency(res: TrialResources, cluster: dict[str, float], trials: int) -> int:
    """Trials at once: what the pool holds (BadInput if not even one trial fits), capped by config."""
    need = per_trial(res)
    fits = []
    for kind, amount in need.items():
        have = float(cluster.get(kind, 0.0))
        if amount > have + 1e-9:
            what = f"{res.workers} worker(s) x {per_trial(res)[kind] / res.workers:g}"
            raise BadInput(f"a trial needs {amount:g} {kind}(s) ({what}) but the cluster has {have:g}")
        if amount > 0:
            fits.append(math.floor(round(have / amount, 6)))
    n = min([*fits, trials])
    return max(1, min(n, res.max_concurrent) if res.max_concurrent else n)


# ---------------------------------------------------------------- the Tuner


def trial_setup(cfg: SweepConfig, data: str, out: str, expert: str | None) -> TrialSetup:
    """What every trial shares; BadInput for unknown keys in `base`."""
    from tuning.trial import TrialSetup

    res = cfg.resources
    return TrialSetup(
        target=cfg.target,
        data=data,
        out=out,
        base=to_dict(from_dict(config_class_of(cfg.target), cfg.base)),
        steps=cfg.steps,
        report_every=cfg.report_every,
        checkpoint_every=cfg.checkpoint_every,
        workers=res.workers,
        cpus=DEFAULT_CPUS if res.cpus is None else res.cpus,
        gpus=res.gpus,
        data_cpus=DEFAULT_DATA_CPUS if res.data_cpus is None else res.data_cpus,
        syncnet=expert,
    )


def config_class_of(target: str) -> type:
    from training.recipe import config_class

    return config_class(target)


def trainable(cfg: SweepConfig, setup: TrialSetup) -> Any:
    """The trial function with its setup and resources: in-process, or a Ray Train run per trial."""
    from ray import tune

    from tuning.trial import in_process_trial, train_run_trial

    res = cfg.resources
    if res.workers == 1:
        fn = tune.with_parameters(in_process_trial, setup=setup)
        return tune.with_resources(fn, {"cpu": res.cpus, "gpu": res.gpus})
    fn = tune.with_parameters(train_run_trial, setup=setup)
    return tune.with_resources(fn, {"cpu": TRAIN_DRIVER_CPUS})  # the Ray Train run places its own workers


def scheduler(cfg: SweepConfig) -> Any:
    """ASHA on the training step, or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=max_steps(cfg),
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
    )


def searcher(cfg: SweepConfig, max_concurrent: int) -> Any:
    """Seeded random sampling (grids expanded), or Optuna's TPE (limited by the TuneConfig)."""
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent)


def trial_dirname(trial: Any) -> str:
    """Trial directories (and names) are the trial ids."""
    return trial.trial_id


# Tune deletes a trial's older checkpoints as soon as a new one registers, but the sweep state that --resume
# reads is saved (and copied to storage, in a background thread) a moment later. With one checkpoint kept, a
# sweep killed in that moment resumed a trial from a checkpoint already deleted ("Could not recover from
# checkpoint as it does not exist on storage anymore"). With two, the state still names one that exists
# unless no save completed during a whole checkpoint interval (seconds of state_save_s, minutes of steps).
TRIAL_CHECKPOINTS_KEPT = 2


def new_tuner(cfg: SweepConfig, fn: Any, storage: str, max_concurrent: int) -> Any:
    """A Tuner writing under `storage`/sweep."""
    from ray import tune

    tune_config = tune.TuneConfig(
        metric=cfg.metric,
        mode=METRICS[cfg.target][cfg.metric],
        num_samples=cfg.trials,
        scheduler=scheduler(cfg),
        search_alg=searcher(cfg, max_concurrent),
        max_concurrent_trials=max_concurrent if cfg.search == "optuna" else None,
        trial_name_creator=trial_dirname,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=storage,
        verbose=0,
        callbacks=[Progress(cfg.metric, total_trials(cfg))],
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=TRIAL_CHECKPOINTS_KEPT),
    )
    return tune.Tuner(fn, param_space=to_tune(cfg.space), tune_config=tune_config, run_config=run_config)


def Progress(metric: str, total: int) -> Any:  # noqa: N802 - a class made on demand (ray.tune imports late)
    """A Tune callback printing one line per report and per finished trial to stderr."""
    from ray import tune

    class _Progress(tune.Callback):
        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            value = result.get(metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            print(f"trial {trial.trial_id} step {result.get('step')}: {metric}={shown}", file=sys.stderr)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trials, trial, "finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trials, trial, "failed")

        def _done(self, trials: list, trial: Any, what: str) -> None:
            ended = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
            last = trial.last_result or {}
            print(
                f"trial {trial.trial_id} {what} at step {last.get('step')}: {metric}={last.get(metric)} "
                f"({ended}/{total} trials done)",
                file=sys.stderr,
            )

    return _Progress()


def tune_env(state_save_s: float) -> contextlib.AbstractContextManager[None]:
    """While the sweep runs: Tune saves its state (what --resume reads) every `state_save_s` seconds and
    does not warn about it (TRIAL_CHECKPOINTS_KEPT checkpoints of a trial also force a save)."""
    env = {
        "TUNE_GLOBAL_CHECKPOINT_S": str(state_save_s),
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    return scoped_environ(env)


# ---------------------------------------------------------------- the driver


def ray_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS (a Ray job's entrypoint), else a new embedded Ray ("local"): a bare
    ray.init() would join whatever cluster `ray start` left running on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def check_data(cfg: SweepConfig, data: str) -> None:
    """BadInput when the base selection has no training or no validation clips (trials need both)."""
    from training.streams import select_splits

    base = from_dict(config_class_of(cfg.target), cfg.base)
    _, val = select_splits(data, base)
    if not val.clip_ids:
        raise BadInput(f"{data}: the base data selection has no val clips to compare trials on")


def check_expert(cfg: SweepConfig) -> str | None:
    """The expert's model.pt for wav2lip sweeps (BadInput when missing or of the wrong kind/size)."""
    if cfg.target != "wav2lip":
        return None
    from training.wav2lip_job import check_expert as check

    return check(cfg.syncnet, from_dict(config_class_of(cfg.target), cfg.base).img_size)


def sweep_config_for(cfg: SweepConfig, out: str, resume: bool) -> SweepConfig:
    """On --resume, the sweep's saved config (a different one given now is ignored, with a warning)."""
    from core.storage import Store

    store = Store(out)
    if not (resume and store.exists(SWEEP_FILE)):
        return cfg
    saved = from_dict(SweepConfig, yaml.safe_load(store.read_bytes(SWEEP_FILE)))
    if config_hash(saved) != config_hash(cfg):
        log.warning("--resume: continuing the sweep with its saved %s (the given config differs)", SWEEP_FILE)
    return saved


def run(
    cfg: SweepConfig, data: str, out: str, resume: bool = False, address: str | None = None
) -> dict[str, Any]:
    """Run (or continue) a sweep and write its results; returns the paths and the best trial."""
    cfg = sweep_config_for(effective(cfg), out, resume)
    validate(cfg)
    setup = trial_setup(cfg, data, out, None)  # unknown base keys fail here
    check_data(cfg, data)
    import ray
    from ray import tune

    from core.ray import ensure_ray
    from core.storage import Store, join_uri
    from core.watchdog import free_resources, loop_watchdog
    from training.checkpoints import storage_root
    from tuning.results import write_results

    setup = dataclasses.replace(setup, syncnet=check_expert(cfg))
    path = join_uri(storage_root(out), EXPERIMENT)
    ensure_ray(ray_address(address))
    restoring = tune.Tuner.can_restore(path)
    if restoring and not resume:
        raise BadInput(f"{out} already holds a sweep; pass --resume to continue it or choose another OUT")
    if resume and not restoring:
        log.info("--resume: %s holds no sweep to continue; starting a new one", out)
    saved = cfg  # sizes left to defaults stay so in sweep.yaml: a resumed sweep fits them to its cluster
    cfg = dataclasses.replace(cfg, resources=plan_resources(cfg.resources))
    setup = dataclasses.replace(setup, cpus=cfg.resources.cpus, data_cpus=cfg.resources.data_cpus)
    max_concurrent = concurrency(cfg.resources, ray.cluster_resources(), total_trials(cfg))
    Store(out).write_bytes(SWEEP_FILE, yaml.safe_dump(to_dict(saved), sort_keys=False).encode())
    log.info(
        "tune %s: %d trial(s), %d at once, %s search, %s scheduler%s",
        cfg.target,
        total_trials(cfg),
        max_concurrent,
        cfg.search,
        cfg.scheduler,
        " (resumed)" if restoring else "",
    )
    with (
        tune_env(cfg.state_save_s),
        contextlib.redirect_stdout(sys.stderr),  # Tune prints banners
        loop_watchdog(cfg.stall_seconds, f"tune {cfg.target}", lambda _: free_resources()) as dog,
    ):
        fn = trainable(cfg, dataclasses.replace(setup, progress=dog.board if dog else None))
        if restoring:
            tuner = tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=cfg.resume_errored)
        else:
            tuner = new_tuner(cfg, fn, storage_root(out), max_concurrent)
        grid = tuner.fit()
    return write_results(grid, cfg, setup, out) | {"experiment": path, "resumed": restoring}

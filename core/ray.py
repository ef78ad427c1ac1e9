"""Connecting to Ray the same way from every command: `--address` or a local embedded Ray."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from core.errors import BadInput
from core.malloc import allocator_env

log = logging.getLogger(__name__)

# Environment variables forwarded to Ray workers so they reach the same object store and tools.
FORWARDED_PREFIXES = ("AWS_", "LIPSYNC_", "MLFLOW_")


# Imported by the per-clip code on first use rather than with its module, so that the command line starts
# fast: scipy.signal (landmark smoothing) and librosa.feature.spectral (the AV-offset estimate's band
# energies, scoring's MFCCs; it brings librosa's STFT and numba kernels).
DEFERRED_IMPORTS = ("scipy.signal", "librosa.feature.spectral")


def import_deferred() -> None:
    """Import DEFERRED_IMPORTS now. Actors call it in `__init__`: ~1.5 s of CPU here (librosa's numba kernels
    included) that their first input would otherwise pay, and count as its work."""
    for name in DEFERRED_IMPORTS:
        importlib.import_module(name)


def forwarded_env() -> dict[str, str]:
    """The driver's AWS_*/LIPSYNC_*/MLFLOW_* variables (S3 endpoint, credentials, tool paths)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


# (Ray session and job, forwarded environment) of the Ray that ensure_ray started or joined in this process.
_connected_with: tuple[str, dict[str, str]] | None = None


def _ray_connection() -> str:
    import ray

    context = ray.get_runtime_context()
    return f"{context.get_session_name()}/{context.get_job_id()}"


@contextlib.contextmanager
def scoped_environ(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in os.environ for the block (for what it starts or reads), then put back."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto" for a local `ray start`), or start a local embedded Ray.

    Does nothing when Ray is already initialised in this process (tests, the demo).
    """
    import ray

    global _connected_with
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    env = forwarded_env()
    if address:
        # The job's runtime_env: every worker of this job gets the variables and the allocator settings.
        kwargs["runtime_env"] = {"env_vars": {**env, **allocator_env()}}
        ray.init(address=address, **kwargs)
    else:  # "local": never join a cluster that a `ray start` on this machine left behind
        # Ray's processes are this one's children and inherit its environment: no runtime_env, which
        # would cost every worker a setup_worker.py start and leave Ray's prestarted workers unused.
        with scoped_environ(allocator_env()):
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    _connected_with = (_ray_connection(), env)
    log.info("ray: %s", ray.cluster_resources())


def worker_runtime_env() -> dict[str, Any] | None:
    """The runtime_env that gives a task or actor the driver's forwarded variables; None when not needed.

    Not needed when there are none, or when ensure_ray started or joined this Ray with the same values
    (its workers have them already). A Ray initialised elsewhere (tests, notebooks) or variables set
    since (an S3 endpoint) get them passed explicitly.
    """
    env = forwarded_env()
    if not env or (_connected_with is not None and _connected_with == (_ray_connection(), env)):
        return None
    return {"env_vars": env}


POLL_SECONDS_RANGE = (0.0, 5.0)  # exclusive low, inclusive high: longer would stall small runs


def check_poll_seconds(seconds: float) -> None:
    """BadInput unless `seconds` is a usable `resources.poll_seconds` (any command's config)."""
    low, high = POLL_SECONDS_RANGE
    if not low < seconds <= high:
        raise BadInput(f"resources.poll_seconds must be in ({low:g}, {high:g}], not {seconds}")


@contextlib.contextmanager
def executor_poll_interval(seconds: float | None) -> Iterator[None]:
    """Ray Data's driver loop waits `seconds` (Ray's default: 0.1) for tasks before each scheduling step.

    Each step costs the driver a few milliseconds of Python, so at 0.1 s it keeps ~10 % of a core busy for
    the whole run. Pipelines whose tasks take seconds (video chunks) lose nothing by polling less often.
    Ray 2.60 has no setting for it, so this swaps the module constant for the duration and puts it back;
    None, or a Ray without the constant, leaves Ray's own behaviour.
    """
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError:  # a Ray whose internals moved: keep its behaviour
        state = None
    name = "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"
    saved = getattr(state, name, None)
    if seconds is None or saved is None:
        yield
        return
    setattr(state, name, seconds)
    try:
        yield
    finally:
        setattr(state, name, saved)


WORKER_DIED = "worker_died"
"""Reject reason of an input whose actor was killed on every attempt (OOM, a crash in native code)."""


class AttemptLedger:
    """Ray actor (no CPU): how many times each input of a pool has been started."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Count one more start of input `key`; returns how many there have been."""
        self.started[key] = self.started.get(key, 0) + 1
        return self.started[key]


def bounded(actor: type) -> type:
    """`actor` (a map_batches callable taking one row per call) whose inputs are each tried at most
    `max_attempts` times: an input started that often already (its actor was killed every time, and Ray Data
    restarted it and retried) goes to `actor.given_up(row, attempts)` instead of being tried again. The
    subclass keeps `actor`'s name, which Ray Data names the stage after."""

    class Bounded(actor):  # type: ignore[misc, valid-type]
        def __init__(self, *, ledger: Any, key: str, max_attempts: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ledger, self.key, self.max_attempts = ledger, key, max_attempts

        def __call__(self, batch: dict[str, Any]) -> Any:
            import ray

            row = {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in batch.items()}
            started = ray.get(self.ledger.begin.remote(str(row[self.key])))
            if started > self.max_attempts:
                return self.given_up(row, started - 1)
            return super().__call__(batch)

    Bounded.__name__ = Bounded.__qualname__ = actor.__name__
    return Bounded


def run_on_actor_pool(
    rows: list[dict[str, Any]],
    actor: type,
    constructor_kwargs: dict[str, Any],
    actors: int,
    cpus_per_actor: float,
    max_restarts: int,
    key: str,
    calls_per_actor: int = 1,
    poll_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """The rows a pool of `actor` instances makes of `rows`, one row per call (and per block).

    At most `actors` of them (never more than rows). A killed actor is restarted and its rows in flight
    retried (Ray Data's own fault tolerance); an input whose actor is killed more than `max_restarts` times
    is given up (`bounded`), so one input that kills its worker every time costs its own row, not the run.
    `key` names the column that identifies an input. `calls_per_actor` > 1 runs that many calls at once in
    each actor, in threads: `actor` must be thread-safe. The driver's forwarded environment reaches them.
    """
    import ray

    # Ray 2.60 deprecates actor options in map_batches' ray_remote_args (max_restarts, max_task_retries) and
    # names no replacement; its defaults restart actors and retry their tasks without bound, which this
    # ledger bounds per input instead of per actor.
    ledger = ray.remote(num_cpus=0, max_restarts=0)(AttemptLedger).remote()
    try:
        from core.stage import StageResources, StageSpec, on_ray

        spec = StageSpec(
            bounded(actor),
            {**constructor_kwargs, "ledger": ledger, "key": key, "max_attempts": max_restarts + 1},
            StageResources(
                actors=max(1, min(actors, len(rows))), cpus=cpus_per_actor, calls_per_actor=calls_per_actor
            ),
        )
        ds = on_ray(ray.data.from_items(rows, override_num_blocks=len(rows)), [spec])
        with executor_poll_interval(poll_seconds):
            return list(ds.iter_rows())
    finally:
        ray.kill(ledger)

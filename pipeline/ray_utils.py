"""Connecting to Ray the same way from every command: `--address` or a local embedded Ray."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from lipsync.errors import BadInput
from lipsync.malloc import allocator_env

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


def map_on_actor_pool(
    rows: list[dict[str, Any]],
    actor: type,
    constructor_kwargs: dict[str, Any],
    actors: int,
    cpus_per_actor: float,
    max_restarts: int,
    calls_per_actor: int = 1,
) -> Any:
    """A Ray Dataset of `rows` (one block each) mapped one row per call by a pool of `actor` instances.

    At most `actors` of them (never more than rows); each restarts up to `max_restarts` times if killed
    and its rows in flight are retried on the new one; the driver's forwarded environment reaches them.
    `calls_per_actor` > 1 runs that many calls at once in each actor, in threads: `actor` must be
    thread-safe.
    """
    import ray

    # max_restarts/max_task_retries reach the actors only as `ray_remote_args`, which Ray 2.60 (pinned in
    # pyproject.toml and cluster/) deprecates for removal in 2.64 without a named replacement. Ray Data's
    # own default is unbounded (-1), so dropping them would retry a poison input forever: revisit on upgrade.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            size=max(1, min(actors, len(rows))),
            max_concurrent_calls_per_actor=calls_per_actor if calls_per_actor > 1 else None,
            enable_true_multi_threading=calls_per_actor > 1,
        ),
        num_cpus=cpus_per_actor,
        runtime_env=worker_runtime_env(),
        max_restarts=max_restarts,  # bounded: an input that kills its actor every time fails the run
        max_task_retries=max_restarts,
    )

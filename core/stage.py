"""The stage contract: one shape for every Ray-level step, and two ways to run a chain of them.

A stage is a class whose ``__init__`` does the expensive set-up once per actor (load mediapipe, a model,
open a cache) and whose ``__call__(batch) -> batch`` does the work on a batch of rows. The logic inside is
plain functions on numpy / pyarrow data. A :class:`StageSpec` says how to build the stage and what each of
its actors asks for (:class:`StageResources`).

- :func:`on_ray` chains specs on a Ray Data dataset, each on its own actor pool (the only place the code
  calls ``map_batches`` with an actor pool);
- :func:`run_sequential` chains the same specs in this process, without Ray, for tests and debugging
  (as cosmos-curate's sequential runner does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Row = dict[str, Any]


@dataclass(frozen=True)
class StageResources:
    """What a stage's pool asks for: actors, CPUs and GPUs per actor, rows per call, calls at once."""

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 1
    calls_per_actor: int = 1  # > 1: calls run in threads of one actor (the stage must be thread-safe)


@dataclass(frozen=True)
class StageSpec:
    """A stage class, its constructor arguments and its resources."""

    stage: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: StageResources = field(default_factory=StageResources)

    @property
    def name(self) -> str:
        return self.stage.__name__


def on_ray(ds: Any, specs: Sequence[StageSpec], batch_format: str = "numpy", **options: Any) -> Any:
    """`ds` with every spec applied in order, each on an actor pool of its own (lazy, like Ray Data).

    `options` go to every map_batches (e.g. zero_copy_batch); the driver's forwarded environment
    reaches the actors (core.ray.worker_runtime_env).
    """
    import ray

    from core.ray import worker_runtime_env

    runtime_env = worker_runtime_env()
    for spec in specs:
        res = spec.resources
        extra: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
        if res.gpus:
            extra["num_gpus"] = res.gpus
        ds = ds.map_batches(
            spec.stage,
            fn_constructor_kwargs=spec.kwargs,
            batch_size=res.batch_size,
            batch_format=batch_format,
            compute=ray.data.ActorPoolStrategy(
                size=max(1, res.actors),
                max_concurrent_calls_per_actor=res.calls_per_actor if res.calls_per_actor > 1 else None,
                enable_true_multi_threading=res.calls_per_actor > 1,
            ),
            num_cpus=res.cpus,
            **extra,
            **options,
        )
    return ds


def _to_batch(rows: list[Row], batch_format: str) -> Any:
    if batch_format == "pyarrow":
        import pyarrow as pa

        return pa.Table.from_pylist(rows)
    columns = list(rows[0]) if rows else []
    return {c: np.array([r.get(c) for r in rows], dtype=object) for c in columns}


def _to_rows(batch: Any) -> list[Row]:
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    if isinstance(batch, dict):
        n = len(next(iter(batch.values()))) if batch else 0
        return [{k: _item(v[i]) for k, v in batch.items()} for i in range(n)]
    if isinstance(batch, list):
        return batch
    return [row for part in batch for row in _to_rows(part)]  # a generator of batches


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def run_sequential(
    specs: Sequence[StageSpec],
    rows: Iterable[Row],
    batch_format: str = "numpy",
    build: Callable[[StageSpec], Callable[[Any], Any]] | None = None,
) -> list[Row]:
    """The rows the chain of `specs` makes of `rows`, in this process: each stage is built once (as an
    actor would be) and fed batches of its `batch_size` from the previous stage's output, in order."""
    current = list(rows)
    for spec in specs:
        stage = build(spec) if build else spec.stage(**spec.kwargs)
        size = max(1, spec.resources.batch_size)
        produced: list[Row] = []
        for i in range(0, len(current), size):
            produced.extend(_to_rows(stage(_to_batch(current[i : i + size], batch_format))))
        current = produced
    return current

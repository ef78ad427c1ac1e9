"""Search spaces: the YAML `space:` mapping of a sweep → a validated Ray Tune param_space.

Each entry names a tunable parameter (`PARAMS`) and gives either a fixed value or one distribution:

    lr: {loguniform: [1.0e-5, 1.0e-3]}
    batch_size: {choice: [32, 64]}
    steps: {randint: [2000, 8000]}          # both ends included
    min_offset_confidence: {uniform: [0.0, 0.5]}
    max_abs_offset: {grid: [null, 1, 3]}    # every value, in every sample (random search only)
    min_face_size: 64                       # fixed
    augment_strength: {uniform: [0.0, 1.5]} # base: {augment: {enabled: true}}
    balance_strength: {grid: [0.0, 1.0]}    # corpus mix .. base's `balance:` mix (e.g. {language: uniform})

Data-selection thresholds act on clips.parquet columns when a trial picks its training clips, so they
are tuned without re-preprocessing. A trial's values are written into the training config dataclass
(`apply`), the same one `lipsync train` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.errors import BadInput

TARGETS = ("syncnet", "wav2lip")
METRICS = {
    "syncnet": {"val_loss": "min", "val_accuracy": "max"},
    "wav2lip": {"val_loss": "min", "val_l1": "min", "val_sync": "min"},
}
"""Metrics a sweep may optimise, and their direction."""
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Param:
    """A tunable parameter: where it goes in the training config and which values make sense."""

    path: str  # dotted field of SyncNetConfig / Wav2LipConfig
    kind: type  # int or float
    low: float  # smallest allowed value
    high: float = math.inf  # largest allowed value
    low_open: bool = False  # low itself is not allowed (lr > 0)
    nullable: bool = False  # None is allowed (no filter)
    targets: tuple[str, ...] = TARGETS


PARAMS: dict[str, Param] = {
    "lr": Param("lr", float, 0.0, low_open=True),
    "batch_size": Param("batch_size", int, 1),
    "steps": Param("steps", int, 1),
    "sync_weight": Param("sync_weight", float, 0.0, 1.0, targets=("wav2lip",)),
    "disc_weight": Param("disc_weight", float, 0.0, 1.0, targets=("wav2lip",)),
    "disc_lr": Param("disc_lr", float, 0.0, low_open=True, targets=("wav2lip",)),
    "max_abs_offset": Param("data.max_abs_offset", int, 0, nullable=True),
    "min_offset_confidence": Param("data.min_offset_confidence", float, 0.0, 1.0),
    "min_face_size": Param("data.min_face_size", float, 0.0),
    "augment_strength": Param("augment.strength", float, 0.0),  # with base `augment: {enabled: true}`
    "balance_strength": Param("balance_strength", float, 0.0, 1.0),  # with a base `balance:` mix
}


def known_params(target: str) -> list[str]:
    """Names tunable for `target`."""
    return [name for name, p in PARAMS.items() if target in p.targets]


# ---------------------------------------------------------------- validation


def normalise(space: dict[str, Any]) -> dict[str, Any]:
    """Numbers that YAML 1.1 reads as strings (`1e-4`, `1.0e6`) as floats; everything else unchanged."""

    def number(v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        if isinstance(v, list):
            return [number(x) for x in v]
        if isinstance(v, dict):
            return {k: number(x) for k, x in v.items()}
        return v

    return {name: number(spec) for name, spec in space.items()}


def validate_space(target: str, space: dict[str, Any], search: str = "random") -> None:
    """BadInput naming the first unknown parameter, malformed distribution or out-of-range value."""
    if target not in TARGETS:
        raise BadInput(f"target {target!r} is not one of {', '.join(TARGETS)}")
    if not isinstance(space, dict) or not space:
        raise BadInput("the search space is empty: give at least one parameter under `space:`")
    known = known_params(target)
    for name, spec in space.items():
        if name not in known:
            raise BadInput(
                f"unknown parameter {name!r} in the {target} search space; known: {', '.join(known)}"
            )
        values = spec_values(name, spec)
        for value in values:
            check_value(name, value)
        if isinstance(spec, dict) and "grid" in spec and search == "optuna":
            raise BadInput(f"parameter {name!r}: grid is not supported with search: optuna (use choice)")
    if target == "wav2lip":
        check_weights(space)


def spec_values(name: str, spec: Any) -> list[Any]:
    """The values a spec can take at its ends (bounds) or in full (choice/grid); BadInput if malformed."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise BadInput(f"parameter {name!r}: expected a value or one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise BadInput(f"parameter {name!r}: {kind} needs a non-empty list")
    if kind in ("choice", "grid"):
        return list(args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise BadInput(f"parameter {name!r}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high and not (kind == "randint" and low == high):
        raise BadInput(f"parameter {name!r}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise BadInput(f"parameter {name!r}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise BadInput(f"parameter {name!r}: randint needs integer bounds, got {args!r}")
    return [low, high]


def check_value(name: str, value: Any) -> None:
    """BadInput when `value` is not allowed for parameter `name`."""
    p = PARAMS[name]
    if value is None:
        if p.nullable:
            return
        raise BadInput(f"parameter {name!r} cannot be null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"parameter {name!r}: {value!r} is not a number")
    if p.kind is int and not float(value).is_integer():
        raise BadInput(f"parameter {name!r} takes integers, not {value!r}")
    too_low = value <= p.low if p.low_open else value < p.low
    if too_low or value > p.high:
        low = f"> {p.low}" if p.low_open else f">= {p.low}"
        high = "" if math.isinf(p.high) else f" and <= {p.high}"
        raise BadInput(f"parameter {name!r} must be {low}{high}, not {value!r}")


def check_weights(space: dict[str, Any]) -> None:
    """Wav2Lip's L1 weight is 1 - sync - disc: the largest sync and disc weights must leave it positive."""
    top = {n: max((v for v in spec_values(n, space[n]) if v is not None), default=0.0) for n in space}
    sync, disc = top.get("sync_weight", 0.03), top.get("disc_weight", 0.07)
    if sync + disc >= 1.0:
        raise BadInput(f"sync_weight + disc_weight can reach {sync + disc:g}; they must stay below 1")


# ---------------------------------------------------------------- Ray Tune


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune param_space of a validated space (flat: parameter name → domain or value)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            out[name] = spec
            continue
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[name] = tune.loguniform(*args)
        elif kind == "uniform":
            out[name] = tune.uniform(*args)
        elif kind == "randint":
            out[name] = tune.randint(int(args[0]), int(args[1]) + 1)
        elif kind == "choice":
            out[name] = tune.choice(args)
        else:
            out[name] = tune.grid_search(args)
    return out


def max_value(space: dict[str, Any], name: str, default: int) -> int:
    """The largest value parameter `name` can take (`default` when it is not in the space)."""
    if name not in space:
        return default
    values = [v for v in spec_values(name, space[name]) if v is not None]
    return int(max(values)) if values else default


def grid_size(space: dict[str, Any]) -> int:
    """Trials per sample: the product of the grid lengths (1 without grids)."""
    n = 1
    for spec in space.values():
        if isinstance(spec, dict) and "grid" in spec:
            n *= len(spec["grid"])
    return n


def apply(train_cfg: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a training config dict with a trial's parameter values at their dotted paths."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in train_cfg.items()}
    for name, value in params.items():
        if name not in PARAMS:
            continue
        p = PARAMS[name]
        value = p.kind(value) if value is not None else None
        *parents, leaf = p.path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "syncnet": {
        "lr": {"loguniform": [1.0e-5, 1.0e-3]},
        "batch_size": {"choice": [32, 64]},
        "max_abs_offset": {"choice": [None, 1, 3]},
        "min_offset_confidence": {"uniform": [0.0, 0.5]},
        "min_face_size": {"choice": [0, 64, 96]},
    },
    "wav2lip": {
        "lr": {"loguniform": [3.0e-5, 3.0e-4]},
        "batch_size": {"choice": [8, 16]},
        "sync_weight": {"uniform": [0.01, 0.05]},
        "disc_weight": {"uniform": [0.03, 0.1]},
        "max_abs_offset": {"choice": [None, 1, 3]},
        "min_offset_confidence": {"uniform": [0.0, 0.5]},
        "min_face_size": {"choice": [0, 64, 96]},
    },
}
"""The space of a sweep config that gives none (configs/tune/<target>.yaml spell the same)."""

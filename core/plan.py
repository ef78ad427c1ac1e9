"""One resource plan per Ray command: what the job will ask the cluster for, checked before anything starts.

A job is a list of `Ask`s (training workers, Ray Data tasks, actor pools, trials), each a count of units
with the CPUs, GPUs and custom resources of one unit. `fit` holds them against the cluster: the sum against
what it has (`ray.cluster_resources()`, or what an autoscaling cluster may grow to) and each unit against
its largest node. A job that cannot run is BadInput (exit 2) with one line saying what to change, e.g.
"2 workers × 1.0 CPU + data tasks 1.0 CPU need 3 CPUs; this cluster has 2: use --cpus-per-worker 0.5 or
--workers 1". Sizes the user left to defaults are fitted to the cluster instead of refused: CPU amounts are
lowered (all by the same factor) until the job fits, and pools without a size get as many units as fit;
the plan says on stderr what it chose.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import BadInput

log = logging.getLogger(__name__)

MIN_CPUS = 0.05
"""The smallest CPU amount a fitted unit gets; below it the job is refused as too large for the cluster."""
POOL_SHARE = 0.95
"""Share of the cluster's CPUs a pool sized by the plan takes (the driver and Ray's own work keep the rest)."""
EPSILON = 1e-9


@dataclass(frozen=True)
class Ask:
    """`count` units of `what`, each taking `cpus` CPUs, `gpus` GPUs and `resources` (custom)."""

    what: str  # "workers", "data tasks", "preprocessing actors"
    count: int
    cpus: float  # per unit; with `fit_cpus`, the most the plan gives it
    gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    count_flag: str | None = None  # how the user sets `count` ("--workers"), for the refusal's advice
    cpus_flag: str | None = None  # how the user sets `cpus` ("--cpus-per-worker")
    gpus_advice: str | None = None  # how the user asks for no GPUs ("leave out --gpu")
    fit_cpus: bool = False  # the user left `cpus` to its default: the plan may lower it
    fit_count: int | None = None  # the user left `count` to its default: as many as fit, at most this

    def total(self, kind: str) -> float:
        return self.count * self.per_unit(kind)

    def per_unit(self, kind: str) -> float:
        if kind == "CPU":
            return self.cpus
        if kind == "GPU":
            return self.gpus
        return float(self.resources.get(kind, 0.0))

    def describe(self, kind: str = "CPU") -> str:
        """'2 workers × 1.0 CPU', '1 worker × 1.0 CPU', 'data tasks 1.0 CPU'."""
        amount = f"{_amount(self.per_unit(kind))} {kind}"
        if self.count == 1 and self.what.endswith("tasks"):
            return f"{self.what} {amount}"
        what = self.what.removesuffix("s") if self.count == 1 else self.what
        return f"{self.count} {what} × {amount}"


@dataclass(frozen=True)
class Cluster:
    """What the cluster has now, what it may grow to, and its largest node (by resource)."""

    now: Mapping[str, float]
    limit: Mapping[str, float]  # >= now; larger on an autoscaling cluster
    largest_node: Mapping[str, float]

    @classmethod
    def current(cls) -> Cluster:
        """The connected Ray cluster (ray.init must have run)."""
        import ray

        now = {k: float(v) for k, v in ray.cluster_resources().items()}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        groups = _autoscaling_groups()
        largest: dict[str, float] = {}
        for resources in [*nodes, *groups]:
            for k, v in resources.items():
                largest[k] = max(largest.get(k, 0.0), float(v))
        limit = dict(now)
        for k, v in (_autoscaling_limit() or {}).items():
            limit[k] = max(limit.get(k, 0.0), float(v))
        return cls(now=now, limit=limit, largest_node=largest)

    def has(self, kind: str) -> str:
        """'2', or '0 and may grow to 8' on an autoscaling cluster."""
        now, limit = self.now.get(kind, 0.0), self.limit.get(kind, 0.0)
        return f"{now:g}" if limit <= now + EPSILON else f"{now:g} and may grow to {limit:g}"

    def for_fitting(self, kind: str) -> float:
        """What sizes left to defaults are fitted to: the cluster as it is, or what it may grow to when it has
        none now (an autoscaling group scaled to zero)."""
        now = self.now.get(kind, 0.0)
        return now if now > EPSILON else self.limit.get(kind, 0.0)


def _autoscaling_groups() -> list[dict[str, float]]:
    """Per-node resources of the autoscaler's node types (empty without an autoscaler)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a Ray without the call, or none: no autoscaling known
        return []
    if not config:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def _autoscaling_limit() -> dict[str, float] | None:
    """What an autoscaling cluster may grow to, by resource (None without an autoscaler)."""
    try:
        import ray._private.state

        return ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a Ray without the call: no autoscaling known
        return None


def _amount(value: float) -> str:
    """1.0, 0.5, 0.66: at least one decimal, at most two."""
    text = f"{value:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _units(value: float, kind: str) -> str:
    """'3 CPUs', '1 GPU'."""
    return f"{value:g} {kind}" + ("" if value == 1 else "s")


def _floor2(value: float) -> float:
    return math.floor(value * 100 + EPSILON) / 100


def _kinds(asks: list[Ask]) -> list[str]:
    kinds = {"CPU"} | ({"GPU"} if any(a.gpus for a in asks) else set())
    kinds |= {k for a in asks for k in a.resources}
    return ["CPU", *sorted(kinds - {"CPU"})]


def _advice(asks: list[Ask], kind: str, have: float) -> list[str]:
    """What a user could change, one ask at a time: its per-unit amount, or its count."""
    advice = []
    for i, ask in enumerate(asks):
        if not ask.per_unit(kind):
            continue
        room = have - sum(a.total(kind) for j, a in enumerate(asks) if j != i)
        if kind == "CPU" and ask.cpus_flag and ask.count and (each := _floor2(room / ask.count)) >= MIN_CPUS:
            advice.append(f"{ask.cpus_flag} {_amount(each)}")
        if ask.count_flag and 1 <= (n := math.floor(room / ask.per_unit(kind) + EPSILON)) < ask.count:
            advice.append(f"{ask.count_flag} {n}")
    return advice[:2]


def refusal(asks: list[Ask], kind: str, cluster: Cluster) -> BadInput:
    """'2 workers × 1.0 CPU + data tasks 1.0 CPU need 3 CPUs; this cluster has 2: use ... or ...'."""
    used = [a for a in asks if a.per_unit(kind)]
    need = sum(a.total(kind) for a in used)
    text = f"{' + '.join(a.describe(kind) for a in used)} need {_units(need, kind)}; this cluster has {cluster.has(kind)}"
    advice = [f"use {' or '.join(_advice(used, kind, cluster.limit.get(kind, 0.0)))}"]
    if kind == "GPU":
        advice += sorted({a.gpus_advice for a in used if a.gpus_advice})
    advice = [a for a in advice if a != "use "]
    return BadInput(text + (f": {', or '.join(advice)}" if advice else ""))


def _check_units(asks: list[Ask], cluster: Cluster) -> list[Ask]:
    """Each unit must fit on one node: fitted CPU amounts are capped there, others refused."""
    out = []
    for ask in asks:
        for kind in _kinds([ask]):
            largest = cluster.largest_node.get(kind, 0.0)
            if ask.per_unit(kind) <= largest + EPSILON or (kind == "CPU" and ask.fit_cpus):
                continue
            flag = ask.cpus_flag if kind == "CPU" else None
            advice = f": use {flag} {_amount(_floor2(largest))}" if flag and largest >= MIN_CPUS else ""
            raise BadInput(
                f"one of the {ask.what} needs {_units(ask.per_unit(kind), kind)}; the largest node has "
                f"{largest:g}{advice}"
            )
        if ask.fit_cpus:
            ask = dataclasses.replace(ask, cpus=min(ask.cpus, cluster.largest_node.get("CPU", 0.0)))
        out.append(ask)
    return out


def _fit_counts(asks: list[Ask], cluster: Cluster) -> list[Ask]:
    """Pools left to default sizes get as many units as POOL_SHARE of the CPUs the others leave holds."""
    out = []
    for ask in asks:
        if ask.fit_count is not None and ask.cpus > 0:
            others = sum(a.total("CPU") for a in asks if a is not ask)
            room = POOL_SHARE * cluster.for_fitting("CPU") - others
            ask = dataclasses.replace(
                ask, count=max(1, min(ask.fit_count, math.floor(room / ask.cpus + EPSILON)))
            )
        out.append(ask)
    return out


def _fit_cpus(asks: list[Ask], cluster: Cluster) -> list[Ask]:
    """Lower the CPUs of the units left to defaults (one factor for all) so the job's CPUs fit."""
    have = cluster.for_fitting("CPU")
    fixed = sum(a.total("CPU") for a in asks if not a.fit_cpus)
    flexible = sum(a.total("CPU") for a in asks if a.fit_cpus)
    if fixed + flexible <= have + EPSILON or not flexible:
        return asks
    factor = (have - fixed) / flexible
    fitted = [dataclasses.replace(a, cpus=_floor2(a.cpus * factor)) if a.fit_cpus else a for a in asks]
    if factor <= 0 or any(a.fit_cpus and a.cpus < MIN_CPUS for a in fitted):
        raise refusal(asks, "CPU", cluster)
    return fitted


def _check_totals(asks: list[Ask], cluster: Cluster, kinds: list[str]) -> None:
    for kind in kinds:
        if sum(a.total(kind) for a in asks) > cluster.limit.get(kind, 0.0) + EPSILON:
            raise refusal(asks, kind, cluster)


def fit(asks: list[Ask], cluster: Cluster, command: str) -> list[Ask]:
    """The asks with defaults fitted to `cluster`; BadInput naming what to change when the job cannot run.

    Logs the plan (what each part takes, of what the cluster has) on stderr.
    """
    _check_totals(asks, cluster, [k for k in _kinds(asks) if k != "CPU"])  # GPUs, custom: nothing to fit
    asks = _check_units(asks, cluster)
    asks = _fit_cpus(_fit_counts(asks, cluster), cluster)
    _check_totals(asks, cluster, ["CPU"])
    log.info("%s", describe(asks, cluster, command))
    return asks


def describe(asks: list[Ask], cluster: Cluster, command: str) -> str:
    """One line: 'train syncnet plan: 2 workers × 0.66 CPU + data tasks 0.66 CPU = 1.98 of 2 CPUs (chosen
    for the defaults: --cpus-per-worker 0.66, data_cpus_per_task 0.66)'."""
    parts = []
    for kind in _kinds(asks):
        used = [a for a in asks if a.per_unit(kind)]
        total = sum(a.total(kind) for a in used)
        parts.append(
            f"{' + '.join(a.describe(kind) for a in used) or 'nothing'} = {total:g} of {cluster.has(kind)} {kind}s"
        )
    chosen = [f"{a.cpus_flag} {_amount(a.cpus)}" for a in asks if a.fit_cpus and a.cpus_flag]
    chosen += [f"{a.count_flag} {a.count}" for a in asks if a.fit_count is not None and a.count_flag]
    fitted = f" (chosen for the defaults: {', '.join(chosen)})" if chosen else ""
    return f"{command} plan: {'; '.join(parts)}{fitted}"


def plan(asks: list[Ask], command: str) -> list[Ask]:
    """`fit` against the connected Ray cluster."""
    return fit(asks, Cluster.current(), command)

"""Progress watchdogs: a long command that stops making progress fails, naming the stage that stalled and the
resources it waited for, instead of waiting forever.

- Ray Data pipelines (preprocess, score, generate, the training data): Ray Data's own no-progress guard
  (`DataContext.execution_no_progress_timeout_s`) ends a run in which no block moves for the command's
  `stall_seconds`; `data_stall_guard` turns its error into `Stalled`, described from the last state of
  each operator (`StallReport`, an execution callback).
- Training loops (train, tune): the workers beat on a `ProgressBoard` actor at every step; a
  `LoopWatchdog` thread in the driver stops the run when no beat came for `stall_seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core.errors import Stalled

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 1.0
"""How often StallReport records the operators' state (each record costs a few attribute reads)."""


def _amounts(args: dict[str, Any]) -> str:
    """'0.9 CPU', '1 GPU + 0.5 CPU': what one task or actor of an operator asks for."""
    parts = [
        f"{args[key]:g} {kind}" for key, kind in (("num_cpus", "CPU"), ("num_gpus", "GPU")) if args.get(key)
    ]
    parts += [f"{amount:g} {name}" for name, amount in (args.get("resources") or {}).items()]
    return " + ".join(parts) or "no resources"


@dataclass
class OperatorState:
    """What an operator was doing at the last snapshot."""

    name: str
    active_tasks: int = 0
    finished_tasks: int = 0
    queued_blocks: int = 0
    actors_running: int = 0
    actors_pending: int = 0
    asks: str = ""
    is_actor_pool: bool = False

    def waiting(self) -> bool:
        return self.actors_pending > 0

    def describe(self) -> str:
        what = f"{self.active_tasks} task(s) running, {self.finished_tasks} finished, {self.queued_blocks} queued"
        if self.is_actor_pool:
            what += f"; its actors: {self.actors_running} running, {self.actors_pending} waiting to start"
        return (
            f"stage {self.name} ({what}; each {'actor' if self.is_actor_pool else 'task'} asks {self.asks})"
        )


@dataclass
class Snapshot:
    """The operators still running and Ray Data's resource use at one scheduling step."""

    operators: list[OperatorState] = field(default_factory=list)
    usage: str = ""

    def stalled(self) -> OperatorState | None:
        """The stage the run waits on: the first waiting for actors, else the first with work in it."""
        for test in (OperatorState.waiting, lambda op: op.active_tasks > 0, lambda op: op.queued_blocks > 0):
            found = next((op for op in self.operators if test(op)), None)
            if found is not None:
                return found
        return self.operators[0] if self.operators else None


def _operator_state(op: Any, state: Any) -> OperatorState:
    out = OperatorState(op.name)
    with contextlib.suppress(Exception):  # Ray internals: describe what can be read
        out.active_tasks = int(op.num_active_tasks())
        out.finished_tasks = int(op.metrics.num_tasks_finished)
        out.queued_blocks = int(state.total_enqueued_input_blocks())
        out.asks = _amounts(dict(getattr(op, "_ray_remote_args", {}) or {}))
        if hasattr(op, "get_actor_info") and type(op).__name__.startswith("ActorPool"):
            info = op.get_actor_info()
            out.is_actor_pool = True
            out.actors_running, out.actors_pending = int(info.running), int(info.pending + info.restarting)
    return out


def _usage(executor: Any) -> str:
    """'Ray Data holds 1.8 of 2 CPUs, waits for 0.9 more'."""
    with contextlib.suppress(Exception):
        manager = executor._resource_manager
        running, pending = manager.get_global_running_usage(), manager.get_global_pending_usage()
        limits = manager.get_global_limits()
        text = f"Ray Data holds {running.cpu:g} of {limits.cpu:g} CPUs"
        if running.gpu or pending.gpu:
            text += f" and {running.gpu:g} of {limits.gpu:g} GPUs"
        if pending.cpu or pending.gpu:
            more = [f"{pending.cpu:g} CPU"] if pending.cpu else []
            more += [f"{pending.gpu:g} GPU"] if pending.gpu else []
            text += f", waits for {' + '.join(more)} more"
        return text
    return ""


def _execution_callback_base() -> type:
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    return ExecutionCallback


def _pool_actors(op: Any) -> list[Any]:
    """The actors of an actor-pool operator, running and pending (Ray internals: none when unreadable)."""
    with contextlib.suppress(Exception):
        pool = op._actor_pool
        return [*pool._running_actors.keys(), *pool._pending_actors.values()]
    return []


class StallReport(_execution_callback_base()):  # type: ignore[misc]
    """Ray Data execution callback: keeps the operators' state, and when the run times out puts a description
    of the stalled stage on Ray Data's no-progress error (as `lipsync_stall`) and kills the pools' actors:
    Ray Data only lets go of them, and one stuck in its input would hold its CPUs until that returns.

    It holds handles to the pools' actors only while the execution runs: a handle kept after it would keep
    the actor and its CPUs alive until the executor is garbage-collected (it sits in a reference cycle), and
    a training run started next in the same process waited for those CPUs forever.
    """

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.taken_at = 0.0
        self.actors: list[Any] = []

    def on_execution_step(self, executor: Any) -> None:
        now = time.monotonic()
        if now - self.taken_at < SNAPSHOT_EVERY_S:
            return
        self.taken_at = now
        topology = getattr(executor, "_topology", None) or {}
        operators = [
            _operator_state(op, state)
            for op, state in topology.items()
            if type(op).__name__ != "InputDataBuffer" and not op.has_completed()
        ]
        self.snapshot = Snapshot(operators, _usage(executor))
        self.actors = [actor for op in topology for actor in _pool_actors(op)]

    def after_execution_succeeds(self, executor: Any) -> None:
        self.actors = []

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        import ray
        from ray.data.exceptions import ExecutionTimeoutError

        actors, self.actors = self.actors, []
        if isinstance(error, ExecutionTimeoutError):
            stage = self.snapshot.stalled()
            parts = [stage.describe() if stage else "no stage running", self.snapshot.usage]
            error.lipsync_stall = "; ".join(p for p in parts if p)  # type: ignore[attr-defined]
            for actor in actors:
                with contextlib.suppress(Exception):  # gone already
                    ray.kill(actor)


@contextlib.contextmanager
def data_stall_guard(seconds: float, setting: str) -> Iterator[None]:
    """Ray Data pipelines made in this block fail after `seconds` (0: never) in which no block moved, as
    Stalled naming the stage that stalled and what it asks for; `setting` is the config key to raise."""
    import ray.data
    from ray.data.exceptions import ExecutionTimeoutError

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_no_progress_timeout_s, list(ctx.custom_execution_callback_classes))
    ctx.execution_no_progress_timeout_s = seconds if seconds > 0 else -1
    ctx.custom_execution_callback_classes = [*saved[1], StallReport]
    try:
        yield
    except ExecutionTimeoutError as exc:
        where = getattr(exc, "lipsync_stall", "") or str(exc).splitlines()[0]
        raise Stalled(
            f"no progress for {seconds:g} s: {where} (raise {setting} if it is only slow)"
        ) from None
    finally:
        ctx.execution_no_progress_timeout_s, ctx.custom_execution_callback_classes = saved


# ---------------------------------------------------------------- training loops


class ProgressBoard:
    """Ray actor (no CPU) the training workers beat on: the loop's phase and step, and when they last changed."""

    def __init__(self) -> None:
        self.phase, self.step, self.at = "starting the workers", 0, time.monotonic()

    def beat(self, phase: str, step: int) -> None:
        self.phase, self.step, self.at = phase, step, time.monotonic()

    def read(self) -> tuple[str, int, float]:
        """(phase, step, seconds since the last beat)."""
        return self.phase, self.step, time.monotonic() - self.at


class Beats:
    """A worker's side of the board: `beat(phase, step)` is fire-and-forget, and nothing without a board."""

    def __init__(self, board: Any | None, enabled: bool = True) -> None:
        self.board = board if enabled else None

    def __call__(self, phase: str, step: int) -> None:
        if self.board is not None:
            self.board.beat.remote(phase, step)


def new_board() -> Any:
    """A ProgressBoard actor of this job (ends with it)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


ESCALATE_AFTER_S = 30.0
"""A stopped run that has not ended this long after `stop` gets it again (up to STOPS times in all): Ray
Train's graceful abort can wait for good on a worker group still being placed; its third SIGINT exits."""
STOPS = 3


class LoopWatchdog(threading.Thread):
    """Driver thread: when the board has had no beat for `seconds`, records why (`message`) and calls
    `stop`, again every ESCALATE_AFTER_S while the run goes on (STOPS times at most); `describe(phase)`
    adds what that phase waits for."""

    def __init__(
        self, board: Any, seconds: float, stop: Callable[[], None], describe: Callable[[str], str], what: str
    ) -> None:
        super().__init__(daemon=True, name="lipsync-watchdog")
        self.board, self.seconds, self.stop_run, self.describe, self.what = (
            board,
            seconds,
            stop,
            describe,
            what,
        )
        self.finished = threading.Event()
        self.message: str | None = None

    def run(self) -> None:
        import ray

        poll = min(5.0, max(0.2, self.seconds / 10))
        while not self.finished.wait(poll):
            with contextlib.suppress(Exception):  # a board gone with its job: nothing to watch
                phase, step, age = ray.get(self.board.read.remote(), timeout=max(poll, 10.0))
                if age >= self.seconds:
                    detail = self.describe(phase)
                    self.message = f"{self.what} made no progress for {age:.0f} s: {phase} at step {step}" + (
                        f"; {detail}" if detail else ""
                    )
                    break
        for _ in range(STOPS if self.message else 0):
            self.stop_run()
            if self.finished.wait(ESCALATE_AFTER_S):
                return

    @property
    def fired(self) -> bool:
        return self.message is not None


def interrupt_main() -> None:
    """SIGINT to this process: Ray Train's handler in the driver's main thread aborts the run gracefully."""
    os.kill(os.getpid(), signal.SIGINT)


def free_resources() -> str:
    """'the cluster has 0.2 of 2 CPUs free'."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{free.get(k, 0.0):g} of {total[k]:g} {k}s" for k in ("CPU", "GPU") if total.get(k)]
    return f"the cluster has {' and '.join(parts)} free" if parts else ""


@contextlib.contextmanager
def loop_watchdog(
    seconds: float, what: str, describe: Callable[[str], str], stop: Callable[[], None] | None = None
) -> Iterator[Any]:
    """A LoopWatchdog (yielded, None with `seconds` 0) watching its ProgressBoard (`.board`) while the block
    runs; the block fails with Stalled when no beat came for `seconds`. `stop` ends the run (default:
    SIGINT to the main thread, which Ray Train's fit turns into an abort)."""
    import ray

    if seconds <= 0:
        yield None
        return
    if stop is None and threading.current_thread() is not threading.main_thread():
        log.warning("%s: no progress watchdog off the main thread", what)
        yield None
        return
    board = new_board()
    dog = LoopWatchdog(board, seconds, stop or interrupt_main, describe, what)
    handler = signal.getsignal(signal.SIGINT) if stop is None else None  # Ray Train's fit replaces it
    dog.start()
    try:
        yield dog
    except BaseException:  # the stop may surface as KeyboardInterrupt, or SystemExit from Ray Train's abort
        if dog.fired:
            raise Stalled(f"{dog.message} (raise stall_seconds if it is only slow)") from None
        raise
    finally:
        dog.finished.set()
        dog.join()
        ray.kill(board)
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    if dog.fired:
        raise Stalled(f"{dog.message} (raise stall_seconds if it is only slow)")

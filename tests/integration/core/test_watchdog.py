"""Progress watchdogs: a pipeline or training loop that stops making progress fails with Stalled, naming the
stage that stalled and what it waits for (core.watchdog), on the session's 2-CPU Ray.

Each test stalls a real run on purpose: a Ray Data stage that sleeps, a preprocessing input that blocks its
probe (a FIFO nobody writes to), a training loop and a sweep whose CPUs another job holds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import Stalled


def test_a_ray_data_stage_that_sleeps_fails_naming_it(ray_session) -> None:  # noqa: ANN001
    from core.watchdog import data_stall_guard

    class Sleeper:
        """A Ray Data stage that never finishes its input (defined here: workers cannot import tests)."""

        def __call__(self, batch: dict) -> dict:
            time.sleep(3600)
            return batch

    started = time.monotonic()
    with pytest.raises(Stalled) as stalled, data_stall_guard(3, "resources.stall_seconds"):
        ds = ray_session.data.from_items([{"x": i} for i in range(4)], override_num_blocks=4)
        ds = ds.map_batches(
            Sleeper, batch_size=1, num_cpus=0.25, compute=ray_session.data.ActorPoolStrategy(size=1)
        )
        list(ds.iter_rows())
    message = str(stalled.value)
    assert re.match(
        r"no progress for 3 s: stage MapBatches\(Sleeper\) \([12] task\(s\) running, 0 finished", message
    )
    assert "each actor asks 0.25 CPU" in message and "Ray Data holds 0.25 of" in message
    assert message.endswith("(raise resources.stall_seconds if it is only slow)")
    assert time.monotonic() - started < 60
    assert ray_session.data.DataContext.get_current().execution_no_progress_timeout_s != 3  # put back
    assert released(ray_session, 2.0)  # the stuck actor was killed, not left holding its CPU


def test_a_finished_pool_under_the_guard_lets_go_of_its_cpus_without_the_garbage_collector(
    ray_session,  # noqa: ANN001
) -> None:
    """The guard's callback held the pool's actor handles after the run; with the executor in a reference
    cycle, the actors kept their CPUs until Python's garbage collector ran, and a training run started next
    in the same process (the demo, a test) waited for those CPUs forever."""
    from core.ray import run_on_actor_pool
    from core.watchdog import data_stall_guard

    class Echo:
        """A pool stage that returns its input (defined here: workers cannot import tests)."""

        def __init__(self, **_: object) -> None:
            pass

        def __call__(self, batch: dict) -> dict:
            return batch

    free = ray_session.available_resources().get("CPU")
    rows = [{"input_id": str(i)} for i in range(4)]
    gc.disable()  # what a process that allocates little does between two runs
    try:
        with data_stall_guard(60, "resources.stall_seconds"):
            out = run_on_actor_pool(
                rows, Echo, {}, actors=2, cpus_per_actor=0.9, max_restarts=0, key="input_id"
            )
        assert len(out) == 4
        assert released(ray_session, free, within_s=15)
    finally:
        gc.enable()


@contextlib.contextmanager
def fifo_input(corpus: Path) -> Iterator[Path]:
    """A '.mp4' that is a FIFO nobody writes to: whatever opens it to read waits; released at the end."""
    fifo = corpus / "en" / "hung" / "clip.mp4"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    try:
        yield fifo
    finally:  # a reader still waiting (an ffprobe the killed actor left) gets end-of-file and exits
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_preprocessing_an_input_that_never_reads_fails_naming_the_stage(
    ray_session,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    """`lipsync preprocess` exits 1 with one line naming the stage, instead of waiting on the input."""
    from lipsync.cli import main

    corpus = tmp_path / "corpus"
    config = tmp_path / "stall.yaml"
    config.write_text("resources:\n  stall_seconds: 20\n")
    args = ["preprocess", str(corpus), str(tmp_path / "out"), "--workers", "1", "--cpus-per-worker", "0.5"]
    with fifo_input(corpus):
        code = main([*args, "--config", str(config), "--json"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("lipsync: stalled: ")]
    assert code == 1 and len(lines) == 1, captured.err[-3000:]
    message = json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert message.startswith("stalled: no progress for 20 s: stage MapBatches(ClipPreprocessor)"), message
    assert "each actor asks 0.5 CPU" in message and "resources.stall_seconds" in message


@pytest.fixture
def busy_cluster(ray_session):  # noqa: ANN001, ANN201
    """Another job holding 1.5 of the session's 2 CPUs (the plans count totals, so theirs still pass)."""

    @ray_session.remote(num_cpus=1.5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_session.get(holder.ready.remote())
    assert released(ray_session, 0.5), "an earlier test left CPUs taken"  # else the phase would differ
    yield
    ray_session.kill(holder)


@pytest.mark.slow
def test_a_training_loop_waiting_for_windows_fails_naming_what_it_waits_for(
    preprocessed_corpus: Path,
    busy_cluster,
    ray_session,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """The worker gets the last 0.5 CPU; its window tasks (0.5 CPU each) never start."""
    from training.data import WindowConfig
    from training.syncnet_job import SyncNetConfig, run

    cfg = SyncNetConfig(
        steps=2, batch_size=2, workers=1, cpus_per_worker=0.5, data_cpus_per_task=0.5, eval_clips=0,
        shuffle_buffer=4, windows=WindowConfig(windows_per_clip=2), stall_seconds=40,
    )  # fmt: skip
    with pytest.raises(Stalled) as stalled:
        run(cfg, str(preprocessed_corpus), str(tmp_path / "out"))
    message = str(stalled.value)
    assert message.startswith("train syncnet made no progress for "), message
    assert "waiting for a batch of windows at step 0" in message
    assert "the Ray Data window tasks ask 0.5 CPU each; the cluster has 0 of 2 CPUs free" in message
    assert released(ray_session, 0.5)  # the run's worker is gone


def released(ray, cpus: float, within_s: float = 60.0) -> bool:  # noqa: ANN001
    """Whether the cluster's free CPUs come back to `cpus` (actors end asynchronously) within `within_s`."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU") != cpus:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.slow
def test_a_sweep_whose_trials_cannot_start_fails_as_stalled(
    preprocessed_corpus: Path, busy_cluster, tmp_path: Path
) -> None:  # noqa: ANN001
    from core.config import from_dict
    from tuning.sweep import SweepConfig, run

    cfg = from_dict(
        SweepConfig,
        {"trials": 1, "steps": 2, "resources": {"cpus": 1.0}, "stall_seconds": 20, "space": {"lr": 1e-4}},
    )
    with pytest.raises(Stalled) as stalled:
        run(cfg, str(preprocessed_corpus), str(tmp_path / "out"))
    message = str(stalled.value)
    assert message.startswith("tune syncnet made no progress for "), message
    assert "starting the workers at step 0; the cluster has 0.5 of 2 CPUs free" in message


def test_a_stop_that_does_not_end_the_run_is_repeated(ray_session, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Ray Train's graceful abort can wait for good on workers still being placed; the watchdog stops again
    (its third SIGINT makes Ray Train exit) instead of leaving the command hanging."""
    import core.watchdog as watchdog

    monkeypatch.setattr(watchdog, "ESCALATE_AFTER_S", 0.5)
    stops: list[float] = []
    stalled = r"^loop made no progress for \d+ s: starting the workers at step 0"
    record = lambda: stops.append(time.monotonic())  # noqa: E731
    with (
        pytest.raises(Stalled, match=stalled),
        watchdog.loop_watchdog(1.0, "loop", lambda _: "", stop=record),
    ):
        deadline = time.monotonic() + 30
        while len(stops) < watchdog.STOPS and time.monotonic() < deadline:
            time.sleep(0.1)  # a run that ignores its stops
    assert len(stops) == watchdog.STOPS and stops[-1] - stops[0] >= 0.9

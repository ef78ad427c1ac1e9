"""Tuning: search spaces and pool sizing (plain functions), then tiny SyncNet sweeps on Ray Tune.

The sweeps use the real SyncNet at img_size 96, batch 2 and 1-6 steps per trial. ASHA's early stop is
made deterministic with two learning rates of 1e6: those trials diverge at their first step and start
only after the two sane trials have reached every rung (two trials run at once on the 2-CPU session Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from core.config import from_dict, load_config
from core.errors import BadInput
from lipsync.cli import main
from training.streams import BatchStream, shard_rows
from training.syncnet_job import SyncNetConfig
from tuning.space import apply, max_value, normalise, to_tune, validate_space
from tuning.sweep import SweepConfig, TrialResources, concurrency, effective, run, validate
from tuning.trial import TrialSetup, trial_config, trial_splits

REPO = Path(__file__).resolve().parents[3]
TINY_BASE = {
    "batch_size": 2,
    "eval_clips": 1,
    "eval_windows_per_clip": 1,
    "shuffle_buffer": 4,
    "windows": {"windows_per_clip": 2},
}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    """Run `lipsync ... --json` in-process; (exit code, last stdout JSON line, stderr)."""
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------- plain functions


def test_space_validation_names_the_unknown_parameter_and_the_known_ones() -> None:
    with pytest.raises(BadInput, match=r"unknown parameter 'learning_rate'.*known: lr, batch_size, steps"):
        validate_space("syncnet", {"learning_rate": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(BadInput, match="unknown parameter 'sync_weight' in the syncnet search space"):
        validate_space("syncnet", {"sync_weight": 0.03})
    with pytest.raises(BadInput, match="loguniform needs low > 0"):
        validate_space("syncnet", {"lr": {"loguniform": [0, 1e-3]}})
    with pytest.raises(BadInput, match="'min_offset_confidence' must be >= 0.0 and <= 1.0"):
        validate_space("syncnet", {"min_offset_confidence": {"uniform": [0.0, 1.5]}})
    with pytest.raises(BadInput, match="grid is not supported with search: optuna"):
        validate_space("syncnet", {"lr": {"grid": [1e-4, 1e-3]}}, search="optuna")
    with pytest.raises(BadInput, match="sync_weight \\+ disc_weight"):
        validate_space("wav2lip", {"sync_weight": {"uniform": [0.1, 0.6]}, "disc_weight": 0.5})
    with pytest.raises(BadInput, match="expected a value or one of"):
        validate_space("syncnet", {"lr": {"normal": [0, 1]}})


def test_space_becomes_a_tune_space_and_a_training_config() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = normalise({"lr": {"loguniform": ["1e-5", "1.0e-3"]}, "steps": {"randint": [2, 5]}})
    assert space["lr"] == {"loguniform": [1e-5, 1e-3]}  # YAML 1.1 reads 1e-5 as a string
    tuned = to_tune(space | {"max_abs_offset": {"choice": [None, 2]}, "min_face_size": 64})
    assert isinstance(tuned["lr"], Float) and isinstance(tuned["steps"], Integer)
    assert isinstance(tuned["max_abs_offset"], Categorical) and tuned["min_face_size"] == 64
    assert max_value(space, "steps", 100) == 5 and max_value(space, "batch_size", 64) == 64
    cfg = from_dict(SyncNetConfig, apply({}, {"lr": 3e-4, "max_abs_offset": 2, "min_face_size": 64}))
    assert cfg.lr == 3e-4 and cfg.data.max_abs_offset == 2 and cfg.data.min_face_size == 64.0


def test_shipped_sweep_configs_are_valid() -> None:
    for target in ("syncnet", "wav2lip"):
        cfg = effective(load_config(SweepConfig, REPO / "configs" / "tune" / f"{target}.yaml"))
        validate(cfg)
        assert cfg.target == target and "lr" in cfg.space


def test_concurrency_comes_from_the_pool() -> None:
    two_cpus = {"CPU": 2.0}
    assert concurrency(TrialResources(cpus=1), two_cpus, trials=8) == 2
    assert concurrency(TrialResources(cpus=0.5), two_cpus, trials=3) == 3  # never more than the trials
    assert concurrency(TrialResources(cpus=0.5, max_concurrent=2), two_cpus, trials=8) == 2
    gpus = {"CPU": 16.0, "GPU": 2.0}
    assert concurrency(TrialResources(cpus=2, gpus=0.5), gpus, trials=8) == 4  # fractional GPUs share
    assert concurrency(TrialResources(workers=2, cpus=2, gpus=1, data_cpus=1), gpus, trials=8) == 1
    with pytest.raises(
        BadInput, match=r"a trial needs 4 GPU\(s\) \(2 worker\(s\) x 2\) but the cluster has 2"
    ):
        concurrency(TrialResources(workers=2, gpus=2), gpus, trials=1)
    with pytest.raises(BadInput, match="needs 3 CPU"):
        concurrency(TrialResources(cpus=3), two_cpus, trials=1)


def test_batch_stream_continues_where_a_restarted_trial_left_off(preprocessed_corpus: Path) -> None:
    setup = TrialSetup("syncnet", str(preprocessed_corpus), "unused", TINY_BASE, 4, 1, 1)
    cfg = trial_config(setup, {"lr": 1e-4})
    train, val = trial_splits(setup, cfg)
    assert train.clip_ids and val.clip_ids
    rows = shard_rows(train)
    stream = BatchStream(rows, cfg, "syncnet")
    first = [next(stream) for _ in range(7)]  # 3 clips x 2 windows x 2 samples / batch 2: past epoch 0
    assert stream.position() == {"epoch": 1, "index": 1}
    again = BatchStream(rows, cfg, "syncnet", epoch=0, index=4)
    for expected in first[4:]:
        got = next(again)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert first[0]["faces"].shape == (2, 15, 48, 96) and first[0]["faces"].dtype == torch.uint8


# ---------------------------------------------------------------- bad input fails fast


def test_unknown_parameter_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "bad.yaml", {"space": {"lr": 1e-4, "dropout": {"uniform": [0, 0.5]}}})
    code, out, err = cli(capsys, "tune", str(tmp_path / "data"), str(tmp_path / "o"), "--config", str(config))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown parameter 'dropout'" in out["error"] and "known: lr, batch_size" in out["error"]


def test_more_gpus_per_trial_than_the_cluster_exits_2_fast(
    preprocessed_corpus: Path,
    ray_session,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    doc = {"resources": {"cpus": 1, "gpus": 2}, "base": TINY_BASE, "space": {"lr": 1e-4}}
    config = write_yaml(tmp_path / "gpus.yaml", doc)
    start = time.monotonic()
    code, out, err = cli(
        capsys, "tune", str(preprocessed_corpus), str(tmp_path / "o"), "--config", str(config)
    )
    assert code == 2 and time.monotonic() - start < 60
    assert out["error"] == "1 trial × 2.0 GPU need 2 GPUs; this cluster has 0"
    assert not (tmp_path / "o" / "sweep").exists()


# ---------------------------------------------------------------- an ASHA sweep on the session Ray


@pytest.fixture(scope="module")
def asha_sweep(preprocessed_corpus: Path, ray_session, tmp_path_factory) -> tuple[Path, dict]:  # noqa: ANN001
    """4 trials of at most 4 steps: lr 1e-4 and 3e-4, then two of 1e6 that diverge."""
    out = tmp_path_factory.mktemp("asha_sweep")
    cfg = from_dict(
        SweepConfig,
        {
            "trials": 1,  # one sample of the 4-point grid
            "steps": 4,
            "grace_period": 1,
            "reduction_factor": 2,
            "report_every": 1,
            "checkpoint_every": 2,
            "resources": {"cpus": 1},
            "base": TINY_BASE,
            "space": {
                "lr": {"grid": [1e-4, 3e-4, 1e6, 3e6]},
                "min_face_size": {"choice": [0, 100]},
                "max_abs_offset": {"choice": [None, 1]},
            },
        },
    )
    return out, run(cfg, str(preprocessed_corpus), str(out))


def test_asha_stops_trials_before_their_last_step(asha_sweep: tuple[Path, dict]) -> None:
    out, result = asha_sweep
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 4 and result["trials"] == str(out / "trials.parquet")
    assert set(table["status"]) <= {"TERMINATED", "EARLY_STOPPED"}
    stopped = table[table["status"] == "EARLY_STOPPED"]
    assert len(stopped) >= 1 and (stopped["steps_done"] < stopped["max_steps"]).all()
    huge = table[table["param_lr"] >= 1e6]
    assert (huge["status"] == "EARLY_STOPPED").all() and huge["diverged"].all()
    assert (huge["steps_done"] == 1).all()  # stopped at the first rung, not left to run 4 steps
    sane = table[table["param_lr"] < 1]
    assert not sane["diverged"].any() and sane["final_val_loss"].between(0, 10).all()
    assert (table["runs"] == 1).all() and {"best_val_loss", "time_s", "config", "checkpoint"} <= set(table)
    assert (out / "metric_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_yaml_is_the_lowest_loss_and_trains(
    asha_sweep: tuple[Path, dict],
    preprocessed_corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, result = asha_sweep
    table = pd.read_parquet(out / "trials.parquet")
    best = table.loc[table["final_val_loss"].idxmin()]
    assert result["best_trial"] == best["trial_id"] and result["best_val_loss"] == best["final_val_loss"]
    params = json.loads(best["config"])
    cfg = load_config(SyncNetConfig, out / "best.yaml")
    assert cfg.lr == params["lr"] and cfg.steps == best["steps_done"] and cfg.batch_size == 2
    assert cfg.data.min_face_size == params["min_face_size"]
    assert cfg.data.max_abs_offset == params["max_abs_offset"]
    assert cfg.checkpoint_every == SyncNetConfig.checkpoint_every  # the base's cadence, not the sweep's
    code, trained, _ = cli(
        capsys, "train", "syncnet", str(preprocessed_corpus), str(tmp_path / "t"),
        "--config", str(out / "best.yaml"), "--steps", "1",
    )  # fmt: skip
    assert code == 0 and trained["step"] == 1 and "val_loss" in trained["metrics"]


# ---------------------------------------------------------------- the CLI, killed and resumed


def session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (a driver started with start_new_session and everything it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL the session's process group, then any of its processes that moved to a group of their own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tune_cli(corpus: Path, out: Path, config: Path, *extra: str) -> subprocess.Popen:
    """`lipsync tune` in a session of its own, with its own embedded Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "lipsync.cli", "tune", str(corpus), str(out), "--config", str(config)]
    return subprocess.Popen(
        [*cmd, "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


class Lines(threading.Thread):
    """Collects a process's stderr lines as they come."""

    def __init__(self, stream) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)


def trials_seen(text: str) -> tuple[set[str], set[str]]:
    """(trials the driver saw finish, trials it saw report but not finish) in its stderr."""
    finished = set(re.findall(r"trial (\S+) finished at step \d+", text))
    return finished, set(re.findall(r"trial (\S+) step \d+:", text)) - finished


def wait_until_one_finished_and_one_running(proc: subprocess.Popen, lines: Lines, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        finished, running = trials_seen("".join(lines.lines))
        if finished and running:
            return
        time.sleep(0.2)
    raise AssertionError("no trial finished in time:\n" + "".join(lines.lines[-30:]))


def wait_until_state_saved_after(sweep: Path, moment: float, timeout: float) -> None:
    """Until Tune has written the sweep state (what --resume reads) to storage after `moment`: a trial
    that finished after the last save is rightly resumed from its final checkpoint, so the kill waits for
    a save (every `state_save_s`, copied to storage in a background thread; a loaded 2-core machine
    delayed it past a fixed 3 s wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saved = [p.stat().st_mtime for p in sweep.glob("experiment_state*.json")]
        if saved and max(saved) > moment:
            return
        time.sleep(0.2)
    raise AssertionError(f"{sweep}: no sweep state saved in {timeout} s")


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(
    preprocessed_corpus: Path, tmp_path: Path
) -> None:
    doc = {
        "scheduler": "fifo",
        "trials": 1,
        "report_every": 1,
        "checkpoint_every": 1,
        "state_save_s": 1,
        "resources": {"cpus": 1},
        "base": TINY_BASE,
        "space": {"lr": 1e-4, "steps": {"grid": [2, 6, 2, 2]}},  # trial 1 runs on after trial 0 is done
    }
    config, out = write_yaml(tmp_path / "sweep.yaml", doc), tmp_path / "out"
    first = tune_cli(preprocessed_corpus, out, config)
    lines = Lines(first.stderr)
    lines.start()
    try:
        wait_until_one_finished_and_one_running(first, lines, timeout=600)
        seen_at = time.time()
        wait_until_state_saved_after(out / "sweep", seen_at + 0.5, timeout=60)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
    finally:
        kill_session(first.pid)
        first.wait()
    finished, running = trials_seen("".join(lines.lines))
    time.sleep(1)
    kill_session(first.pid)  # workers the raylet was starting as it died
    second = tune_cli(preprocessed_corpus, out, config, "--resume")
    try:
        stdout, stderr = second.communicate(timeout=900)
    finally:
        kill_session(second.pid)
    assert second.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["resumed"] is True
    table = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert len(table) == 4 and (table["status"] == "TERMINATED").all()
    assert (table["steps_done"] == table["max_steps"]).all()
    seen = "".join(lines.lines[-40:])  # what the first driver printed, for a failure's message
    for trial in finished:  # not run again
        starts = list(table.loc[trial, "start_steps"])
        assert table.loc[trial, "runs"] == 1 and starts == [0], (trial, starts, seen, stderr[-3000:])
    for trial in running:  # continued from its checkpoint
        starts = list(table.loc[trial, "start_steps"])
        assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0, (trial, starts)
    assert (table["runs"] == 1).sum() >= len(table) - len(running)
    assert not session_pids(first.pid) and not session_pids(second.pid)


# ---------------------------------------------------------------- trials that are Ray Train runs


@pytest.mark.slow
def test_two_worker_trials_run_as_ray_train_runs(
    preprocessed_corpus: Path,
    ray_session,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """resources.workers > 1: each trial is a TorchTrainer run (2 workers x 0.4 CPU) reporting to Tune."""
    cfg = from_dict(
        SweepConfig,
        {
            "scheduler": "fifo",
            "trials": 1,
            "steps": 2,
            "report_every": 1,
            "checkpoint_every": 1,
            # 2 x 0.4 CPU leaves a whole CPU free: Ray Data's ListFiles task of the trial needs 1 CPU
            "resources": {"workers": 2, "cpus": 0.4, "data_cpus": 0.4},
            "base": TINY_BASE | {"batch_size": 4},
            "space": {"lr": 1e-4},
        },
    )
    result = run(cfg, str(preprocessed_corpus), str(tmp_path / "out"))
    table = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(table) == 1 and table["status"].iloc[0] == "TERMINATED", table.to_dict("records")
    assert table["steps_done"].iloc[0] == 2 and 0 < table["final_val_loss"].iloc[0] < 10
    assert result["best_trial"] == table["trial_id"].iloc[0]
    runs = list((tmp_path / "out" / "train_runs").iterdir())
    assert len(runs) == 1 and any(runs[0].rglob("model.pt"))  # the Ray Train run's own checkpoint

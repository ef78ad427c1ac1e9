"""Resource plans: every Ray command is checked against the cluster before it starts (core.plan).

Plain functions first (asks held against a described cluster), then each command asked for more than the
test suite's 2-CPU Ray has: it exits 2 within 30 s with the one-line plan, before any pool or trial starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core.errors import BadInput
from core.plan import Ask, Cluster, fit
from lipsync.cli import main

TWO_CPUS = Cluster(now={"CPU": 2.0}, limit={"CPU": 2.0}, largest_node={"CPU": 2.0})
REFUSED_WITHIN_S = 30.0


def workers(count: int, cpus: float, fitted: bool = False, gpus: float = 0.0) -> Ask:
    return Ask(
        "workers", count, cpus, gpus, count_flag="--workers", cpus_flag="--cpus-per-worker",
        gpus_advice="leave out --gpu", fit_cpus=fitted,
    )  # fmt: skip


def data_tasks(cpus: float, fitted: bool = False) -> Ask:
    return Ask("data tasks", 1, cpus, cpus_flag="data_cpus_per_task", fit_cpus=fitted)


# ---------------------------------------------------------------- plain functions


def test_a_job_that_cannot_run_is_refused_with_what_to_change() -> None:
    with pytest.raises(BadInput) as refused:
        fit([workers(2, 1.0), data_tasks(1.0)], TWO_CPUS, "train syncnet")
    assert str(refused.value) == (
        "2 workers × 1.0 CPU + data tasks 1.0 CPU need 3 CPUs; this cluster has 2: "
        "use --cpus-per-worker 0.5 or --workers 1"
    )


def test_sizes_left_to_defaults_are_fitted_and_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="core.plan"):
        fitted = fit([workers(2, 1.0, fitted=True), data_tasks(1.0, fitted=True)], TWO_CPUS, "train syncnet")
    assert [a.cpus for a in fitted] == [0.66, 0.66]  # one factor for both, floored to 0.01
    assert sum(a.total("CPU") for a in fitted) <= 2.0
    assert "2 workers × 0.66 CPU + data tasks 0.66 CPU = 1.98 of 2 CPUs" in caplog.text
    assert "--cpus-per-worker 0.66" in caplog.text
    one = fit([workers(1, 1.0, fitted=True), data_tasks(1.0, fitted=True)], TWO_CPUS, "train syncnet")
    assert [a.cpus for a in one] == [1.0, 1.0]  # what fits is left as it is
    only_data = fit([workers(2, 0.5), data_tasks(1.0, fitted=True)], TWO_CPUS, "train syncnet")
    assert [a.cpus for a in only_data] == [0.5, 1.0]


def test_explicit_sizes_are_never_changed_and_too_many_units_are_refused() -> None:
    with pytest.raises(BadInput, match=r"need 3 CPUs; this cluster has 2: use --cpus-per-worker 0\.5"):
        fit([workers(2, 1.0), data_tasks(1.0, fitted=True)], TWO_CPUS, "train syncnet")
    with pytest.raises(BadInput, match=r"64 workers × 1\.0 CPU .* need 65 CPUs.*use --workers 1$"):
        fit([workers(64, 1.0, fitted=True), data_tasks(1.0, fitted=True)], TWO_CPUS, "train")


def test_gpus_custom_resources_and_nodes() -> None:
    with pytest.raises(BadInput) as refused:
        fit([workers(2, 1.0, gpus=1.0)], TWO_CPUS, "train syncnet")
    assert str(refused.value) == "2 workers × 1.0 GPU need 2 GPUs; this cluster has 0: leave out --gpu"
    two_nodes = Cluster(now={"CPU": 4.0}, limit={"CPU": 4.0}, largest_node={"CPU": 2.0})
    with pytest.raises(
        BadInput, match=r"one of the workers needs 3 CPUs; the largest node has 2: use --cpus"
    ):
        fit([workers(1, 3.0)], two_nodes, "train")
    assert fit([workers(1, 3.0, fitted=True)], two_nodes, "train")[0].cpus == 2.0  # one node's worth
    custom = Ask("workers", 2, 0.5, resources={"accelerator": 1.0})
    with pytest.raises(BadInput, match="need 2 accelerators; this cluster has 0"):
        fit([custom], TWO_CPUS, "train")


def test_an_autoscaling_cluster_is_held_against_what_it_may_grow_to() -> None:
    scaling = Cluster(now={"CPU": 2.0}, limit={"CPU": 2.0, "GPU": 4.0}, largest_node={"CPU": 2.0, "GPU": 1.0})
    assert fit([workers(2, 0.5, gpus=1.0)], scaling, "train")[0].gpus == 1.0
    with pytest.raises(BadInput, match="need 8 GPUs; this cluster has 0 and may grow to 4"):
        fit([workers(8, 0.2, gpus=1.0)], scaling, "train")


def test_a_pool_left_to_defaults_takes_what_the_cluster_holds() -> None:
    pool = Ask(
        "actors", 10, 0.9, count_flag="--workers", cpus_flag="--cpus-per-worker", fit_cpus=True, fit_count=10
    )
    assert fit([pool], TWO_CPUS, "preprocess")[0].count == 2  # 0.95 x 2 CPUs / 0.9
    big = Cluster(now={"CPU": 32.0}, limit={"CPU": 32.0}, largest_node={"CPU": 8.0})
    assert fit([pool], big, "preprocess")[0].count == 10  # never more than the inputs
    one = Cluster(now={"CPU": 0.5}, limit={"CPU": 0.5}, largest_node={"CPU": 0.5})
    (small,) = fit([pool], one, "preprocess")
    assert small.count == 1 and small.cpus == 0.5


# ---------------------------------------------------------------- each command, on the session's 2-CPU Ray


def cli_refusal(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, float]:
    """Run `lipsync ... --json` in-process, expecting exit 2: (the error line, seconds taken)."""
    start = time.monotonic()
    code = main([*args, "--json"])
    took = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    assert len([line for line in captured.err.splitlines() if line.startswith("lipsync: error")]) == 1
    return json.loads(captured.out.strip().splitlines()[-1])["error"], took


def test_train_asked_for_more_than_the_cluster_exits_2_fast(
    preprocessed_corpus: Path, ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    error, took = cli_refusal(
        capsys,
        "train",
        "syncnet",
        str(preprocessed_corpus),
        str(out),
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
    )
    assert error == (
        "2 workers × 1.0 CPU + data tasks 1.0 CPU need 3 CPUs; this cluster has 2: "
        "use --cpus-per-worker 0.5 or --workers 1"
    )
    assert took < REFUSED_WITHIN_S and not (out / "syncnet").exists()


def test_train_with_two_workers_left_to_default_cpus_is_fitted(
    preprocessed_corpus: Path, ray_session
) -> None:  # noqa: ANN001
    from training.driver import plan_resources
    from training.syncnet_job import SyncNetConfig

    cfg = plan_resources(SyncNetConfig(workers=2), "train syncnet")
    assert (cfg.cpus_per_worker, cfg.data_cpus_per_task) == (0.66, 0.66)
    cfg = plan_resources(SyncNetConfig(workers=1), "train syncnet")
    assert (cfg.cpus_per_worker, cfg.data_cpus_per_task) == (1.0, 1.0)  # the defaults fit as they are


@pytest.mark.slow
def test_train_two_workers_left_to_default_cpus_runs_to_its_steps(
    preprocessed_corpus: Path, tmp_path: Path
) -> None:
    """`train syncnet DATA OUT --workers 2` on 2 CPUs: once it waited forever (both CPUs to the workers, none
    for the window tasks); now the plan fits the sizes and the run reaches its steps. Run as the user runs
    it, in its own process and its own embedded Ray, so actors other tests leave on the session's Ray
    cannot take the CPUs the plan counts on."""
    small = {"batch_size": 2, "eval_clips": 1, "eval_windows_per_clip": 1, "shuffle_buffer": 4,
             "windows": {"windows_per_clip": 2}, "width": 0.25}  # fmt: skip
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(small))
    args = ["train", "syncnet", str(preprocessed_corpus), str(tmp_path / "out"), "--workers", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", *args, "--steps", "2", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
    assert "train syncnet plan: 2 workers × 0.66 CPU + data tasks 0.66 CPU = 1.98 of 2 CPUs" in done.stderr


def test_tune_asked_for_more_than_the_cluster_exits_2_fast(
    preprocessed_corpus: Path, ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"resources": {"workers": 2, "cpus": 1.0}, "space": {"lr": 1e-4}}))
    out = tmp_path / "out"
    error, took = cli_refusal(capsys, "tune", str(preprocessed_corpus), str(out), "--config", str(config))
    assert error.startswith(
        "2 trial workers × 1.0 CPU + trial data tasks 0.5 CPU + 1 trial driver × 0.01 CPU"
    )
    assert "need 2.51 CPUs; this cluster has 2: use resources.cpus 0.74 or resources.workers 1" in error
    assert took < REFUSED_WITHIN_S and not (out / "sweep").exists()


@pytest.fixture(scope="module")
def wav2lip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wav2lip checkpoint with random weights (a refused run never loads it)."""
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    directory = tmp_path_factory.mktemp("wav2lip")
    return Path(save_checkpoint(str(directory), checkpoint_payload(build_model("wav2lip"), "wav2lip", 96, 0)))


def test_generate_asked_for_more_than_the_cluster_exits_2_fast(
    synth_corpus: Path,
    wav2lip_checkpoint: Path,
    ray_session,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clips = pd.read_csv(synth_corpus / "manifest.csv")
    video = synth_corpus / clips["video"].iloc[0]
    (tmp_path / "pairs.csv").write_text(f"video,audio\n{video},{video}\n")
    (tmp_path / "generate.yaml").write_text("model:\n  device: cpu\n  actors: 2\n  cpus_per_actor: 1.0\n")
    out = tmp_path / "out"
    args = ["generate", str(tmp_path / "pairs.csv"), str(out), "--checkpoint", str(wav2lip_checkpoint)]
    error, took = cli_refusal(capsys, *args, "--config", str(tmp_path / "generate.yaml"))
    assert error.startswith(
        "2 model actors × 1.0 CPU + 1 prepare actor × 0.5 CPU + 1 composite actor × 0.25 CPU "
        "+ 1 finalize actor × 0.25 CPU need 3 CPUs; this cluster has 2: use model.cpus_per_actor"
    )
    assert took < REFUSED_WITHIN_S and not list((out / "videos").glob("*.mp4"))


def test_preprocess_and_score_asked_for_more_than_the_cluster_exit_2_fast(
    synth_corpus: Path, ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pre"
    args = ["preprocess", str(synth_corpus), str(out), "--workers", "3", "--cpus-per-worker", "0.9"]
    error, took = cli_refusal(capsys, *args)
    assert error == (
        "3 preprocessing actors × 0.9 CPU need 2.7 CPUs; this cluster has 2: "
        "use --cpus-per-worker 0.66 or --workers 2"
    )
    assert took < REFUSED_WITHIN_S and not (out / "shards").exists()
    error, took = cli_refusal(
        capsys,
        "score",
        str(synth_corpus),
        str(tmp_path / "score"),
        "--workers",
        "3",
        "--cpus-per-worker",
        "0.9",
    )
    assert error.startswith("3 scoring actors × 0.9 CPU need 2.7 CPUs") and took < REFUSED_WITHIN_S

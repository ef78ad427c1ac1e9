"""A real local cluster: `ray start --head`, `ray job submit --working-dir . -- lipsync preprocess`, SUCCEEDED."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
TRANSIENT_SUBMIT_ERRORS = ("Failed to connect", "No available agent", "try again later")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(tmp_path: Path):
    """A head node started with `ray start --head --block` in its own process group; killed afterwards."""
    # Every port on a free one: another Ray on this machine (the session fixture's, a user's) already holds
    # the defaults, e.g. the dashboard agent's 52365; without it the head has "No available agent" for jobs.
    gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics = (free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    # Ray 2.60 requires token authentication on local clusters: head, CLI and job driver share one token.
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
            f"--temp-dir={temp_dir}", "--object-store-memory=300000000", "--disable-usage-stats",
        ],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        else:
            pytest.fail("the Ray job server did not come up within 300 s")
        yield address, env
    finally:
        _kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """The head and everything it started (one process group). `ray start --block` takes ~35 s to stop on
    SIGTERM; the cluster and its temp dir are thrown away, so a few seconds of grace, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_submit_preprocess_job(local_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    address, env = local_cluster
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    subprocess.run(
        [str(BIN / "lipsync"), "synth", str(corpus), "--languages", "en,es", "--speakers", "1", "--clips-per-speaker", "1", "--seconds", "2"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
        "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
        "--", "lipsync", "preprocess", str(corpus), str(out), "--address", "auto", "--workers", "1", "--json",
    ]  # fmt: skip
    # Right after start-up the job server may refuse connections or have no agent registered yet
    # ("No available agent to submit job, please try again later"): both are retried for 4 minutes.
    deadline = time.time() + 240
    while True:
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        transient = any(m in submit.stderr for m in TRANSIENT_SUBMIT_ERRORS)
        if submit.returncode == 0 or not transient or time.time() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr + submit.stdout
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(
        0
    )  # output has ANSI colours
    status = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", address, job_id],
            env=env,
            capture_output=True,
            text=True,
        )
        status = (done.stdout + done.stderr).lower()  # the CLI logs "Job '...' succeeded" on stderr
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert "succeeded" in status, status + logs[-3000:]
    result = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert result["accepted_clips"] == 2
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    assert {c["language"] for c in clips} == {"en", "es"}
    assert all((out / c["shard"]).is_file() for c in clips)

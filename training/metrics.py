"""Training metrics: the MLflow run of a command (opened by the driver, written by rank 0), the lines
printed on the worker's stderr, and the driver's progress display read back from MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from core.config import config_hash, to_dict
from core.storage import is_remote
from training.checkpoints import storage_root

if TYPE_CHECKING:
    from training.config import TrainConfig

EXPERIMENT = "lipsync-train"


def tracking_uri(cfg: TrainConfig, out: str) -> str:
    """The MLflow tracking URI: the configured one, else a file store under OUT (or /tmp for remote OUT)."""
    if cfg.mlflow_tracking_uri:
        return cfg.mlflow_tracking_uri
    root = os.path.join(tempfile.gettempdir(), "lipsync-mlruns") if is_remote(out) else storage_root(out)
    return "file://" + os.path.join(root, "mlruns")


def mlflow_client(uri: str) -> Any:
    """An MlflowClient; file stores are allowed (MLflow 3 keeps them in maintenance mode)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_mlflow_run(uri: str, out: str, job: str, cfg: TrainConfig) -> str:
    """The MLflow run of (OUT, job): reused when the command is re-run, created (with params) otherwise."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    out_tag = storage_root(out)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`lipsync.out` = '{out_tag}' and tags.`lipsync.job` = '{job}'"
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        exp_id, run_name=f"{job}-{config_hash(cfg)}", tags={"lipsync.out": out_tag, "lipsync.job": job}
    )
    for key, value in flatten(to_dict(cfg)).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLog:
    """Rank 0's metric sink: MLflow (the run opened by the driver) and the worker's stderr."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = enabled
        self.client = mlflow_client(uri) if enabled and uri and run_id else None
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        print(f"step {step}: " + " ".join(f"{k}={shown(v)}" for k, v in metrics.items()), file=sys.stderr)
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)


def shown(value: float) -> str:
    """A metric as the progress lines print it: 4 decimals, or 3 significant digits below 0.001 (a learning
    rate)."""
    return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


class Follower(threading.Thread):
    """Driver-side progress: prints the run's newest metrics from MLflow while training runs."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.client, self.run_id, self.every_s = mlflow_client(uri), run_id, every_s
        self.stop = threading.Event()
        self.last_step: float | None = None

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # progress display only; never fail the run
                metrics = self.client.get_run(self.run_id).data.metrics
                if metrics.get("step") != self.last_step and "step" in metrics:
                    self.last_step = metrics["step"]
                    line = " ".join(f"{k}={shown(v)}" for k, v in sorted(metrics.items()) if k != "step")
                    print(f"train step {int(metrics['step'])}: {line}", file=sys.stderr)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of an MLflow run, by step."""
    client = mlflow_client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

"""Checkpoints of a training run: where they live (OUT/<job>/checkpoint_<step>/), writing a recipe's
payloads (model.pt in the shared format, other payloads beside it), finding the one to resume from, and
the command's summary of the last one.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from core.errors import BadInput
from core.storage import is_remote
from models.checkpoint import CHECKPOINT_PREFIX, MODEL_FILE, read_payload, save_checkpoint

log = logging.getLogger(__name__)


def storage_root(out: str) -> str:
    """A path as workers and Ray Train want it: URIs as they are, local paths absolute."""
    return out.rstrip("/") if is_remote(out) else os.path.abspath(out)


@dataclass
class Resume:
    """What a worker starts from: payloads by file name (model.pt, ...) and the step they reached."""

    payloads: dict[str, dict[str, Any]]
    step: int
    source: str

    @property
    def train_state(self) -> dict[str, Any]:
        return self.payloads[MODEL_FILE].get("train_state", {})


def checkpoint_dir_name(step: int) -> str:
    """checkpoint_00001000: sortable, and `models.checkpoint.resolve` reads the step from it."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def read_checkpoint_dir(directory: str) -> dict[str, dict[str, Any]]:
    """Every *.pt payload of a checkpoint directory, by file name."""
    fs, path = fsspec.core.url_to_fs(directory)
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith(".pt"))
    return {n: read_payload(posixpath.join(directory.rstrip("/"), n))[0] for n in names}


def checkpoint_dirs(out: str, name: str) -> list[str]:
    """Checkpoint directories under OUT/<name> holding a model.pt, newest first."""
    root = posixpath.join(storage_root(out), name)
    fs, path = fsspec.core.url_to_fs(root)
    found = fs.glob(posixpath.join(path, f"{CHECKPOINT_PREFIX}*", MODEL_FILE))
    dirs = sorted((posixpath.dirname(p) for p in found), key=posixpath.basename, reverse=True)
    return [f"{root.split('://')[0]}://{d}" if "://" in root else d for d in dirs]


def latest_checkpoint(out: str, name: str) -> tuple[str, int] | None:
    """(directory, step) of the newest readable checkpoint under OUT/<name>, if any."""
    for directory in checkpoint_dirs(out, name):
        try:
            return directory, int(read_payload(posixpath.join(directory, MODEL_FILE))[0]["step"])
        except BadInput as exc:  # a checkpoint cut short by a crash: fall back to the one before
            log.warning("skipping %s: %s", directory, exc)
    return None


def find_resume(out: str, name: str) -> Resume | None:
    """On a worker: Ray Train's checkpoint after a restart, else the newest readable one under OUT/<name>
    (the command was re-run, or a crash came between writing a checkpoint and registering it)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as directory:
            payloads = read_checkpoint_dir(directory)
        return Resume(payloads, int(payloads[MODEL_FILE]["step"]), ckpt.path)
    for directory in checkpoint_dirs(out, name):
        try:
            payloads = read_checkpoint_dir(directory)
        except BadInput as exc:
            log.warning("skipping %s: %s", directory, exc)
            continue
        return Resume(payloads, int(payloads[MODEL_FILE]["step"]), directory)
    return None


def write_payloads(directory: str, payloads: dict[str, dict[str, Any]]) -> None:
    """model.pt in the shared checkpoint format, other payloads (disc.pt) beside it."""
    for name, payload in payloads.items():
        if name == MODEL_FILE:
            save_checkpoint(directory, payload)
        else:
            torch.save(payload, os.path.join(directory, name))


def report_checkpoint(
    step: int, payloads: dict[str, dict[str, Any]], metrics: dict[str, float], rank: int
) -> None:
    """Rank 0 writes the payloads into a Ray Train checkpoint named by step; every rank reports."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write_payloads(tmp, payloads)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(
            {**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step)
        )


def finished(out: str, name: str, steps: int) -> tuple[str, int] | None:
    """The final checkpoint when a run under OUT already reached `steps` (re-running does no more)."""
    latest = latest_checkpoint(out, name)
    return latest if latest and latest[1] >= steps else None


def summary(directory: str, step: int, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The command's result: {checkpoint, step, metrics, ...}."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    return {"checkpoint": directory, "step": step, "metrics": clean, **extra}


def checkpoint_summary(directory: str, **extra: Any) -> dict[str, Any]:
    """`summary` of a checkpoint directory from its model.pt."""
    payload = read_payload(posixpath.join(directory, MODEL_FILE))[0]
    return summary(directory, int(payload["step"]), payload.get("metrics", {}), **extra)

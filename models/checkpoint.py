"""The checkpoint format that training writes and generation/scoring load by path alone.

A checkpoint is a directory (Ray Train's unit) holding `model.pt`: a torch-saved dict with
`format` (this module's version), `kind` ("syncnet" | "wav2lip" | "disc"), `img_size`, `width` (the
channel multiplier; absent in older files: 1.0), `state_dict`,
`optimizer` (or None), `step`, `config` (the training config as a plain dict), `metrics`, `code_version`.
`load_model` accepts the directory, the `model.pt` file itself, or a training OUT directory (its newest
checkpoint), local or any fsspec URI.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch import nn

from core.config import code_version
from core.errors import BadInput
from models.registry import build_model

FORMAT = 1
MODEL_FILE = "model.pt"
CHECKPOINT_PREFIX = "checkpoint_"


@dataclass
class LoadedCheckpoint:
    """A model ready for inference plus everything stored beside it."""

    model: nn.Module
    kind: str
    img_size: int
    step: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    uri: str
    sha256: str
    optimizer: dict[str, Any] | None = None


def checkpoint_payload(
    model: nn.Module,
    kind: str,
    img_size: int,
    step: int,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """The dict saved as model.pt (unwraps DDP); the model's `width` is read from it."""
    module = model.module if hasattr(model, "module") else model
    return {
        "format": FORMAT,
        "kind": kind,
        "img_size": int(img_size),
        "width": float(getattr(module, "width", 1.0)),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "config": config or {},
        "metrics": metrics or {},
        "code_version": code_version(),
    }


def save_checkpoint(directory: str, payload: dict[str, Any]) -> str:
    """Write `payload` to `<directory>/model.pt` (local or URI); returns the file URI."""
    fs, path = fsspec.core.url_to_fs(directory)
    fs.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    target = posixpath.join(directory.rstrip("/"), MODEL_FILE)
    with fsspec.open(target, "wb") as fh:
        fh.write(buf.getvalue())
    return target


def resolve(uri: str) -> str:
    """The model.pt behind a file, a checkpoint directory or a training OUT directory (newest step)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise BadInput(f"checkpoint {uri} does not exist")
    if fs.isfile(path):
        return uri
    if fs.exists(posixpath.join(path, MODEL_FILE)):
        return posixpath.join(uri.rstrip("/"), MODEL_FILE)
    found = [p for p in fs.glob(posixpath.join(path, "**", MODEL_FILE))]
    if not found:
        raise BadInput(f"checkpoint {uri}: no {MODEL_FILE} inside")
    newest = max(found, key=lambda p: (_step_of(p), p))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return prefix + newest if prefix and not newest.startswith(prefix) else newest


def _step_of(path: str) -> int:
    for part in reversed(path.split("/")):
        if part.startswith(CHECKPOINT_PREFIX):
            digits = "".join(ch for ch in part[len(CHECKPOINT_PREFIX) :] if ch.isdigit())
            return int(digits) if digits else -1
    return -1


def read_payload(uri: str) -> tuple[dict[str, Any], str, str]:
    """(payload, resolved file URI, sha256 of the file) of a checkpoint."""
    target = resolve(uri)
    with fsspec.open(target, "rb") as fh:
        data = fh.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise BadInput(f"checkpoint {target} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "kind" not in payload:
        raise BadInput(f"checkpoint {target} is not a lipsync checkpoint (format {FORMAT})")
    return payload, target, hashlib.sha256(data).hexdigest()


def load_model(
    uri: str, expected_kind: str | None = None, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Model (eval mode, on `device`) and metadata of a checkpoint; wrong kind → BadInput."""
    payload, target, digest = read_payload(uri)
    kind = payload["kind"]
    if expected_kind and kind != expected_kind:
        raise BadInput(f"checkpoint {target} holds a {kind} model, expected {expected_kind}")
    model = build_model(kind, payload["img_size"], payload.get("width", 1.0))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return LoadedCheckpoint(
        model=model,
        kind=kind,
        img_size=payload["img_size"],
        step=payload["step"],
        config=payload.get("config", {}),
        metrics=payload.get("metrics", {}),
        uri=target,
        sha256=digest,
        optimizer=payload.get("optimizer"),
    )

"""Step 2, infer: the generator on a chunk of crops and mels (CPU threads or a GPU per actor)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from core.malloc import reuse_freed_memory
from generation.config import ModelConfig
from generation.rows import pack, to_table, unpack


class GenerateStage:
    """Stage 2 (actor pool): the Wav2Lip generator, batched over the face frames of its rows."""

    def __init__(self, checkpoint: str, cfg: ModelConfig) -> None:
        import torch

        from models.checkpoint import load_model

        reuse_freed_memory()  # activations: a third of the forward pass was page faults without it
        self.device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        self.cfg = cfg
        self.model = load_model(checkpoint, "wav2lip", self.device).model

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = table.to_pylist()
        live = [r for r in rows if r["status"] == "ok" and r["faces"]]
        if live:
            crops = np.concatenate([unpack(r["crops"]) for r in live])
            mels = np.concatenate([unpack(r["mels"]) for r in live])
            bounds = np.cumsum([0] + [r["faces"] for r in live])
            generated = self.infer(crops, mels, reference_crops(live, bounds, crops))
            for r, a, b in zip(live, bounds[:-1], bounds[1:], strict=True):
                r["generated"] = pack(generated[a:b])
        share = (time.perf_counter() - started) / max(1, len(rows))
        for r in rows:
            r["crops"] = r["mels"] = r["references"] = b""
            r["seconds"] += share
        return to_table(rows)

    def infer(self, crops: np.ndarray, mels: np.ndarray, references: np.ndarray | None = None) -> np.ndarray:
        """(N, S, S, 3) RGB crops + (N, 80, 16) mels (+ each crop's reference crop; None: itself) ->
        (N, S, S, 3) RGB generated crops (uint8)."""
        half = self.cfg.half and self.device == "cuda"
        return generate_crops(self.model, crops, mels, self.cfg.batch_size, self.device, half, references)


def reference_crops(rows: list[dict[str, Any]], bounds: np.ndarray, crops: np.ndarray) -> np.ndarray | None:
    """Each face crop's reference crop (`crops`: the rows' crops in order, row i's from bounds[i]; positions
    from generation.extension.reference_positions), or None when every crop is its own reference: the
    default path then converts each batch to a tensor once, as before."""
    positions = np.concatenate(
        [
            (unpack(r["references"]) if r["references"] else np.arange(r["faces"])) + start
            for r, start in zip(rows, bounds[:-1], strict=True)
        ]
    )
    return None if (positions == np.arange(len(crops))).all() else crops[positions]


def _tensor(frames: np.ndarray, device: str) -> Any:
    """RGB uint8 (N, S, S, 3) -> BGR float (N, 3, S, S) in [0, 1], as the models see faces."""
    import torch

    bgr = np.ascontiguousarray(frames[..., ::-1])
    return torch.from_numpy(bgr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def generate_crops(
    model: Any,
    crops: np.ndarray,
    mels: np.ndarray,
    batch_size: int,
    device: str = "cpu",
    half: bool = False,
    references: np.ndarray | None = None,
) -> np.ndarray:
    """The generator on face crops: each crop's lower half masked, beside its reference crop unmasked (None:
    the crop itself, as the reference's inference does), one mel window per crop. RGB uint8 in and out."""
    import torch

    out = np.empty_like(crops)
    lower = crops.shape[1] // 2
    for i in range(0, len(crops), batch_size):
        x = _tensor(crops[i : i + batch_size], device)
        masked = x.clone()
        masked[:, :, lower:] = 0.0
        reference = x if references is None else _tensor(references[i : i + batch_size], device)
        audio = torch.from_numpy(mels[i : i + batch_size]).to(device).unsqueeze(1)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
            y = model(audio, torch.cat([masked, reference], dim=1))
            y = (y.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)
        out[i : i + len(x)] = y.cpu().numpy()[..., ::-1]
    return out


def cpu_threads(cfg: ModelConfig) -> int:
    """Torch threads of one CPU model actor: `threads`, or this node's CPUs split among the actors.

    On CPU, several single-threaded actors outrun one actor with as many threads (the model alone on 2
    cores, three times each in one run of benchmarks/generate.py: 2 x 1 thread 41.2-43.7 frames/s, 1 x 2
    threads 38.5-39.7); `configs/generate_cpu.yaml` lays the pool out so.
    """
    return cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)

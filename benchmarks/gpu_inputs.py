"""Inputs of `benchmarks/gpu.py`: synthetic batches a model can learn from, shard rows, a prefetching feeder.

Synthetic batches have the recipes' shapes and dtypes (images uint8, mels float32) and a learnable link:
each window has a latent mouth opening per frame, drawn as a dark box in the lower half of its faces and
as energy in the mel columns of that frame; SyncNet negatives take the mel of another latent. So the expert's
val loss can fall below 0.5 and the generator's L1 can fall, with no media tools on the machine.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

FRAMES = 5  # SYNC_FRAMES
MEL_STEPS = 16


def _faces(z: np.ndarray, img: int, rng: np.random.Generator) -> np.ndarray:
    """(B, 5) openings in [0, 1] → RGB (B, 5, img, img, 3) uint8 faces with a mouth box per frame."""
    b = len(z)
    base = rng.integers(90, 200, (b, 1, 1, 1, 3))
    out = np.broadcast_to(base, (b, FRAMES, img, img, 3)).astype(np.int16)
    out = out + rng.integers(-12, 13, out.shape, dtype=np.int16)
    half, x0, x1 = img // 2, img // 3, 2 * img // 3
    rows = np.arange(img)[None, None, :]
    top = half + img // 6
    bottom = top + 2 + (z * (img // 4)).astype(int)[..., None]  # (B, 5, 1)
    mouth = (rows >= top) & (rows < bottom)  # (B, 5, img)
    cols = np.zeros(img, bool)
    cols[x0:x1] = True
    box = mouth[..., None] & cols[None, None, None, :]  # (B, 5, img, img)
    out[box] = 30
    return np.clip(out, 0, 255).astype(np.uint8)


def _mels(z: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """(B, 5) openings → (B, 80, 16) mels: frame i drives mel columns ~3.2·i .. 3.2·(i+1)."""
    b = len(z)
    cols = np.minimum((np.arange(MEL_STEPS) * FRAMES) // MEL_STEPS, FRAMES - 1)
    energy = z[:, cols]  # (B, 16)
    bands = np.linspace(1.0, 0.2, 80)[None, :, None]
    mel = -4.0 + 6.0 * bands * energy[:, None, :] + shift
    return (mel + 0.3 * rng.standard_normal((b, 80, MEL_STEPS))).astype(np.float32)


def sync_batch(batch: int, img: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A SyncNet batch: faces (B, 15, img/2, img) uint8 (lower halves, BGR), mel (B, 1, 80, 16), label."""
    z = rng.random((batch, FRAMES))
    label = (rng.random(batch) < 0.5).astype(np.float32)
    other = rng.random((batch, FRAMES))
    mel_z = np.where(label[:, None] > 0, z, other)
    faces = _faces(z, img, rng)[:, :, img // 2 :, :, ::-1]  # (B, 5, H/2, W, 3)
    faces = faces.transpose(0, 1, 4, 2, 3).reshape(batch, FRAMES * 3, img // 2, img)
    return {
        "faces": torch.from_numpy(np.ascontiguousarray(faces)),
        "mel": torch.from_numpy(_mels(mel_z, rng)[:, None]),
        "label": torch.from_numpy(label),
    }


def wav2lip_batch(batch: int, img: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A generator batch: x (B, 6, 5, img, img) masked target + reference, y (B, 3, 5, img, img), mels."""
    z = rng.random((batch, FRAMES))
    target = _faces(z, img, rng)[..., ::-1].transpose(0, 4, 1, 2, 3)  # (B, 3, 5, H, W)
    ref = _faces(rng.random((batch, FRAMES)), img, rng)[..., ::-1].transpose(0, 4, 1, 2, 3)
    masked = target.copy()
    masked[:, :, :, img // 2 :] = 0
    indiv = np.stack([_mels(np.repeat(z[:, i : i + 1], FRAMES, 1), rng) for i in range(FRAMES)], 1)
    return {
        "x": torch.from_numpy(np.ascontiguousarray(np.concatenate([masked, ref], 1))),
        "y": torch.from_numpy(np.ascontiguousarray(target)),
        "mel": torch.from_numpy(_mels(z, rng)[:, None]),
        "indiv_mels": torch.from_numpy(indiv[:, :, None]),
    }


def synthetic(kind: str, batch: int, img: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded synthetic batches of `kind` (syncnet | wav2lip)."""
    rng = np.random.default_rng(seed)
    make = sync_batch if kind == "syncnet" else wav2lip_batch
    while True:
        yield make(batch, img, rng)


def synthetic_rows(n_rows: int, n_frames: int, img: int, seed: int) -> list[dict[str, Any]]:
    """Shard rows (JPEG crops, float32 mel bytes) of synthetic clips, for the shard-reader input path."""
    from pipeline.shards import encode_jpegs

    rng = np.random.default_rng(seed)
    mel_frames = 1 + n_frames * 640 // 200
    rows = []
    for i in range(n_rows):
        z = rng.random((n_frames // FRAMES + 1, FRAMES))
        faces = _faces(z, img, rng).reshape(-1, img, img, 3)[:n_frames]
        rows.append(
            {
                "clip_id": f"synth_{i}",
                "crops": encode_jpegs(np.ascontiguousarray(faces)),
                "mel": rng.standard_normal((80, mel_frames)).astype("<f4").tobytes(),
                "mel_frames": mel_frames,
                "n_frames": n_frames,
                "fps": 25.0,
                "av_offset_frames": 0,
            }
        )
    return rows


def shard_split(data: str, cfg: Any, split: str) -> list[dict[str, Any]]:
    """A preprocessed corpus's rows of `split` (train | val), as a plain loop reads them."""
    from training.streams import select_splits, shard_rows

    train, val = select_splits(data, cfg)
    return shard_rows(train if split == "train" else val)


class Feeder:
    """Batches cut from shard rows by `workers` threads (decode, window, collate, pin), queued for a step:
    the shard-reader path without Ray. Each thread has its own seeded `BatchStream`."""

    def __init__(self, rows: list[dict], cfg: Any, kind: str, workers: int, pin: bool) -> None:
        import dataclasses

        from training.streams import BatchStream

        self.queue: queue.Queue = queue.Queue(maxsize=2 * workers)
        self.stop = threading.Event()
        self.threads = []
        for w in range(workers):
            stream = BatchStream(rows, dataclasses.replace(cfg, seed=cfg.seed + w), kind)
            thread = threading.Thread(target=self._fill, args=(stream, pin), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _fill(self, stream: Iterator[dict[str, torch.Tensor]], pin: bool) -> None:
        while not self.stop.is_set():
            batch = next(stream)
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.queue.get()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)

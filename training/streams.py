"""Batches a training loop draws: from Ray Data (a Ray Train worker's shard of the window stream) or cut in
this process from shard rows (a Tune trial, a plain loop without Ray), and the loop's throughput meter.

Both kinds yield dicts of tensors shaped alike (images uint8), so a recipe's `step` takes either.
Ray is imported only by the functions that read Ray Data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from core.errors import BadInput
from training.balance import clip_weights, mix_card
from training.data import (
    SHARD_COLUMNS,
    WEIGHT,
    Selected,
    WindowMaker,
    describe_empty,
    for_pass,
    read_clips,
    read_shard_clips,
    select,
    windows_dataset,
)

if TYPE_CHECKING:
    from training.config import TrainConfig


def select_splits(data: str, cfg: TrainConfig) -> tuple[Selected, Selected]:
    """(train, val) clips of a preprocessed corpus; BadInput when the selection leaves no training clips."""
    clips = read_clips(data)
    train = select(data, cfg.data, "train", clips)
    if not train.clip_ids:
        raise BadInput(f"{data}: {describe_empty(clips, cfg.data)} in the train split")
    return weigh(train, clips, cfg), select(
        data, cfg.data, "val", clips, max_clips=cfg.eval_clips, seed=cfg.seed
    )


def train_mix(data: str, train: Selected) -> dict[str, Any]:
    """The run's data card of its mix: per language (speaker, emotion) the train clips and their share of
    windows in the corpus and in this run (after balance and focus)."""
    clips = read_clips(data)
    rows = clips.set_index("clip_id").loc[list(train.clip_ids)].reset_index()
    weights = pd.Series(train.weights or (1.0,) * len(train.clip_ids), index=list(train.clip_ids))
    return mix_card(rows, weights, ("language", "speaker", "emotion"))


def weigh(train: Selected, clips: pd.DataFrame, cfg: TrainConfig) -> Selected:
    """`train` with each clip's window multiplier from cfg.balance and cfg.focus (unchanged without them)."""
    if not cfg.balance and not cfg.focus.manifest:
        return train
    rows = clips.set_index("clip_id").loc[list(train.clip_ids)].reset_index()
    weights = clip_weights(rows, cfg.balance, cfg.balance_strength, cfg.focus)
    return dataclasses.replace(train, weights=tuple(float(weights[c]) for c in train.clip_ids))


MAX_WINDOW_PASSES = 8
"""Distinct window draws per clip in the train dataset; longer runs cycle through them."""


def window_passes(cfg: TrainConfig, kind: str, train_clips: int) -> int:
    """WindowConfig.passes, else the passes of distinct windows the run's steps consume (1..MAX_WINDOW_PASSES)."""
    if cfg.windows.passes is not None:
        return cfg.windows.passes
    per_pass = max(1, train_clips * cfg.windows.windows_per_clip * (2 if kind == "syncnet" else 1))
    return max(1, min(MAX_WINDOW_PASSES, math.ceil(cfg.steps * cfg.batch_size / per_pass)))


WAITING_FOR_WINDOWS = "waiting for a batch of windows"
"""The training loop's phase while it waits on the Ray Data window stream (core.watchdog)."""


def datasets(train: Selected, val: Selected, kind: str, cfg: TrainConfig) -> dict[str, Any]:
    """Ray Datasets: "train" streams windows epoch after epoch; "val" is a fixed set cut once (here, under
    the stall guard). The train stream has no Ray Data stall timeout of its own: it waits on the training
    loop, whose steps the loop watchdog watches."""
    from core.watchdog import data_stall_guard

    cpus = cfg.data_cpus_per_task
    passes = window_passes(cfg, kind, len(train.clip_ids))
    out = {"train": windows_dataset(train, kind, cfg.windows, cfg.img_size, cpus, passes, cfg.augment)}
    out["train"].context.execution_no_progress_timeout_s = -1
    if val.clip_ids:
        val_windows = dataclasses.replace(cfg.windows, windows_per_clip=cfg.eval_windows_per_clip)
        with data_stall_guard(cfg.stall_seconds, "stall_seconds"):
            out["val"] = windows_dataset(val, kind, val_windows, cfg.img_size, cpus).materialize()
    return out


# ---------------------------------------------------------------- a Ray Train worker's batches


def batches(
    name: str, batch_size: int, device: torch.device, cfg: TrainConfig
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless local batches from this worker's shard of dataset `name`, one epoch after another."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        seen = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=max(cfg.shuffle_buffer, batch_size) if cfg.shuffle_buffer else None,
            local_shuffle_seed=cfg.seed + epoch,
            device=device,
            pin_memory=cfg.gpu,
        ):
            seen += 1
            yield batch
        if not seen:
            raise RuntimeError(f"dataset {name!r} has fewer samples per worker than one batch ({batch_size})")
        epoch += 1


class Throughput:
    """Steps per second and the share of that time spent waiting for the next batch, between readings."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.waited, self.steps = time.perf_counter(), 0.0, 0

    def next(self, stream: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        batch = next(stream)
        self.waited += time.perf_counter() - began
        self.steps += 1
        return batch

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"steps_per_s": self.steps / elapsed, "data_wait_fraction": self.waited / elapsed}
        self.reset()
        return out


def one_pass(name: str, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's shard of dataset `name` (validation)."""
    import ray.train

    yield from ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=batch_size, device=device)


# ---------------------------------------------------------------- batches cut in this process


def shard_rows(selected: Selected, with_pcm: bool = False) -> list[dict[str, Any]]:
    """The selected clips' shard rows (the columns windows are cut from, PCM too when asked), read into this
    process, each with its window multiplier (WEIGHT)."""
    columns = SHARD_COLUMNS + (["pcm"] if with_pcm else [])
    weights = dict(zip(selected.clip_ids, selected.weights, strict=True)) if selected.weights else {}
    rows = [
        {**row, WEIGHT: weights.get(row["clip_id"], 1.0)}
        for uri in selected.shard_files
        for row in read_shard_clips(uri, selected.clip_ids, columns).to_pylist()
    ]
    return sorted(rows, key=lambda row: row["clip_id"])


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Samples → a batch of tensors (images stay uint8, as Ray Data hands them to the recipes)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


class BatchStream:
    """Endless shuffled training batches, epoch after epoch; `position` makes a restart continue exactly.

    Each epoch visits the clips in a seeded order through a shuffle buffer, with windows drawn anew per
    epoch (the window seed is offset by the epoch).
    """

    def __init__(self, rows: list[dict], cfg: TrainConfig, kind: str, epoch: int = 0, index: int = 0) -> None:
        self.rows, self.cfg, self.kind = rows, cfg, kind
        self.epoch, self.index = epoch, index
        self._batches = self._epoch(epoch, skip=index)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                self.index += 1
                return batch
            if self.index == 0:
                break
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch, skip=0)
        raise ValueError(f"the selected clips give fewer windows than one batch ({self.cfg.batch_size})")

    def _epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        windows = for_pass(cfg.windows, epoch)
        maker = WindowMaker(self.kind, windows, cfg.img_size, cfg.augment)
        size = max(cfg.shuffle_buffer, cfg.batch_size)
        buffer: list[dict[str, np.ndarray]] = []
        n = 0
        for i in rng.permutation(len(self.rows)):
            buffer.extend(maker(self.rows[i]))
            while len(buffer) >= size:
                n += 1
                batch = [
                    buffer.pop(int(j)) for j in sorted(rng.choice(len(buffer), cfg.batch_size, False))[::-1]
                ]
                if n > skip:
                    yield collate(batch)
        rng.shuffle(buffer)
        for start in range(0, len(buffer) - cfg.batch_size + 1, cfg.batch_size):
            n += 1
            if n > skip:
                yield collate(buffer[start : start + cfg.batch_size])


def val_batches(rows: list[dict], cfg: TrainConfig, kind: str) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: `eval_windows_per_clip` windows of each val clip, in batches."""
    windows = dataclasses.replace(cfg.windows, windows_per_clip=cfg.eval_windows_per_clip)
    maker = WindowMaker(kind, windows, cfg.img_size)
    samples = [s for row in rows for s in maker(row)]
    return [collate(samples[i : i + cfg.batch_size]) for i in range(0, len(samples), cfg.batch_size)]

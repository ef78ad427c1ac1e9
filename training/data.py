"""Training data: which clips (selection from clips.parquet) and what samples (windows from shard rows).

Selection is by language, speaker, split and clip columns (|av_offset_frames| <= t, offset confidence >= c,
face size >= s), so alignment thresholds are tunable without re-preprocessing.

Windows follow the reference (Rudrabha/Wav2Lip `color_syncnet_train.py`, `hq_wav2lip_train.py`) with one
deliberate change: the mel of a window starting at video frame `s` starts at mel frame `int(80 * s / fps)`
(`pipeline.audio.mel_window`), for the SyncNet window and for each generator frame alike. The reference's
`get_segmented_mels` shifts its per-frame windows one video frame earlier (`+1` then `-2`) than inference
does, so its generator learns a mapping it is never asked for; here training, inference and scoring share
one indexing. Faces are in BGR channel order like the reference (cv2.imread), so reference weights and
ours are interchangeable; crops are stored RGB in shards and flipped here.

Samples (numpy, one dict each; images stay uint8 until they reach the device):
- SyncNet: `faces` (15, H/2, W) lower halves of 5 frames, `mel` (1, 80, 16), `label` 1 in sync / 0 not.
  Every start yields an in-sync positive and an off-sync negative from the same clip: the same faces with
  the mel of another start at least `negative_min_shift` frames away.
- Wav2Lip: `x` (6, 5, H, W) = target window with its lower half zeroed + reference window from elsewhere in
  the clip (no shared frames), `y` (3, 5, H, W) ground truth, `mel` (1, 80, 16) for the sync loss,
  `indiv_mels` (5, 1, 80, 16) one window per frame.

The window makers are plain functions of a shard row; `windows_dataset` streams them with Ray Data
(one task per selected shard file reads its selected clips, with the `clip_id` filter pushed down to
pyarrow, and cuts their windows), so the corpus is never copied into memory as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import BadInput
from core.storage import join_uri, read_parquet
from models.frames import SYNC_FRAMES, masked_window, sync_faces, to_model_frames
from pipeline.audio import MEL_STEP_SIZE, mel_start_indices, mel_window
from pipeline.shards import decode_crops, decode_mel, decode_pcm
from training.augment import AugmentConfig, PixelChange, augmented_mel, draw_pixel_change
from training.balance import window_counts

SHARD_COLUMNS = ["clip_id", "crops", "mel", "mel_frames", "n_frames", "fps", "av_offset_frames"]
"""Shard columns the window makers read (landmarks stay on disk; PCM is read only to augment audio)."""
Rng = np.random.Generator
WEIGHT = "window_weight"
"""A shard row's window multiplier (training.balance), set on the row by whoever reads it for training."""

SYNC_KEYS = ("faces", "mel", "label")
WAV2LIP_KEYS = ("x", "y", "mel", "indiv_mels")


@dataclass(frozen=True)
class DataSelection:
    """Which clips of a preprocessed corpus to train on; empty tuples and None mean "no filter"."""

    languages: tuple[str, ...] = ()
    speakers: tuple[str, ...] = ()
    clip_ids: tuple[str, ...] = ()
    max_abs_offset: int | None = None  # keep clips with |av_offset_frames| <= this (or unconfident)
    min_offset_confidence: float = 0.0  # keep clips with av_offset_confidence >= this
    min_face_size: float = 0.0  # keep clips with face_size (source pixels) >= this


@dataclass(frozen=True)
class WindowConfig:
    """How windows are cut from a clip."""

    windows_per_clip: int = 32  # starts drawn per clip per epoch (SyncNet: a positive and a negative each)
    negative_min_shift: int = 2  # off-sync mel starts at least this many frames from the faces' start
    negative_max_shift: int | None = None  # ... and at most this many (None: anywhere in the clip)
    reference_min_distance: int = SYNC_FRAMES  # reference window starts this far from the target's
    correct_offset: bool = False  # shift mels by the clip's estimated av_offset_frames
    seed: int = 0
    passes: int | None = None  # distinct draws of windows the train stream cycles through (None: auto)


@dataclass(frozen=True)
class Selected:
    """The clips of one split and the shard files that hold them."""

    split: str
    clip_ids: tuple[str, ...]
    shard_files: tuple[str, ...]
    frames: int
    weights: tuple[float, ...] = ()  # window multiplier of each of clip_ids (training.balance); () all 1


# ---------------------------------------------------------------- selection


def read_clips(data: str) -> pd.DataFrame:
    """clips.parquet of a preprocess OUT (local or URI); BadInput when missing or empty."""
    uri = join_uri(data, "clips.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise BadInput(f"{data} is not a preprocessed corpus: {uri} does not exist")
    with fsspec.open(uri, "rb") as fh:
        clips = read_parquet(fh).to_pandas()
    if clips.empty:
        raise BadInput(f"{uri} lists no clips")
    return clips


def select_clips(clips: pd.DataFrame, selection: DataSelection, split: str | None = None) -> pd.DataFrame:
    """Rows of `clips` that pass every filter of `selection` (and belong to `split` when given)."""
    keep = np.ones(len(clips), dtype=bool)
    if selection.languages:
        keep &= clips["language"].isin(selection.languages).to_numpy()
    if selection.speakers:
        keep &= clips["speaker"].isin(selection.speakers).to_numpy()
    if selection.clip_ids:
        keep &= clips["clip_id"].isin(selection.clip_ids).to_numpy()
    if selection.max_abs_offset is not None:  # a reading the meter abstained on says nothing either way
        confident = clips.get("av_offset_confident", pd.Series(True, index=clips.index)).fillna(True)
        small = clips["av_offset_frames"].abs() <= selection.max_abs_offset
        keep &= (small | ~confident.astype(bool)).to_numpy()
    if selection.min_offset_confidence > 0:
        keep &= (clips["av_offset_confidence"] >= selection.min_offset_confidence).to_numpy()
    if selection.min_face_size > 0:
        keep &= (clips["face_size"] >= selection.min_face_size).to_numpy()
    if split is not None:
        keep &= (clips["split"] == split).to_numpy()
    return clips[keep]


def describe_empty(clips: pd.DataFrame, selection: DataSelection) -> str:
    """One line saying which filter left no clips."""
    if selection.languages and not clips["language"].isin(selection.languages).any():
        have = ",".join(sorted(clips["language"].unique()))
        return f"no clips for language(s) {','.join(selection.languages)} (corpus has {have})"
    if selection.speakers and not clips["speaker"].isin(selection.speakers).any():
        return f"no clips for speaker(s) {','.join(selection.speakers)}"
    return f"no clips pass the selection {selection}"


def select(
    data: str,
    selection: DataSelection,
    split: str,
    clips: pd.DataFrame | None = None,
    max_clips: int | None = None,
    seed: int = 0,
) -> Selected:
    """The selected clips of `split` (at most `max_clips`, a seeded choice) and their shard files.

    BadInput when the shard files are missing (an empty shard set).
    """
    clips = read_clips(data) if clips is None else clips
    rows = select_clips(clips, selection, split)
    if max_clips is not None and len(rows) > max_clips:
        rows = rows.sample(n=max_clips, random_state=seed)
    files = sorted({join_uri(data, s) for s in rows["shard"]})
    if not rows.empty:
        missing = [f for f in files if not _exists(f)]
        if len(missing) == len(files):
            raise BadInput(f"empty shard set: none of the {len(files)} shard files of {data} exist")
        if missing:
            raise BadInput(f"{len(missing)} shard files of {data} are missing, e.g. {missing[0]}")
    return Selected(split, tuple(sorted(rows["clip_id"])), tuple(files), int(rows["n_frames"].sum()))


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


# ---------------------------------------------------------------- windows (plain numpy)


def valid_starts(n_frames: int, mel_frames: int, fps: float = 25.0, offset_frames: int = 0) -> np.ndarray:
    """Window starts whose 5 frames and whose 16-frame mel window (after offset) lie inside the clip."""
    starts = np.arange(max(0, n_frames - SYNC_FRAMES + 1))
    mel_start = mel_start_indices(starts, fps, offset_frames)
    ok = (mel_start >= 0) & (mel_start + MEL_STEP_SIZE <= mel_frames)
    return starts[ok]


def clip_rng(seed: int, clip_id: str) -> np.random.Generator:
    """A generator seeded by (seed, clip_id): the same windows wherever and whenever a clip is cut."""
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def off_sync_start(
    rng: np.random.Generator, start: int, starts: np.ndarray, min_shift: int, max_shift: int | None
) -> int | None:
    """A start at least `min_shift` (and at most `max_shift`) frames from `start`, or None."""
    shift = np.abs(starts - start)
    ok = shift >= min_shift
    if max_shift is not None:
        ok &= shift <= max_shift
    return int(rng.choice(starts[ok])) if ok.any() else None


def _row_offset(row: dict[str, Any], cfg: WindowConfig) -> int:
    return int(row.get("av_offset_frames") or 0) if cfg.correct_offset else 0


def window_count(row: dict[str, Any], cfg: WindowConfig) -> int:
    """The row's windows this pass: `windows_per_clip` x its WEIGHT (exactly, unweighted), rounded at random
    by its own seeded generator (the windows' draws stay those of the unweighted clip)."""
    weight = float(row.get(WEIGHT, 1.0))
    if weight == 1.0:
        return cfg.windows_per_clip
    return int(
        window_counts(np.array([weight]), cfg.windows_per_clip, clip_rng(cfg.seed, f"{row['clip_id']}#n"))[0]
    )


def _decode(row: dict[str, Any], needed: set[int], img_size: int) -> dict[int, np.ndarray]:
    """Only the frames a sample uses, decoded once each."""
    lo, hi = min(needed), max(needed) + 1
    frames = to_model_frames(decode_crops(row, lo, hi), img_size)
    return {i: frames[i - lo] for i in needed}


@dataclass(frozen=True)
class Cut:
    """The windows drawn from one shard row: (start, partner start) pairs and the frames they use."""

    fps: float
    offset: int
    mel: np.ndarray
    pairs: list[tuple[int, int | None]]
    frames: dict[int, np.ndarray]

    def window(self, start: int) -> np.ndarray:
        return np.stack([self.frames[start + i] for i in range(SYNC_FRAMES)])

    def mel_at(self, start: int) -> np.ndarray:
        return mel_window(self.mel, start, self.fps, offset_frames=self.offset)


def cut_windows(
    row: dict[str, Any],
    cfg: WindowConfig,
    img_size: int,
    rng: np.random.Generator,
    partner: Callable[[int, np.ndarray], int | None],
    partner_frames: bool,
    mel: np.ndarray | None = None,
) -> Cut | None:
    """`window_count` starts drawn from the row's valid ones, each with `partner(start, starts)` (an off-sync
    mel or a reference window), and the frames decoded once (the partners' too when `partner_frames`); `mel`
    replaces the row's own (augmented audio). None when the clip has fewer than two valid starts."""
    fps, offset = float(row["fps"]), _row_offset(row, cfg)
    mel = mel if mel is not None else decode_mel(row)
    starts = valid_starts(int(row["n_frames"]), int(row["mel_frames"]), fps, offset)
    count = window_count(row, cfg)
    if len(starts) < 2 or count < 1:
        return None
    chosen = rng.choice(starts, size=count, replace=len(starts) < count)
    pairs = [(int(s), partner(int(s), starts)) for s in chosen]
    used = [p for pair in pairs for p in (pair if partner_frames else pair[:1]) if p is not None]
    needed = {s + i for s in used for i in range(SYNC_FRAMES)}
    return Cut(fps, offset, mel, pairs, _decode(row, needed, img_size))


def sync_samples(
    row: dict[str, Any], cfg: WindowConfig, img_size: int, rng: Rng, aug: Augmenter | None = None
) -> list[dict[str, np.ndarray]]:
    """SyncNet samples of one shard row: for each drawn start, an in-sync positive and an off-sync negative
    (the same faces, changed alike by `aug` when given)."""

    def negative(start: int, starts: np.ndarray) -> int | None:
        return off_sync_start(rng, start, starts, cfg.negative_min_shift, cfg.negative_max_shift)

    cut = cut_windows(
        row, cfg, img_size, rng, negative, partner_frames=False, mel=aug.mel(row) if aug else None
    )
    out = []
    for start, wrong in cut.pairs if cut else []:
        window = cut.window(start)
        faces = sync_faces(aug.pixels(img_size).apply(window) if aug else window)
        out += [
            {
                "faces": faces,
                "mel": cut.mel_at(mel_start)[None].astype(np.float32),
                "label": np.float32(label),
                "start": np.int64(start),
                "mel_start_frame": np.int64(mel_start),
            }
            for mel_start, label in ((start, 1.0), (wrong, 0.0))
            if mel_start is not None
        ]
    return out


def wav2lip_samples(
    row: dict[str, Any], cfg: WindowConfig, img_size: int, rng: Rng, aug: Augmenter | None = None
) -> list[dict[str, np.ndarray]]:
    """Generator samples of one shard row: masked target + reference window, per-frame mels, ground truth
    (target and reference changed alike by `aug` when given)."""

    def reference(start: int, starts: np.ndarray) -> int | None:
        ref = off_sync_start(rng, start, starts, cfg.reference_min_distance, None)
        return ref if ref is not None else off_sync_start(rng, start, starts, 1, None)

    cut = cut_windows(
        row, cfg, img_size, rng, reference, partner_frames=True, mel=aug.mel(row) if aug else None
    )
    pairs = cut.pairs if cut else []
    return [generator_sample(cut, start, ref, aug.pixels(img_size) if aug else None) for start, ref in pairs]


def generator_sample(
    cut: Cut, start: int, ref: int, change: PixelChange | None = None
) -> dict[str, np.ndarray]:
    """One Wav2Lip sample: target window `start` masked + reference window `ref`, mels, ground truth."""
    target, reference = cut.window(start), cut.window(ref)
    if change is not None:
        target, reference = change.apply(target), change.apply(reference)
    indiv = np.stack([cut.mel_at(start + i) for i in range(SYNC_FRAMES)])
    return {
        "x": np.concatenate([masked_window(target), reference.transpose(3, 0, 1, 2)]),
        "y": np.ascontiguousarray(target.transpose(3, 0, 1, 2)),
        "mel": cut.mel_at(start)[None].astype(np.float32),
        "indiv_mels": indiv[:, None].astype(np.float32),
        "start": np.int64(start),
        "reference_start": np.int64(ref),
    }


class Augmenter:
    """A clip's augmentation draws, from their own generator: the windows drawn are those of the clean clip."""

    def __init__(self, cfg: AugmentConfig, seed: int, clip_id: str) -> None:
        self.cfg, self.rng = cfg, clip_rng(seed, f"{clip_id}#augment")

    def mel(self, row: dict[str, Any]) -> np.ndarray | None:
        """The mel of the row's augmented audio (None: the audio is not augmented)."""
        if not self.cfg.changes_audio:
            return None
        if "pcm" not in row:  # a reader that left PCM out (WindowMaker.columns, shard_rows(with_pcm=True))
            raise ValueError(f"clip {row['clip_id']}: audio augmentation needs the shard's pcm column")
        return augmented_mel(decode_pcm(row), int(row["mel_frames"]), self.cfg, self.rng)

    def pixels(self, size: int) -> PixelChange:
        return draw_pixel_change(self.cfg, self.rng, size)


class WindowMaker:
    """`flat_map` function: a shard row → its samples, seeded per clip (deterministic across workers).

    `augment` (train windows only) changes pixels and audio; rows carrying WEIGHT give that many times
    `windows_per_clip` windows.
    """

    def __init__(
        self, kind: str, cfg: WindowConfig, img_size: int, augment: AugmentConfig | None = None
    ) -> None:
        if kind not in ("syncnet", "wav2lip"):
            raise ValueError(f"unknown window kind {kind!r}")
        self.kind, self.cfg, self.img_size = kind, cfg, img_size
        self.augment = augment if augment is not None and augment.active else None

    @property
    def columns(self) -> list[str]:
        """The shard columns this maker reads."""
        return SHARD_COLUMNS + (["pcm"] if self.augment and self.augment.changes_audio else [])

    def __call__(self, row: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        rng = clip_rng(self.cfg.seed, str(row["clip_id"]))
        aug = Augmenter(self.augment, self.cfg.seed, str(row["clip_id"])) if self.augment else None
        make = sync_samples if self.kind == "syncnet" else wav2lip_samples
        keys = SYNC_KEYS if self.kind == "syncnet" else WAV2LIP_KEYS
        return [{k: s[k] for k in keys} for s in make(row, self.cfg, self.img_size, rng, aug)]


# ---------------------------------------------------------------- Ray Data


def read_shard_clips(
    uri: str, clip_ids: list[str] | tuple[str, ...], columns: list[str] | None = None
) -> pa.Table:
    """The `columns` (default SHARD_COLUMNS) of one shard file's rows for `clip_ids` (filter pushed down)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return pq.read_table(
        path,
        columns=list(columns or SHARD_COLUMNS),
        filters=[("clip_id", "in", list(clip_ids))],
        filesystem=fs,
    )


def for_pass(cfg: WindowConfig, index: int) -> WindowConfig:
    """The window settings of pass (epoch) `index`: its own seed, so each pass cuts new windows."""
    return dataclasses.replace(cfg, seed=cfg.seed + index)


def windows_dataset(
    selected: Selected,
    kind: str,
    cfg: WindowConfig,
    img_size: int,
    num_cpus: float = 1.0,
    passes: int = 1,
    augment: AugmentConfig | None = None,
) -> Any:
    """A streaming Ray Dataset of `kind` samples from the selected clips' shards (`num_cpus` per task).

    With `passes` > 1 it is that many passes over the clips, each cutting its own windows (WindowConfig seed
    + pass, as the in-memory tuning trials do per epoch), so an epoch of training is `passes` epochs of
    distinct windows rather than the same windows again. `augment`: train windows only; the selection's
    weights (Selected.weights) set each clip's share of windows.
    """
    parts = [
        _windows_pass(selected, kind, for_pass(cfg, i), img_size, num_cpus, augment) for i in range(passes)
    ]
    return parts[0].union(*parts[1:]) if passes > 1 else parts[0]


def _windows_pass(
    selected: Selected,
    kind: str,
    cfg: WindowConfig,
    img_size: int,
    num_cpus: float,
    augment: AugmentConfig | None,
) -> Any:
    import ray.data

    shards = [{"shard": uri} for uri in selected.shard_files]
    ds = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    maker = WindowMaker(kind, cfg, img_size, augment)
    return ds.flat_map(ShardWindows(selected.clip_ids, maker, selected.weights), num_cpus=num_cpus)


class ShardWindows:
    """`flat_map` function: a shard file's URI → the samples of its selected clips.

    Shard files are read here with pyarrow (clip_id filter pushed down) rather than by `read_parquet`, whose
    file-listing tasks always take one whole CPU: a training run whose workers leave less than one CPU free
    would wait for them forever, where these tasks take `data_cpus_per_task`.
    """

    def __init__(
        self, clip_ids: tuple[str, ...], maker: WindowMaker, weights: tuple[float, ...] = ()
    ) -> None:
        self.clip_ids, self.maker = list(clip_ids), maker
        self.weights = dict(zip(clip_ids, weights, strict=True)) if weights else {}

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        """The selected clips' samples, clip after clip: only one clip's windows are in memory at a time."""
        table = read_shard_clips(item["shard"], self.clip_ids, self.maker.columns)
        for i in range(table.num_rows):
            row = table.slice(i, 1).to_pylist()[0]
            yield from self.maker({**row, WEIGHT: self.weights.get(row["clip_id"], 1.0)})

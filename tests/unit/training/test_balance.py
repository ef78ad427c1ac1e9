"""Balanced sampling: each language's share of training windows follows the configured mix; a `select`
manifest's clips are up-weighted; the weights reach both window streams (in-process and Ray Data's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.training import shard_row

from core.errors import BadInput
from training.balance import FocusConfig, check_balance, clip_weights
from training.config import validate
from training.data import ShardWindows, WindowConfig, WindowMaker
from training.streams import BatchStream, select_splits, shard_rows, train_mix
from training.wav2lip_job import Wav2LipConfig

GREEN = {"en": 60, "hi": 200}
"""Each language's clips have this green level, so a window says which language it came from."""
DRAWS = 2000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preprocessed corpus of 8 en and 2 hi train clips (and one val clip) in one shard file."""
    root = tmp_path_factory.mktemp("balance")
    (root / "shards").mkdir()
    languages = ["en"] * 8 + ["hi"] * 2 + ["en"]
    rows, clips = [], []
    for i, language in enumerate(languages):
        clip_id = f"{language}{i:02d}"
        rows.append(shard_row(clip_id, seed=i, green=GREEN[language]))
        clips.append(
            {
                "clip_id": clip_id,
                "language": language,
                "speaker": f"{language}-spk{i % 3}",
                "emotion": "neutral",
                "source": f"/videos/{clip_id}.mp4",
                "split": "val" if i == len(languages) - 1 else "train",
                "shard": "shards/all.parquet",
                "n_frames": rows[-1]["n_frames"],
                "av_offset_frames": 0,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), root / "shards" / "all.parquet")
    pd.DataFrame(clips).to_parquet(root / "clips.parquet")
    return root


def hi_share(corpus: Path, cfg: Wav2LipConfig) -> float:
    """Share of hi windows among the first DRAWS windows of the training stream."""
    train, _ = select_splits(str(corpus), cfg)
    stream = BatchStream(shard_rows(train), cfg, "wav2lip")
    greens: list[float] = []
    while len(greens) < DRAWS:
        batch = next(stream)["y"].numpy()  # (B, 3, 5, H, W) BGR
        greens.extend(batch[:, 1].reshape(len(batch), -1).mean(axis=1))
    return float(np.mean(np.array(greens[:DRAWS]) > 130))


def config(**changes: object) -> Wav2LipConfig:
    return dataclasses.replace(
        Wav2LipConfig(batch_size=50, shuffle_buffer=200, windows=WindowConfig(windows_per_clip=20)), **changes
    )


def test_a_uniform_language_mix_gives_half_the_windows_to_hi(corpus: Path) -> None:
    assert hi_share(corpus, config(balance={"language": "uniform"})) == pytest.approx(0.5, abs=0.05)


def test_without_a_mix_windows_follow_the_corpus(corpus: Path) -> None:
    assert hi_share(corpus, config()) == pytest.approx(0.2, abs=0.05)


def test_configured_shares_and_strength(corpus: Path) -> None:
    assert hi_share(corpus, config(balance={"language": {"en": 0.25, "hi": 0.75}})) == pytest.approx(
        0.75, abs=0.05
    )
    # halfway, geometrically: hi 0.2 -> 0.2 * sqrt(2.5), en 0.8 * sqrt(0.625), normalised
    half = 0.2 * 2.5**0.5 / (0.2 * 2.5**0.5 + 0.8 * 0.625**0.5)
    assert hi_share(corpus, config(balance={"language": "uniform"}, balance_strength=0.5)) == pytest.approx(
        half, abs=0.05
    )


def test_ray_datas_window_function_gives_the_same_mix(corpus: Path) -> None:
    """ShardWindows is the function the Ray Data train stream maps over shard files."""
    train, _ = select_splits(str(corpus), config(balance={"language": "uniform"}))
    maker = WindowMaker("wav2lip", WindowConfig(windows_per_clip=200), 96)
    greens = [
        s["y"][1].mean()
        for s in ShardWindows(train.clip_ids, maker, train.weights)({"shard": train.shard_files[0]})
    ]
    assert len(greens) == pytest.approx(DRAWS, abs=10)
    assert np.mean(np.array(greens) > 130) == pytest.approx(0.5, abs=0.05)


def test_focus_up_weights_the_manifests_clips(corpus: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"video": ["/videos/en03.mp4"], "metric": ["lse_d"], "value": [9.1]}).to_csv(
        manifest, index=False
    )
    train, _ = select_splits(str(corpus), config(focus=FocusConfig(str(manifest), weight=4.0)))
    weights = dict(zip(train.clip_ids, train.weights, strict=True))
    assert weights["en03"] == pytest.approx(4 * weights["en00"])
    assert np.mean(train.weights) == pytest.approx(1.0)


def test_the_runs_data_card_records_the_mix(corpus: Path) -> None:
    train, _ = select_splits(str(corpus), config(balance={"language": "uniform"}))
    card = train_mix(str(corpus), train)
    assert card["language"]["hi"] == {"clips": 2, "corpus_share": 0.2, "window_share": 0.5}


def test_mixes_that_cannot_be_applied_are_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="unknown key 'colour'"):
        validate(config(balance={"colour": "uniform"}))
    with pytest.raises(BadInput, match="balance_strength"):
        validate(config(balance={"language": "uniform"}, balance_strength=2.0))
    with pytest.raises(BadInput, match="none of the corpus's groups"):
        clip_weights(pd.DataFrame({"clip_id": ["a"], "language": ["en"]}), {"language": {"fr": 1.0}})
    with pytest.raises(BadInput, match="does not exist"):
        select_splits(str(corpus), config(focus=FocusConfig(str(tmp_path / "missing.csv"))))
    check_balance({"language": {"en": 1, "hi": 0}}, 1.0, FocusConfig())

"""The demo's new speech: long enough for the landmark meter and for generation's offset correction."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from scipy.io import wavfile

from core.config import load_config
from core.errors import BadInput
from generation.config import PostprocessConfig
from lipsync.demo import DEMO_CONFIG, DemoConfig, new_speech_pairs
from pipeline.sentences import HELD_OUT_SENTENCES, SENTENCES


def _clips(path: Path, languages: list[str]) -> Path:
    rows = [
        {"clip_id": f"{lang}-c{i}", "language": lang, "split": split, "source": f"/faces/{lang}-{split}.mp4"}
        for lang in languages
        for i, split in enumerate(("train", "val"))
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_new_speech_joins_the_configured_sentences_on_val_faces(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, DEMO_CONFIG)
    cfg = replace(cfg, synth=replace(cfg.synth, languages=["en", "es"]))
    clips = _clips(tmp_path / "clips.parquet", ["en", "es"])
    pairs = new_speech_pairs(tmp_path, clips, tmp_path / "speech", cfg)
    rows = list(csv.DictReader(pairs.open()))
    assert [r["language"] for r in rows] == ["en", "es"]
    for row in rows:
        assert row["video"] == f"/faces/{row['language']}-val.mp4"  # the val face, not a training one
        used = [s for s in HELD_OUT_SENTENCES[row["language"]] if s in row["transcript"]]
        assert len(used) == cfg.new_speech_sentences >= 2
        assert not [s for s in SENTENCES[row["language"]] if s in row["transcript"]]  # text never trained on
        rate, pcm = wavfile.read(row["audio"])
        assert len(pcm) / rate >= PostprocessConfig().min_seconds  # long enough to measure and correct


def test_a_language_without_held_out_sentences_speaks_the_corpus_sentences(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, DEMO_CONFIG)
    cfg = replace(cfg, synth=replace(cfg.synth, languages=["de"]), new_speech_sentences=2)
    assert "de" not in HELD_OUT_SENTENCES
    pairs = new_speech_pairs(tmp_path, _clips(tmp_path / "clips.parquet", ["de"]), tmp_path / "speech", cfg)
    (row,) = list(csv.DictReader(pairs.open()))
    assert len([s for s in SENTENCES["de"] if s in row["transcript"]]) == 2


def test_the_face_picked_does_not_depend_on_the_output_folder(tmp_path: Path) -> None:
    """Clip ids hash absolute paths: ordering by them picked a different val face per output folder."""
    from pipeline.corpus import input_id

    cfg = load_config(DemoConfig, DEMO_CONFIG)
    cfg = replace(cfg, synth=replace(cfg.synth, languages=["en"]), new_speech_sentences=1)
    picked = []
    for folder in ("demo_a", "demo_b", "demo_c", "demo_d"):
        sources = [f"/work/{folder}/synth/en/{name}.mp4" for name in ("spk1_0", "spk2_0")]
        rows = [{"clip_id": input_id(s), "language": "en", "split": "val", "source": s} for s in sources]
        clips = tmp_path / f"{folder}.parquet"
        pd.DataFrame(rows).to_parquet(clips)
        pairs = new_speech_pairs(tmp_path, clips, tmp_path / folder, cfg)
        picked.append(Path(next(csv.DictReader(pairs.open()))["video"]).name)
    assert picked == ["spk1_0.mp4"] * 4


def test_no_sentences_is_refused(tmp_path: Path) -> None:
    cfg = replace(load_config(DemoConfig, DEMO_CONFIG), new_speech_sentences=0)
    with pytest.raises(BadInput, match="new_speech_sentences"):
        new_speech_pairs(tmp_path, _clips(tmp_path / "clips.parquet", ["en"]), tmp_path / "speech", cfg)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"new_speech_sentences": 0}, "new_speech_sentences"),
        ({"generate": {"blend": {"region": "neck"}}}, "blend"),
    ],
)
def test_bad_late_settings_are_refused_before_the_first_stage(
    tmp_path: Path, setting: dict, message: str
) -> None:
    """Settings first used after training (the new speech, generation's) are checked when the demo starts:
    nothing is written (whether a Ray is up depends on the tests before this one, so it is not asserted)."""
    import yaml

    from lipsync.demo import run

    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(DEMO_CONFIG.read_text()) | setting))
    with pytest.raises(BadInput, match=message):
        run(str(tmp_path / "out"), config_path=str(config))
    assert not (tmp_path / "out").exists()

"""Generation's stages chained without Ray (`core.stage.run_sequential`), then finished: the same stage
classes the Ray Data pipeline runs on actor pools, so their logic is tested without a cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.tools import ffmpeg_cli

from core.stage import run_sequential
from generation.config import GenerateConfig, PostprocessConfig
from generation.finalize import finalize_pair
from generation.pairs import read_pairs
from generation.run import stage_specs
from pipeline.media import probe


@pytest.fixture(scope="module")
def random_generator(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(str(out), checkpoint_payload(build_model("wav2lip", 96), "wav2lip", 96, step=0))


def test_prepare_infer_composite_finalize_in_one_process(
    synth_corpus: Path, random_generator: str, tmp_path: Path
) -> None:
    manifest = pd.read_csv(synth_corpus / "manifest.csv")
    face, other = synth_corpus / manifest["video"][0], synth_corpus / manifest["video"][len(manifest) - 1]
    speech = tmp_path / "speech.wav"
    ffmpeg_cli("-i", str(other), "-vn", "-t", "1.6", str(speech))  # another speaker's words, 40 frames
    (tmp_path / "pairs.csv").write_text(f"id,video,audio,language\none,{face},{speech},en\n")
    pairs = read_pairs(str(tmp_path / "pairs.csv"))
    cfg = GenerateConfig(chunk_seconds=0.4, post=PostprocessConfig(measure_offset=False))
    out = str(tmp_path / "out")

    chunks = run_sequential(stage_specs(cfg, pairs, out, random_generator, 96), pairs, batch_format="pyarrow")

    assert len(chunks) == 4  # 1.6 s of audio in 0.4 s chunks
    assert all(c["status"] == "ok" for c in chunks), [c["message"] for c in chunks]
    assert len({c["start"] for c in chunks}) == len(chunks)  # each chunk once
    row = finalize_pair(cfg, out, pairs[0], chunks)
    assert row["status"] == "ok", row["message"]
    info = probe(row["output"])
    audio = probe(str(speech), require_video=False)
    assert info.has_audio and abs(info.duration_s - audio.duration_s) < 0.1  # the new audio sets the length
    assert info.n_frames == row["frames"] == chunks[0]["n_out"]


def test_the_generator_is_shown_the_configured_reference(
    synth_corpus: Path, random_generator: str, tmp_path: Path
) -> None:
    """reference: same shows the generator each crop itself; shifted, another crop of the same chunk. The
    generator's output depends on which (so a leak of the source's own mouth through it is a setting)."""
    from generation.rows import unpack

    manifest = pd.read_csv(synth_corpus / "manifest.csv")
    face = synth_corpus / manifest["video"][0]
    speech = tmp_path / "speech.wav"
    ffmpeg_cli("-i", str(face), "-vn", "-t", "0.8", str(speech))
    (tmp_path / "pairs.csv").write_text(f"id,video,audio,language\none,{face},{speech},en\n")
    pairs = read_pairs(str(tmp_path / "pairs.csv"))
    generated = {}
    for mode in ("same", "shifted"):
        cfg = GenerateConfig(chunk_seconds=0.4, reference=mode, post=PostprocessConfig(measure_offset=False))
        specs = stage_specs(cfg, pairs, str(tmp_path / mode), random_generator, 96)
        prepared = run_sequential(specs[:1], pairs, batch_format="pyarrow")
        for row in prepared:
            positions = unpack(row["references"])
            assert len(positions) == row["faces"] == 10
            assert (positions == range(10)).all() == (mode == "same")
        chunks = run_sequential(specs[:2], pairs, batch_format="pyarrow")
        generated[mode] = np.concatenate([unpack(c["generated"]) for c in chunks])
    assert generated["same"].shape == generated["shifted"].shape
    # inference is deterministic: only the reference differs
    assert (generated["same"] != generated["shifted"]).any()

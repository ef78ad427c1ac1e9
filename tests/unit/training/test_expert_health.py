"""Expert health: the stuck-expert warning, the offset ranks and the generator's gate on a weak expert."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.errors import BadInput
from training import expert_health as eh

CARD = {
    "clips": 10,
    "offset_share": 1.0,
    "median_abs_offset": 8.0,
    "fps": [25.0],
    "speakers": 2,
    "face_size": 40,
}


CLEAN = {
    "clips": 10,
    "offset_share": 0.0,
    "median_abs_offset": 0.0,
    "fps": [25.0],
    "speakers": 6,
    "face_size": 110,
}


def test_warning_only_when_stuck_after_the_configured_step() -> None:
    assert eh.stuck_warning(99, 0.69, 100, CARD) is None  # too early to tell
    assert eh.stuck_warning(100, 0.60, 100, CARD) is None  # learning
    assert eh.stuck_warning(100, 0.69, None, CARD) is None  # switched off
    text = eh.stuck_warning(100, 0.69, 100, CARD)
    assert text and "0.690" in text and "step 100" in text
    assert "100% of clips have |offset| > 1 frame" in text and "LIKELY CAUSE" in text
    assert (
        "speakers (train): 2 - few" in text
        and "40 px median - small mouths" in text
        and "fps: 25 - fine" in text
    )


def test_clean_card_blames_nothing_in_the_data() -> None:
    lines = eh.causes(CLEAN)
    assert all(line.endswith("- fine") for line in lines[:4]), lines


def test_data_card_reads_clips_parquet(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "clip_id": list("abcd"),
            "split": ["train", "train", "train", "val"],
            "speaker": ["s1", "s2", "s2", "s3"],
            "av_offset_frames": [0, 8, -2, 1],
            "fps": [25.0] * 4,
            "face_size": [100.0, 110.0, 120.0, 130.0],
        }
    ).to_parquet(tmp_path / "clips.parquet")
    card = eh.data_card(str(tmp_path))
    assert card["offset_share"] == 0.5 and card["speakers"] == 2 and card["fps"] == [25.0]
    assert card["face_size"] == 115.0


def test_generator_refuses_a_weak_expert_unless_told() -> None:
    eh.gate_expert({"val_loss": 0.70}, "x", 0.75)  # good enough
    eh.gate_expert({"val_loss": 0.90}, "x", None)  # told to accept any
    eh.gate_expert({}, "x", 0.75)  # nothing recorded: a warning, not a refusal
    with pytest.raises(BadInput, match=r"val loss 0\.900 > 0\.75.*--allow-weak-expert"):
        eh.gate_expert({"val_loss": 0.90}, "x", 0.75)


def test_wav2lip_run_refuses_a_weak_expert_checkpoint(tmp_path: Path) -> None:
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model
    from training.wav2lip_job import check_expert

    payload = checkpoint_payload(
        build_model("syncnet", 96, 0.125), "syncnet", 96, 10, metrics={"val_loss": 0.69}
    )
    uri = save_checkpoint(str(tmp_path / "expert"), payload)
    assert check_expert(uri, 96, 0.75) == uri
    payload["metrics"]["val_loss"] = 0.8
    save_checkpoint(str(tmp_path / "expert"), payload)
    with pytest.raises(BadInput, match="has not learnt sync"):
        check_expert(uri, 96, 0.75)
    assert check_expert(uri, 96, None) == uri


def test_shift_scores_embed_the_faces_once_and_match_the_full_forward() -> None:
    """The offset ranking's scores equal the network's own forward pass at every shift, and the face
    encoder runs once per clip, not once per shift."""
    import numpy as np
    import torch
    from support.training import shard_row

    from models.registry import build_model
    from models.syncnet import sync_probability

    torch.manual_seed(0)
    model = build_model("syncnet", 96, 0.125).eval()
    inputs = eh.clip_windows(shard_row(), 96, windows=6)
    assert inputs is not None
    faces, mels = inputs
    with torch.no_grad():
        full = [float(sync_probability(*model(m, faces)).mean()) for m in mels]
    calls = []
    hook = model.face_encoder.register_forward_hook(lambda *_: calls.append(1))
    scores = eh.clip_shift_scores(model, shard_row(), cached=inputs)
    hook.remove()
    np.testing.assert_allclose(scores, full, rtol=1e-6)
    assert len(scores) == len(eh.SHIFTS) and len(calls) == 1

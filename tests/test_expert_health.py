"""Expert health: the stuck-expert warning, the offset ranks and the generator's gate on a weak expert."""

from __future__ import annotations

import logging
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


# --- training on a corpus whose audio is 8 frames late in every clip, and on a clean one -----------------
STEPS = 100


def _corpus(root: Path, offset: int) -> Path:
    from pipeline.preprocess import run as preprocess
    from pipeline.stages import PreprocessConfig
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth

    cfg = SynthConfig(
        languages=("en", "es", "hi"),
        speakers=2,
        clips_per_speaker=2,
        seconds=4.0,
        seed=0,
        offset_frames=offset,
    )
    synth(cfg, str(root / "raw"))
    preprocess(PreprocessConfig(), str(root / "raw"), str(root / "pre"))
    return root / "pre"


def _train(data: Path) -> tuple[dict, list[dict], dict]:
    """A narrow expert trained in-process for STEPS steps; Health evaluated every 20 (as the job does)."""
    import torch

    from models.registry import build_model
    from training.common import Amp, build_optimizer
    from training.data import DataSelection, WindowConfig, select
    from training.syncnet_job import SyncNetConfig, sync_batch_loss, train_step
    from tuning.trial import BatchStream, shard_rows, val_batches

    cfg = SyncNetConfig(
        batch_size=32, lr=1e-3, width=0.125, eval_windows_per_clip=32, shuffle_buffer=64,
        stuck_after_steps=STEPS, windows=WindowConfig(windows_per_clip=16),
    )  # fmt: skip
    setup = eh.job_setup(str(data), cfg)
    health = eh.Health(setup, cfg, rank=0)
    torch.manual_seed(0)
    model = build_model("syncnet", 96, cfg.width)
    optimizer = build_optimizer(model.parameters(), "adam", cfg.lr)
    scaler, amp, device = torch.amp.GradScaler("cuda", enabled=False), Amp(False), torch.device("cpu")
    stream = BatchStream(shard_rows(select(str(data), DataSelection(), "train")), cfg, "syncnet")
    val = val_batches(health.rows(), cfg, "syncnet")
    evaluations = []
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, scaler, amp, next(stream), device)
        if step % 20 == 0:
            model.eval()
            with torch.no_grad():
                losses = [(float(sync_batch_loss(model, b, device, amp)[0]), len(b["label"])) for b in val]
            metrics = {"val_loss": sum(a * n for a, n in losses) / sum(n for _, n in losses)}
            metrics.update(health.evaluate(model, step, metrics))
            evaluations.append(metrics)
    result = {"step": STEPS, "metrics": evaluations[-1]}
    return eh.job_summary(result, cfg, setup), evaluations, setup


@pytest.mark.slow
@pytest.mark.parametrize("offset", [8, 0])
def test_stuck_expert_warning_on_a_shifted_corpus_only(
    offset: int,
    ray_session,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,  # noqa: ANN001
) -> None:
    data = _corpus(tmp_path, offset)
    with caplog.at_level(logging.WARNING, logger="training.expert_health"):
        summary, evaluations, setup = _train(data)
    assert all(
        {"val_loss", "val_loss_recent", "offset_rank_mean", "offset_first_share"} <= set(e)
        for e in evaluations
    )
    if offset:
        assert setup["card"]["offset_share"] == 1.0  # the meter saw the 8 frames in every clip
        assert summary["val_loss_recent"] >= eh.STUCK_LOSS, evaluations  # measured: 0.700 (clean: 0.596)
        assert summary["warning"] and "100% of clips have |offset| > 1 frame" in summary["warning"]
        assert any("expert SyncNet is stuck" in r.getMessage() for r in caplog.records)
    else:
        assert setup["card"]["offset_share"] == 0.0
        assert summary["val_loss_recent"] < eh.STUCK_LOSS and summary["warning"] is None, evaluations
        assert not any("stuck" in r.getMessage() for r in caplog.records)

"""Train-window augmentation changes pixels and samples, never where a window's frames and mel lie, and never
touches validation windows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support.training import bursts, shard_row

from pipeline.audio import SAMPLE_RATE, melspectrogram
from training.augment import AugmentConfig, augment_audio, augmented_mel
from training.data import Augmenter, WindowConfig, WindowMaker, sync_samples, wav2lip_samples
from training.streams import BatchStream, val_batches
from training.wav2lip_job import Wav2LipConfig

PIXEL_CHANGES = {
    "brightness": 0.3,
    "contrast": 0.4,
    "saturation": 0.6,
    "hue": 20.0,
    "blur": 1.0,
    "jpeg": 1.0,
    "scale": 0.1,
    "shift": 0.08,
    "rotation": 10.0,
}
AUDIO_CHANGES = {"gain_db": 6.0, "noise": 1.0, "reverb": 1.0}
NOTHING = AugmentConfig(enabled=True, **dict.fromkeys(PIXEL_CHANGES | AUDIO_CHANGES, 0))
"""Augmentation on, every change off: each test turns one on."""


WINDOWS = WindowConfig(windows_per_clip=6, seed=5)


def generator_windows(cfg: AugmentConfig | None) -> list[dict]:
    aug = Augmenter(cfg, WINDOWS.seed, "clip") if cfg else None
    return wav2lip_samples(shard_row(), WINDOWS, 96, np.random.default_rng(1), aug)


@pytest.mark.parametrize("change", sorted(PIXEL_CHANGES))
def test_each_pixel_change_changes_pixels_and_not_the_windows_frames_or_mels(change: str) -> None:
    clean = generator_windows(None)
    changed = generator_windows(dataclasses.replace(NOTHING, **{change: PIXEL_CHANGES[change]}))
    assert [(s["start"], s["reference_start"]) for s in changed] == [
        (s["start"], s["reference_start"]) for s in clean
    ]
    for a, b in zip(clean, changed, strict=True):
        np.testing.assert_array_equal(a["mel"], b["mel"])
        np.testing.assert_array_equal(a["indiv_mels"], b["indiv_mels"])
        assert not np.array_equal(a["y"], b["y"]) and not np.array_equal(
            a["x"][3:], b["x"][3:]
        )  # + reference
    moved = float(
        np.mean([np.abs(a["y"].astype(int) - b["y"]).mean() for a, b in zip(clean, changed, strict=True)])
    )
    assert moved > 1.0, f"{change}: pixels moved by {moved:.2f} on average"


def test_target_and_reference_get_the_same_change() -> None:
    """A brightness change lifts the target and its reference window by the same amount."""
    clean = generator_windows(None)
    changed = generator_windows(dataclasses.replace(NOTHING, brightness=0.3))
    for a, b in zip(clean, changed, strict=True):
        lift_target = (b["y"].astype(float) - a["y"]).mean()
        lift_reference = (b["x"][3:].astype(float) - a["x"][3:]).mean()
        assert abs(lift_target) > 2 and lift_target == pytest.approx(lift_reference, abs=1.5)


def test_syncnet_positive_and_negative_share_their_changed_faces() -> None:
    cfg = dataclasses.replace(NOTHING, hue=20.0, brightness=0.3)
    clean = sync_samples(shard_row(), WINDOWS, 96, np.random.default_rng(2))
    changed = sync_samples(shard_row(), WINDOWS, 96, np.random.default_rng(2), Augmenter(cfg, 5, "clip"))
    assert [(s["start"], s["mel_start_frame"]) for s in changed] == [
        (s["start"], s["mel_start_frame"]) for s in clean
    ]
    for i in range(0, len(changed), 2):
        np.testing.assert_array_equal(changed[i]["faces"], changed[i + 1]["faces"])
        assert not np.array_equal(changed[i]["faces"], clean[i]["faces"])


def onsets(mel: np.ndarray) -> np.ndarray:
    """Where the energy rises (a reverberation's tail lengthens decays, not the rises of its direct path)."""
    rise = np.maximum(np.diff(mel.mean(axis=0)), 0)
    return (rise - rise.mean()) / (rise.std() + 1e-9)


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int = 8) -> int:
    """The lag (mel frames) at which b's envelope matches a's best."""
    score = {
        lag: float(np.dot(a[max_lag:-max_lag], np.roll(b, -lag)[max_lag:-max_lag]))
        for lag in range(-max_lag, max_lag + 1)
    }
    return max(score, key=score.get)


@pytest.mark.parametrize("change", sorted(AUDIO_CHANGES))
def test_each_audio_change_changes_samples_and_keeps_the_mel_in_place(change: str) -> None:
    cfg = dataclasses.replace(NOTHING, **{change: AUDIO_CHANGES[change]})
    pcm = bursts(4.0, seed=3)
    out = augment_audio(pcm, cfg, np.random.default_rng(4), SAMPLE_RATE)
    assert out.shape == pcm.shape and np.abs(out - pcm).mean() > 1e-3
    clean = melspectrogram(pcm)
    mel = augmented_mel(pcm, clean.shape[1], cfg, np.random.default_rng(4))
    assert mel.shape == clean.shape and np.abs(mel - clean).mean() > 0.05
    assert best_lag(onsets(clean), onsets(mel)) == 0


def test_audio_changes_reach_the_windows_mels_at_the_same_indices() -> None:
    """With the audio augmented, each window's mel is cut at the same mel frames of the augmented mel."""
    cfg = dataclasses.replace(NOTHING, **AUDIO_CHANGES)
    clean, changed = generator_windows(None), generator_windows(cfg)
    assert [s["start"] for s in changed] == [s["start"] for s in clean]
    assert all(not np.array_equal(a["mel"], b["mel"]) for a, b in zip(clean, changed, strict=True))
    for a, b in zip(clean, changed, strict=True):  # pixels untouched
        np.testing.assert_array_equal(a["y"], b["y"])


def test_with_every_change_off_the_mel_is_the_stored_one() -> None:
    row = shard_row()
    mel = Augmenter(dataclasses.replace(NOTHING, gain_db=1e-9), 0, "clip").mel(row)
    stored = np.frombuffer(row["mel"], "<f4").reshape(80, -1)
    np.testing.assert_allclose(mel, stored, atol=0.02)


def test_validation_windows_are_never_augmented() -> None:
    rows = [shard_row("a", 1), shard_row("b", 2)]
    base = Wav2LipConfig(batch_size=4, eval_windows_per_clip=4, shuffle_buffer=8, windows=WINDOWS)
    strong = dataclasses.replace(base, augment=AugmentConfig(enabled=True, strength=1.5, reverb=1.0))
    for a, b in zip(val_batches(rows, base, "wav2lip"), val_batches(rows, strong, "wav2lip"), strict=True):
        for key in a:
            assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    train_clean = next(BatchStream(rows, base, "wav2lip"))
    train_changed = next(BatchStream(rows, strong, "wav2lip"))
    assert not np.array_equal(train_clean["y"].numpy(), train_changed["y"].numpy())


def test_audio_augmentation_without_the_pcm_column_says_so() -> None:
    row = {k: v for k, v in shard_row().items() if k != "pcm"}
    maker = WindowMaker("wav2lip", WINDOWS, 96, dataclasses.replace(NOTHING, gain_db=3.0))
    assert "pcm" in maker.columns
    with pytest.raises(ValueError, match="clip clip: audio augmentation needs the shard's pcm column"):
        maker(row)
    assert WindowMaker("wav2lip", WINDOWS, 96, dataclasses.replace(NOTHING, hue=10.0))(
        row
    )  # pixels only: fine

"""The generator's reconstruction loss: whole-frame L1 (the reference's) or with the mouth box up-weighted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import BadInput
from training.devices import Amp
from training.wav2lip_job import MOUTH_BOX, Wav2LipConfig, generator_losses, reconstruction_loss, run

SIZE = 96


class Fixed(nn.Module):
    """A generator that paints the same frames whatever it is given."""

    def __init__(self, frames: torch.Tensor) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, mels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.frames


class Agreeing(nn.Module):
    """An expert that finds every window in sync (the sync loss plays no part here)."""

    def forward(self, mel: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(len(faces), 8)
        return ones, ones


def _batch() -> dict[str, torch.Tensor]:
    return {
        "x": torch.zeros(1, 6, 5, SIZE, SIZE, dtype=torch.uint8),
        "y": torch.zeros(1, 3, 5, SIZE, SIZE, dtype=torch.uint8),
        "indiv_mels": torch.zeros(1, 5, 1, 80, 16),
        "mel": torch.zeros(1, 1, 80, 16),
    }


def _painted(rows: slice, cols: slice) -> torch.Tensor:
    frames = torch.zeros(1, 3, 5, SIZE, SIZE)
    frames[..., rows, cols] = 1.0
    return frames


def _loss(frames: torch.Tensor, mouth_weight: float) -> float:
    _, losses = generator_losses(Fixed(frames), None, Agreeing(), _batch(), torch.device("cpu"), Amp(False))
    return float(reconstruction_loss(losses, mouth_weight))


def test_the_mouth_weight_makes_a_wrong_mouth_cost_more_than_as_many_wrong_pixels_elsewhere() -> None:
    (top, _), (left, _) = MOUTH_BOX
    row, col = int(top * SIZE) + 2, int(left * SIZE) + 2
    mouth = _painted(slice(row, row + 10), slice(col, col + 10))  # inside the mouth box
    forehead = _painted(slice(2, 12), slice(col, col + 10))  # as many pixels, in the upper half
    assert _loss(mouth, 0.0) == _loss(forehead, 0.0)  # the reference's L1 cannot tell them apart
    assert _loss(mouth, 2.0) > 3 * _loss(forehead, 2.0)
    assert _loss(forehead, 2.0) < _loss(forehead, 0.0)  # on the whole-frame L1's scale, not added on top


def test_a_perfect_frame_costs_nothing_with_any_weight() -> None:
    assert _loss(torch.zeros(1, 3, 5, SIZE, SIZE), 0.0) == 0.0
    assert _loss(torch.zeros(1, 3, 5, SIZE, SIZE), 5.0) == 0.0


def test_a_negative_mouth_weight_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="mouth_weight must be >= 0"):
        run(Wav2LipConfig(mouth_weight=-1.0), str(tmp_path / "data"), str(tmp_path / "out"), syncnet=None)
    assert not (tmp_path / "out").exists()


def test_a_tune_trial_with_a_negative_mouth_weight_is_refused_too(tmp_path: Path) -> None:
    from tuning.trial import TrialSetup, trial_config

    def setup(mouth_weight: float) -> TrialSetup:
        return TrialSetup("wav2lip", str(tmp_path), str(tmp_path), {"mouth_weight": mouth_weight}, 4, 2, 2)

    with pytest.raises(BadInput, match="mouth_weight must be >= 0"):
        trial_config(setup(-1.0), {})
    assert trial_config(setup(2.0), {}).mouth_weight == 2.0

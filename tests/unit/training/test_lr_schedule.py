"""`lr_schedule:` every optimiser of a recipe trains at the configured lr (constant) or on a cosine from it
down to 0 at the last step, set from the step alone (a resumed run continues on the same curve)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.config import from_dict
from core.errors import BadInput
from models.checkpoint import checkpoint_payload, save_checkpoint
from models.registry import build_model
from training.config import validate
from training.syncnet_job import SyncNetConfig, SyncNetRecipe
from training.wav2lip_job import Wav2LipConfig, Wav2LipRecipe

STEPS = 8


def lrs(recipe: SyncNetRecipe | Wav2LipRecipe, optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr `optimizer` holds after `schedule(step)` for each step of the run and the one after it."""
    out = []
    for step in range(STEPS + 1):
        recipe.schedule(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_constant_keeps_the_configured_lr() -> None:
    cfg = from_dict(SyncNetConfig, {"steps": STEPS, "lr": 3e-4, "width": 0.25})
    recipe = SyncNetRecipe(cfg, torch.device("cpu"))
    assert lrs(recipe, recipe.optimizer) == [3e-4] * (STEPS + 1)


def test_cosine_falls_from_the_lr_to_zero_at_the_last_step() -> None:
    cfg = from_dict(SyncNetConfig, {"steps": STEPS, "lr": 1e-3, "width": 0.25, "lr_schedule": "cosine"})
    recipe = SyncNetRecipe(cfg, torch.device("cpu"))
    got = lrs(recipe, recipe.optimizer)
    assert got[0] == pytest.approx(1e-3)
    assert got[STEPS // 2] == pytest.approx(5e-4)
    assert got[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(got, got[1:], strict=False)), got
    assert got[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / STEPS)))


def test_cosine_moves_the_generator_and_the_discriminator_each_from_its_own_lr(tmp_path: Path) -> None:
    expert = save_checkpoint(
        str(tmp_path / "expert"), checkpoint_payload(build_model("syncnet", 96, 0.25), "syncnet", 96, 0)
    )
    cfg = from_dict(
        Wav2LipConfig,
        {"steps": STEPS, "lr": 1e-3, "disc_lr": 2e-4, "width": 0.25, "gan": True, "lr_schedule": "cosine"},
    )
    recipe = Wav2LipRecipe(cfg, torch.device("cpu"), expert=expert)
    recipe.schedule(STEPS // 2)
    assert recipe.opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert recipe.disc_opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(BadInput, match="lr_schedule"):
        validate(from_dict(SyncNetConfig, {"lr_schedule": "linear"}))

"""A sweep searches augmentation strength and the language mix like any other key."""

from __future__ import annotations

import pytest

from core.config import from_dict, to_dict
from core.errors import BadInput
from training.augment import AugmentConfig
from training.wav2lip_job import Wav2LipConfig
from tuning.space import apply, validate_space


def test_augment_strength_and_balance_strength_reach_the_trials_config() -> None:
    validate_space(
        "wav2lip", {"augment_strength": {"uniform": [0.0, 1.5]}, "balance_strength": {"grid": [0.0, 1.0]}}
    )
    base = to_dict(Wav2LipConfig(augment=AugmentConfig(enabled=True), balance={"language": "uniform"}))
    trial = from_dict(Wav2LipConfig, apply(base, {"augment_strength": 0.7, "balance_strength": 0.0}))
    assert trial.augment.strength == pytest.approx(0.7) and trial.augment.enabled
    assert trial.balance_strength == 0.0 and trial.balance == {"language": "uniform"}


def test_a_mix_strength_outside_0_1_is_refused() -> None:
    with pytest.raises(BadInput, match="balance_strength"):
        validate_space("wav2lip", {"balance_strength": {"uniform": [0.0, 2.0]}})

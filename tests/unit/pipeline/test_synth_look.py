"""Held-out synth speakers: a look (skin tone, background, scale) unlike every training speaker's."""

from __future__ import annotations

import pytest

from core.errors import BadInput
from pipeline.synth import SynthConfig, plan, validate


def test_a_look_override_reaches_every_speaker(tmp_path) -> None:  # noqa: ANN001
    look = {"brightness": 0.6, "hue_shift": 25, "face_fraction": 0.3, "background": [40, 170, 60]}
    jobs = plan(SynthConfig(languages=("en", "es"), speakers=2, look=look), str(tmp_path))
    looks = {job.speaker.look for job in jobs}
    assert len(jobs) == 8 and len(looks) == 4  # each speaker keeps its own mirror, centre and saturation
    for got in looks:
        assert (got.brightness, got.hue_shift, got.face_fraction, got.background) == (
            0.6,
            25,
            0.3,
            (40, 170, 60),
        )
    plain = {
        job.speaker.look.brightness for job in plan(SynthConfig(languages=("en",), speakers=3), str(tmp_path))
    }
    assert 0.6 not in plain and len(plain) == 3


def test_an_unknown_look_key_is_refused() -> None:
    with pytest.raises(BadInput, match="look: unknown skin"):
        validate(SynthConfig(languages=("en",), look={"skin": 1}))

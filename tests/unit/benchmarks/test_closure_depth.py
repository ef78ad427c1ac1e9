"""benchmarks/closure_depth.py: a mouth that presses tighter in pauses than at its bilabials fails the
closure test on the clip's scale and passes on the speech frames' scale; one that closes as far at its
bilabials as in pauses passes on both."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from closure_depth import depth  # noqa: E402


def trace(pause: float, bilabial: float) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """100 frames: 20 of pause, then speech opening 0.14-0.20 with a bilabial every 10 frames, 20 of pause."""
    openness = np.full(100, pause)
    speech = 0.14 + 0.06 * np.abs(np.sin(np.arange(60) / 3.0))
    openness[20:80] = speech
    spans = [("open", 20, 80)]
    for start in range(24, 80, 10):
        openness[start : start + 2] = bilabial
        spans.append(("bilabial", start, start + 2))
    return openness, spans


def test_pauses_tighter_than_bilabials_set_the_clip_scale() -> None:
    figures = depth(*trace(pause=0.05, bilabial=0.12), closed_below=0.35)
    assert figures["n_bilabial"] == 6
    assert figures["pause_share"] == 0.4
    assert figures["clip_p5"] == 0.05 and figures["speech_p5"] == 0.12
    assert figures["closed_clip_scale"] == 0.0  # 0.12 is far above the pauses' 0.05 on the clip's scale
    assert figures["closed_speech_scale"] == 1.0


def test_bilabials_as_closed_as_pauses_pass_on_both_scales() -> None:
    figures = depth(*trace(pause=0.12, bilabial=0.12), closed_below=0.35)
    assert figures["closed_clip_scale"] == figures["closed_speech_scale"] == 1.0
    assert figures["pause_median"] == figures["bilabial_min_median"] == 0.12

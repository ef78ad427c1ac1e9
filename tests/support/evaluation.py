"""Evaluation: the LSE protocol, model-free sync, quality measures, scoring at scale and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.media import write_video


def _faceless_video(path: Path) -> Path:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(40, 128, 128, 3), dtype=np.uint8)
    audio = (0.2 * rng.normal(size=16000 * 40 // 25)).astype(np.float32)
    write_video(str(path), frames, 25.0, audio=audio)
    return path

"""Synthetic face clips for tracking and cropping tests."""

from __future__ import annotations

import numpy as np
from skimage import data


def moving_clip(n: int = 20) -> np.ndarray:
    """The 512x512 astronaut on a black 640x720 canvas, moving (3, 1.5) px per frame."""
    img = data.astronaut()
    frames = np.zeros((n, 640, 720, 3), np.uint8)
    for t in range(n):
        x, y = 40 + 3 * t, 50 + (3 * t) // 2
        frames[t, y : y + 512, x : x + 512] = img
    return frames

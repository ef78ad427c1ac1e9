"""Frames as the networks take them: BGR crops at the model's size, SyncNet's stacked lower halves, the
generator's masked window. numpy and OpenCV only, so data workers cut windows without importing torch."""

from __future__ import annotations

import cv2
import numpy as np

SYNC_FRAMES = 5
"""Frames per window (SyncNet's T; kept here so data workers need not import torch)."""

CHANNEL_ORDER = "bgr"
"""Channel order of face tensors fed to the models (the reference's cv2 order)."""


def to_model_frames(frames_rgb: np.ndarray, img_size: int) -> np.ndarray:
    """RGB crops (T, S, S, 3) → the models' BGR (T, img_size, img_size, 3) uint8, resized if needed."""
    frames = frames_rgb[..., ::-1]
    if frames.shape[1] != img_size:
        frames = np.stack([cv2.resize(f, (img_size, img_size), interpolation=cv2.INTER_AREA) for f in frames])
    return np.ascontiguousarray(frames)


def sync_faces(window: np.ndarray) -> np.ndarray:
    """(5, H, W, 3) frames → SyncNet's (15, H/2, W): channels frame-major (3·i + c), lower half only."""
    t, h, w, c = window.shape
    stacked = window.transpose(0, 3, 1, 2).reshape(t * c, h, w)
    return np.ascontiguousarray(stacked[:, h // 2 :])


def masked_window(window: np.ndarray) -> np.ndarray:
    """(5, H, W, 3) frames → (3, 5, H, W) with the lower half zeroed (what the generator must paint)."""
    x = window.transpose(3, 0, 1, 2).copy()
    x[:, :, x.shape[2] // 2 :] = 0
    return x

"""Shard rows as preprocessing writes them, built in memory for the window tests."""

from __future__ import annotations

import numpy as np

from pipeline.audio import SAMPLE_RATE, melspectrogram
from pipeline.shards import encode_jpegs

FPS, N_FRAMES = 25.0, 50


def bursts(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like PCM: noise bursts of random lengths and levels, so the energy envelope has one alignment."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    envelope = np.zeros(n, np.float32)
    at = 0
    while at < n:
        length = int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
        envelope[at : at + length] = rng.uniform(0.05, 0.5)
        at += length + int(rng.uniform(0.05, 0.25) * SAMPLE_RATE)
    return (rng.standard_normal(n).astype(np.float32) * envelope).clip(-1, 1)


def shard_row(clip_id: str = "clip", seed: int = 0, green: int = 128) -> dict:
    """A shard row as preprocessing writes it: textured face crops, PCM, and the mel of that PCM."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(40, 220, (N_FRAMES, 96, 96, 3), dtype=np.uint8)
    frames[..., 1] = green
    pcm = bursts(N_FRAMES / FPS, seed)
    mel = melspectrogram(pcm)
    return {
        "clip_id": clip_id,
        "crops": encode_jpegs(frames),
        "pcm": np.round(pcm * 32767).astype("<i2").tobytes(),
        "mel": mel.astype("<f4").tobytes(),
        "mel_frames": mel.shape[1],
        "n_frames": N_FRAMES,
        "fps": FPS,
        "av_offset_frames": 0,
    }

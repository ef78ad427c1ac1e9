"""Which source frames a chunk uses: at each output frame when the audio outlasts the video (extension:
ping-pong by default, loop or freeze; shorter audio simply trims), and as each face crop's reference."""

from __future__ import annotations

import numpy as np

EXTENSION_MODES = ("pingpong", "loop", "freeze")


def source_indices(start: int, count: int, n_source: int, mode: str = "pingpong") -> np.ndarray:
    """Source frame shown at output frames start..start+count-1 of a video of `n_source` frames.

    "pingpong" plays forwards, backwards, forwards... without repeating the turning frames; "loop"
    restarts; "freeze" holds the last frame. Output frames inside the source map to themselves.
    """
    if n_source <= 0:
        raise ValueError(f"n_source must be positive, got {n_source}")
    if mode not in EXTENSION_MODES:
        raise ValueError(f"extension mode must be one of {EXTENSION_MODES}, got {mode!r}")
    j = np.arange(start, start + count, dtype=np.int64)
    if mode == "freeze":
        return np.minimum(j, n_source - 1)
    if mode == "loop" or n_source == 1:
        return j % n_source
    period = 2 * (n_source - 1)
    r = j % period
    return np.where(r < n_source, r, period - r)


def frames_for_audio(n_samples: int, sample_rate: int, fps: float) -> int:
    """Output frames for audio of `n_samples`: the audio's duration at `fps`, rounded."""
    return int(round(n_samples / sample_rate * fps))


def fit_length(pcm: np.ndarray, n_samples: int) -> np.ndarray:
    """PCM trimmed or zero-padded to exactly `n_samples`."""
    if len(pcm) >= n_samples:
        return pcm[:n_samples]
    return np.concatenate([pcm, np.zeros(n_samples - len(pcm), pcm.dtype)])


def reference_positions(source_index: np.ndarray, cuts: list[int], mode: str = "same") -> np.ndarray:
    """For each face crop of a chunk (their source frames `source_index`, in order), the position of the
    crop the generator gets as its reference. same: itself. shifted: within each run of crops from one shot
    (`cuts`: source frames that start a shot), the crop half the run away, wrapping around, so consecutive
    frames get consecutive references and none comes from another shot."""
    n = len(source_index)
    positions = np.arange(n)
    if mode == "same" or n < 2:
        return positions
    shot = np.searchsorted(np.asarray(sorted(cuts), np.int64), source_index, side="right")
    starts = np.flatnonzero(np.r_[True, shot[1:] != shot[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], n], strict=True):
        length = b - a
        positions[a:b] = a + (np.arange(length) + length // 2) % length
    return positions

"""Wav2Lip's audio features: the normalised log-mel spectrogram and the per-video-frame mel windows.

The numbers are the reference's (Rudrabha/Wav2Lip `hparams.py` / `audio.py`): 16 kHz, pre-emphasis 0.97,
STFT n_fft 800 / hop 200 / win 800, 80 Slaney mels over 55-7600 Hz, dB with ref 20 and floor -100,
scaled symmetrically to [-4, 4] with clipping. That gives 80 mel frames per second: 3.2 per video frame
at 25 fps, and a 16-frame window covers 0.2 s (5 video frames at 25 fps).

Differences from the reference, on purpose:
- The signal is reflect-padded by n_fft // 2 at both ends, as `librosa.stft(center=True)` did by default
  when Wav2Lip was trained (librosa 0.7; 0.10 switched to zero padding, which would change the first and
  last two mel frames). The padding is built per STFT block, so memory does not grow with the length.
- Window start indices. Inference (`int(i * 80. / fps)`) and training (`crop_audio_window`) use the same
  formula, but training's `get_segmented_mels` turns a window starting at video frame `s` into `s + 1`
  ("0-indexing to 1-indexing") and then crops at `i - 2`, so the mel for frame `s` starts at frame
  `s - 1`: one video frame (3.2 mel frames at 25 fps) earlier than at inference. Here one function, with
  the same start `int(80 * (frame + offset_frames) / fps)`, serves training, inference and scoring;
  `offset_frames` makes any deliberate shift explicit.
- At the ends the reference's inference reuses the last full window and its training drops the sample;
  we pad by repeating the edge mel frames, so every video frame gets a window and none is dropped.
"""

from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 800
HOP_SIZE = 200
WIN_SIZE = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SIZE  # 80
MEL_STEP_SIZE = 16  # mel frames per window (0.2 s)
MEL_BLOCK_FRAMES = 2000  # mel frames per STFT block (25 s of audio)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """The (80, 401) Slaney mel filter bank (librosa), built once per process."""
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)


def mel_frequencies() -> np.ndarray:
    """Centre frequencies (Hz) of the 80 mel bins."""
    return librosa.mel_frequencies(n_mels=N_MELS + 2, fmin=FMIN, fmax=FMAX)[1:-1]


def _reflect(index: np.ndarray, length: int) -> np.ndarray:
    """Indices past either end mirrored back into [0, length), as numpy's pad mode "reflect" does."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index < length, index, period - index)


def _padded_preemphasis(wav: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of the pre-emphasised signal (y[n] = x[n] - 0.97 x[n-1]) reflect-padded by
    n_fft // 2 at both ends, i.e. what `librosa.stft(center=True, pad_mode="reflect")` frames, for one block."""
    index = _reflect(np.arange(start, stop) - N_FFT // 2, len(wav))
    current = wav[index].astype(np.float64)
    previous = np.where(index > 0, wav[np.maximum(index - 1, 0)], 0.0)
    return current - PREEMPHASIS * previous


def _amp_to_db(x: np.ndarray) -> np.ndarray:
    min_level = np.exp(MIN_LEVEL_DB / 20.0 * np.log(10.0))
    return 20.0 * np.log10(np.maximum(min_level, x))


def _normalize(db: np.ndarray) -> np.ndarray:
    scaled = (2.0 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel spectrogram of 16 kHz mono PCM: (80, 1 + len(wav) // 200) float32.

    Computed in blocks of MEL_BLOCK_FRAMES, equal to the whole signal at once (tests/test_audio.py): for
    3 minutes of audio the float64 STFT at once peaked at 163 MB (tracemalloc), which the workers'
    allocator then keeps; in blocks the peak is 32 MB, the 4.6 MB result included.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if len(wav) == 0:
        return np.full((N_MELS, 1), -MAX_ABS_VALUE, dtype=np.float32)
    n_frames = 1 + len(wav) // HOP_SIZE
    mel = np.empty((N_MELS, n_frames), dtype=np.float32)
    for first in range(0, n_frames, MEL_BLOCK_FRAMES):
        last = min(n_frames, first + MEL_BLOCK_FRAMES)
        block = _padded_preemphasis(wav, first * HOP_SIZE, (last - 1) * HOP_SIZE + N_FFT)
        stft = librosa.stft(y=block, n_fft=N_FFT, hop_length=HOP_SIZE, win_length=WIN_SIZE, center=False)
        mel[:, first:last] = _normalize(_amp_to_db(mel_basis() @ np.abs(stft)) - REF_LEVEL_DB)
    return mel


def frames_to_mel_length(n_frames: int, fps: float = 25.0) -> int:
    """Mel frames `melspectrogram` returns for exactly `n_frames / fps` seconds of 16 kHz audio."""
    return 1 + int(round(n_frames * SAMPLE_RATE / fps)) // HOP_SIZE


def mel_start_indices(frame_indices: np.ndarray, fps: float = 25.0, offset_frames: int = 0) -> np.ndarray:
    """Mel window start for each video frame: int(80 * (frame + offset_frames) / fps)."""
    position = MEL_FRAMES_PER_SECOND * (np.asarray(frame_indices, dtype=np.float64) + offset_frames) / fps
    return np.trunc(position).astype(np.int64)


def mel_windows(
    mel: np.ndarray,
    n_frames: int,
    fps: float = 25.0,
    width: int = MEL_STEP_SIZE,
    offset_frames: int = 0,
) -> np.ndarray:
    """The (n_frames, 80, width) mel windows of video frames 0..n_frames-1, edge-padded at both ends.

    Window `i` starts at `int(80 * (i + offset_frames) / fps)`; the same start is used for training,
    inference and scoring (the reference's training windows start one video frame earlier; see module doc).
    """
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[1] == 0:
        raise ValueError(f"mel must be (n_mels, T) with T > 0, got {mel.shape}")
    starts = mel_start_indices(np.arange(n_frames), fps, offset_frames)
    columns = np.clip(starts[:, None] + np.arange(width)[None, :], 0, mel.shape[1] - 1)
    return np.ascontiguousarray(mel[:, columns].transpose(1, 0, 2))


def mel_window(
    mel: np.ndarray, frame_index: int, fps: float = 25.0, width: int = MEL_STEP_SIZE, offset_frames: int = 0
) -> np.ndarray:
    """The (80, width) mel window of one video frame; same indexing and edge padding as `mel_windows`."""
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[1] == 0:
        raise ValueError(f"mel must be (n_mels, T) with T > 0, got {mel.shape}")
    start = int(mel_start_indices(np.array([frame_index]), fps, offset_frames)[0])
    columns = np.clip(np.arange(start, start + width), 0, mel.shape[1] - 1)
    return mel[:, columns]

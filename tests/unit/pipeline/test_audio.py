"""pipeline.audio: Wav2Lip's mel features and per-frame mel windows."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from pipeline import audio

SR = audio.SAMPLE_RATE


def _tone(freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("n_frames", [1, 5, 25, 77])
def test_mel_length_is_3_2_per_video_frame(n_frames: int) -> None:
    mel = audio.melspectrogram(_tone(440, n_frames / 25))
    assert mel.shape[0] == 80 and mel.dtype == np.float32
    assert abs(mel.shape[1] - 3.2 * n_frames) <= 1
    assert mel.shape[1] == audio.frames_to_mel_length(n_frames, 25.0)
    assert audio.MEL_FRAMES_PER_SECOND == 80


def _reference_mel(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.py on the whole signal at once: lfilter pre-emphasis, librosa.stft reflect-padded."""
    from scipy import signal

    emphasised = signal.lfilter([1.0, -0.97], [1.0], wav)
    stft = librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    mel = librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55.0, fmax=7600.0) @ np.abs(stft)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - 20.0
    return np.clip(8.0 * ((db + 100.0) / 100.0) - 4.0, -4.0, 4.0)


@pytest.mark.filterwarnings("ignore:n_fft=.* is too large")
@pytest.mark.parametrize("samples", [1, 150, 401, 799, 1000, 16000])
def test_mel_of_short_signals_equals_the_reference(samples: int) -> None:
    wav = np.random.default_rng(samples).uniform(-0.8, 0.8, samples).astype(np.float32)
    np.testing.assert_allclose(audio.melspectrogram(wav), _reference_mel(wav), atol=1e-4)


def test_mel_computed_in_blocks_equals_the_whole_signal_at_once() -> None:
    samples = (2 * audio.MEL_BLOCK_FRAMES + 321) * audio.HOP_SIZE + 77  # two block edges and a ragged end
    rng = np.random.default_rng(1)
    wav = (_tone(220, samples / SR) + rng.normal(0, 0.05, samples)).astype(np.float32)
    mel = audio.melspectrogram(wav)
    assert mel.shape[1] > 2 * audio.MEL_BLOCK_FRAMES
    np.testing.assert_allclose(mel, _reference_mel(wav), atol=1e-4)


def test_silence_is_the_floor() -> None:
    assert (audio.melspectrogram(np.zeros(SR, np.float32)) == -4.0).all()


def test_values_stay_within_max_abs_value() -> None:
    noise = np.random.default_rng(0).uniform(-1, 1, SR).astype(np.float32)
    mel = audio.melspectrogram(noise)
    assert mel.min() >= -4.0 and mel.max() <= 4.0 and mel.max() > 0


def test_1khz_tone_peaks_in_the_nearest_mel_bin() -> None:
    mel = audio.melspectrogram(_tone(1000, 1.0))
    # filter k of librosa's bank rises from edge k, peaks at edge k+1 and falls to edge k+2
    centres = librosa.mel_frequencies(n_mels=80 + 2, fmin=55, fmax=7600)[1:-1]
    np.testing.assert_allclose(audio.mel_frequencies(), centres)
    assert mel[:, 4:-4].mean(axis=1).argmax() == np.abs(centres - 1000).argmin()


def _index_mel(n_columns: int) -> np.ndarray:
    """A mel whose every value is its own column index."""
    return np.tile(np.arange(n_columns, dtype=np.float32), (80, 1))


@pytest.mark.parametrize(
    ("fps", "frame", "offset", "start"),
    [(25.0, 0, 0, 0), (25.0, 5, 0, 16), (25.0, 1, 0, 3), (25.0, 0, 1, 3), (30.0, 3, 0, 8), (30.0, 4, 0, 10)],
)
def test_mel_window_start_index(fps: float, frame: int, offset: int, start: int) -> None:
    window = audio.mel_window(_index_mel(200), frame, fps=fps, offset_frames=offset)
    assert window.shape == (80, 16)
    np.testing.assert_array_equal(window[0], np.arange(start, start + 16))


def test_mel_window_pads_with_edge_frames() -> None:
    mel = _index_mel(33)  # 10 frames at 25 fps (1 + 6400 // 200)
    last = audio.mel_window(mel, 9, fps=25.0)  # starts at 28: columns 28..32, then 32 repeated
    np.testing.assert_array_equal(last[0], [28, 29, 30, 31, 32] + [32] * 11)
    first = audio.mel_window(mel, 0, fps=25.0, offset_frames=-2)  # starts at -6
    np.testing.assert_array_equal(first[0], [0] * 7 + list(range(1, 10)))


@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_mel_windows_match_mel_window(fps: float) -> None:
    n_frames = 20
    mel = audio.melspectrogram(_tone(300, n_frames / fps))
    windows = audio.mel_windows(mel, n_frames, fps=fps, offset_frames=1)
    assert windows.shape == (n_frames, 80, 16) and windows.dtype == np.float32
    for i in range(n_frames):
        np.testing.assert_array_equal(windows[i], audio.mel_window(mel, i, fps=fps, offset_frames=1))


def test_mel_windows_interior_equals_plain_slices() -> None:
    mel = audio.melspectrogram(_tone(300, 2.0))
    windows = audio.mel_windows(mel, 40, fps=25.0)
    for i in (0, 7, 39):
        start = int(80 * i / 25)
        np.testing.assert_array_equal(windows[i], mel[:, start : start + 16])

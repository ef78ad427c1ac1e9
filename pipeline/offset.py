"""Model-free audio-video offset: mouth openness from landmarks against the audio's band energies.

Sign convention (DESIGN.md): `offset_frames > 0` means the audio lags the video — the sound arrives k
frames after the mouth movement; fixing it means advancing the audio by k frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d


@dataclass(frozen=True)
class OffsetEstimate:
    """The lag with the best correlation, its confidence and the whole correlation curve."""

    offset_frames: int
    confidence: float  # peak correlation minus the median over all lags (SyncNet's LSE-C idea)
    peak_correlation: float
    correlations: tuple[float, ...]  # for lags -max_lag..max_lag

    def to_dict(self) -> dict[str, float | int]:
        return {
            "offset_frames": self.offset_frames,
            "confidence": round(self.confidence, 4),
            "peak_correlation": round(self.peak_correlation, 4),
        }


def audio_envelope(pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """Log RMS energy of the audio in each video frame's time span (frame i covers [i/fps, (i+1)/fps))."""
    pcm = np.asarray(pcm, dtype=np.float32)
    edges = np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(int)
    edges = np.clip(edges, 0, len(pcm))
    power = np.concatenate([[0.0], np.cumsum(pcm.astype(np.float64) ** 2)])
    counts = np.maximum(edges[1:] - edges[:-1], 1)
    rms = np.sqrt((power[edges[1:]] - power[edges[:-1]]) / counts)
    return np.log(rms + 1e-4).astype(np.float32)


def _prepare(signal: np.ndarray, detrend_frames: int) -> np.ndarray:
    """Fill gaps, remove slow trends (head motion, loudness drift) and z-score."""
    x = np.asarray(signal, dtype=np.float64).copy()
    bad = ~np.isfinite(x)
    if bad.all():
        return np.zeros_like(x)
    if bad.any():
        idx = np.arange(len(x))
        x[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    if detrend_frames > 1 and len(x) > detrend_frames:
        x = x - uniform_filter1d(x, size=detrend_frames, mode="nearest")
    std = x.std()
    return (x - x.mean()) / std if std > 1e-9 else np.zeros_like(x)


def lagged_correlations(mouth: np.ndarray, audio: np.ndarray, max_lag: int) -> np.ndarray:
    """Pearson correlation of mouth(t) with audio(t + lag) for lag in -max_lag..max_lag (overlap only)."""
    n = min(len(mouth), len(audio))
    out = np.zeros(2 * max_lag + 1)
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        a = mouth[max(0, -lag) : n - max(0, lag)]
        b = audio[max(0, lag) : n - max(0, -lag)]
        if len(a) < 8 or a.std() < 1e-9 or b.std() < 1e-9:
            continue
        out[i] = float(np.corrcoef(a, b)[0, 1])
    return out


def band_energies(
    pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float, n_bands: int = 4
) -> np.ndarray:
    """(n_frames, n_bands) log mel-band energies of the audio under each video frame (any fps)."""
    import librosa

    pcm = np.asarray(pcm, dtype=np.float32)
    hop = max(1, sample_rate // 100)  # 10 ms columns, averaged per video frame
    if len(pcm) < 2 * hop:
        return np.zeros((n_frames, n_bands), np.float32)
    power = librosa.feature.melspectrogram(
        y=pcm,
        sr=sample_rate,
        n_fft=4 * hop,
        hop_length=hop,
        n_mels=n_bands,
        fmin=80.0,
        fmax=min(7000.0, sample_rate / 2),
    )
    column_frame = np.floor(np.arange(power.shape[1]) * hop / sample_rate * fps).astype(int)
    sums = np.zeros((n_frames, n_bands))
    counts = np.zeros(n_frames)
    keep = column_frame < n_frames
    np.add.at(sums, column_frame[keep], power[:, keep].T)
    np.add.at(counts, column_frame[keep], 1)
    mean = sums / np.maximum(counts, 1)[:, None]
    return np.log(mean + 1e-8).astype(np.float32)


def _ridge_fit_correlation(target: np.ndarray, features: np.ndarray, ridge: float) -> float:
    """Correlation between `target` and its ridge-regression fit from standardised `features`."""
    x = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    y = target - target.mean()
    if len(y) < 8 or y.std() < 1e-9:
        return 0.0
    coef = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)
    fit = x @ coef
    return float(np.corrcoef(fit, y)[0, 1]) if fit.std() > 1e-9 else 0.0


def lagged_fits(mouth: np.ndarray, bands: np.ndarray, max_lag: int, ridge: float = 0.5) -> np.ndarray:
    """For lag in -max_lag..max_lag: how well audio bands at t + lag linearly predict mouth(t)."""
    n = min(len(mouth), len(bands))
    out = np.zeros(2 * max_lag + 1)
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        a = mouth[max(0, -lag) : n - max(0, lag)]
        b = bands[max(0, lag) : n - max(0, -lag)]
        out[i] = _ridge_fit_correlation(a, b, ridge)
    return out


def estimate_offset(
    mouth_openness: np.ndarray,
    pcm: np.ndarray,
    sample_rate: int,
    fps: float,
    max_lag: int = 15,
    detrend_seconds: float = 4.0,
    n_bands: int = 6,
) -> OffsetEstimate:
    """AV offset of a clip from its per-frame mouth openness and its audio (NaN openness = no face).

    For each lag, a ridge regression from a few log mel-band energies of the audio (at t + lag) to the
    mouth opening (at t) is fitted; the lag whose fit correlates best is the offset. Several bands make it
    robust to background noise and to which band carries the speaker's energy, where one loudness
    envelope fails on real clips. Confidence = best fit minus the median over lags.
    """
    n = len(mouth_openness)
    window = max(3, int(round(detrend_seconds * fps)))
    mouth = _prepare(mouth_openness, window)
    bands = band_energies(pcm, sample_rate, n, fps, n_bands)
    corr = lagged_fits(mouth, bands, max_lag)
    best = int(np.argmax(corr))
    return OffsetEstimate(
        offset_frames=best - max_lag,
        confidence=float(corr[best] - np.median(corr)),
        peak_correlation=float(corr[best]),
        correlations=tuple(float(c) for c in corr),
    )


def offset_of_video(path: str, fps: float = 25.0, max_lag: int = 15, tracker=None) -> OffsetEstimate:  # noqa: ANN001
    """Decode one video (any fps, local or URI), track the face and estimate its AV offset."""
    from pipeline.landmarks import FaceMeshTracker, mouth_openness, smooth_landmarks
    from pipeline.media import local_path, probe, read_audio, read_frames

    with local_path(path) as local:
        probe(local)
        frames = read_frames(local, fps=fps)
        pcm = read_audio(local, 16000)
    tracker = tracker or FaceMeshTracker(max_faces=1)
    track = tracker.track(frames, fps=fps)
    if not track.found.any():
        from pipeline.media import MediaError

        raise MediaError("no_face", path, "no face in any frame")
    openness = mouth_openness(smooth_landmarks(track.landmarks, track.found))
    return estimate_offset(openness, pcm, 16000, fps, max_lag=max_lag)

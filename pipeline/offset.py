"""The model-free AV-sync meter: lip shape against the audio's spectrum, lag by lag.

Sign convention (DESIGN.md): `offset_frames > 0` means the audio lags the video — the sound arrives k
frames after the mouth movement; fixing it means advancing the audio by k frames.

How it measures (at 25 frames per second; other rates are resampled to it and the answer converted back):

1. Per frame, the lip shape (:func:`pipeline.landmarks.lip_shape`: 27 size- and pose-free measures) and
   the audio (16 log mel bands over 80-7600 Hz, log energy and positive spectral flux, 10 ms columns
   averaged per frame). Frames without a face, and frames without audio (before a delayed stream starts,
   after it ends, digital silence), are left out of every correlation.
2. Both are band-passed to 0.5-8 Hz (the rate of syllables and mouth gestures; slower drifts of head pose
   and loudness and faster landmark jitter go) and standardised per clip.
3. Each frame is stacked with its two neighbours on either side and projected onto three pairs of
   directions, one for the lips and one for the audio, that a regularised canonical correlation analysis
   found to move together in in-sync speech (:class:`SyncProjection`, fitted on real clips of several
   languages by ``benchmarks/offset.py --write-projection``). A fixed projection has no per-clip
   parameters to fit, so a wrong lag cannot win by overfitting a short clip.
4. For every lag the projected lips at t are correlated with the projected audio at t + lag over the same
   frames for every lag; the lag with the highest correlation is the offset.
5. Confidence is how far that peak stands above the lags more than two frames from it, in standard
   deviations of those lags. Below the threshold (calibrated leave-one-clip-out on the development clips)
   the meter abstains: it still names its best lag, but says it does not trust it. A peak at the edge of
   the searched range, a clip without a face or speech, and a clip too short to compare lags are
   abstentions with their reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

METER_FPS = 25.0  # the rate the projection was fitted at; other rates are resampled to it
DEFAULT_MIN_CONFIDENCE = 3.1  # leave-one-clip-out on the development clips: 2.8-3.2 per fold
MIN_SECONDS = 1.0  # shorter clips are not measured
MIN_SUPPORT_FRAMES = 25  # frames every lag is compared over, at least
EDGE_FRAMES = 3  # lags searched beyond max_lag, so that a peak at max_lag is a real peak
SPEECH_DBFS = -45.0  # frames whose RMS is above this count as sound
MIN_SPEECH_FRACTION = 0.1
PROJECTION_FILE = os.path.join(os.path.dirname(__file__), "sync_projection.json")

# Abstention reasons
NO_FACE = "no_face"
NO_SPEECH = "no_speech"
TOO_SHORT = "too_short"
LOW_CONFIDENCE = "low_confidence"
AT_EDGE = "peak_at_edge"


@dataclass(frozen=True)
class OffsetEstimate:
    """A meter's reading of one clip: its best lag, how sure it is, and whether it abstains.

    `correlations` is the curve over lags -curve_max_lag..curve_max_lag in frames of `curve_fps` (the
    meter's own rate, which can differ from the clip's). `offset_frames` is in the clip's frames.
    """

    offset_frames: int
    confidence: float
    peak_correlation: float = 0.0
    correlations: tuple[float, ...] = ()
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    reason: str = ""  # why the meter abstains ("" when it does not)
    meter: str = "landmarks"
    curve_fps: float = METER_FPS

    @property
    def abstained(self) -> bool:
        """True when the meter does not trust its own reading."""
        return bool(self.reason)

    @property
    def confident(self) -> bool:
        """The opposite of :attr:`abstained`: a reading to act on."""
        return not self.reason

    @property
    def curve_max_lag(self) -> int:
        return (len(self.correlations) - 1) // 2

    def to_dict(self, curve: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "offset_frames": self.offset_frames,
            "confidence": round(self.confidence, 4),
            "peak_correlation": round(self.peak_correlation, 4),
            "abstained": self.abstained,
            "reason": self.reason,
            "min_confidence": self.min_confidence,
            "meter": self.meter,
        }
        if curve:
            lags = range(-self.curve_max_lag, self.curve_max_lag + 1)
            out["curve"] = {
                "fps": self.curve_fps,
                "lags": list(lags),
                "values": [round(c, 5) for c in self.correlations],
            }
        return out


def abstention(reason: str, meter: str = "landmarks", min_confidence: float = 0.0) -> OffsetEstimate:
    """An estimate that carries no reading, only why."""
    return OffsetEstimate(0, 0.0, reason=reason, meter=meter, min_confidence=min_confidence)


# --- features ---------------------------------------------------------------------------------------------
def _fill_missing(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Rows where `ok` is False replaced by interpolation over time (the ends by the nearest row)."""
    x = np.array(x, np.float64, copy=True)
    if ok.all() or not ok.any():
        return x
    t = np.arange(len(x))
    for j in range(x.shape[1]):
        x[~ok, j] = np.interp(t[~ok], t[ok], x[ok, j])
    return x


def _band_pass(x: np.ndarray, low_hz: float, high_hz: float, fps: float) -> np.ndarray:
    """Zero-phase 2nd-order Butterworth band-pass along time (columns)."""
    from scipy.signal import butter, sosfiltfilt  # here: scipy.signal costs ~0.8 s to import (core.ray)

    sos = butter(2, [low_hz / (fps / 2), high_hz / (fps / 2)], btype="band", output="sos")
    if len(x) <= 3 * (2 * len(sos) + 1):  # sosfiltfilt's padding needs a few frames
        return x - x.mean(axis=0)
    return sosfiltfilt(sos, x, axis=0)


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    std[std < 1e-9] = 1.0
    return (x - x.mean(axis=0)) / std


def _with_context(x: np.ndarray, context: int) -> np.ndarray:
    """(T, F) -> (T, F * (2 context + 1)): each frame beside its neighbours (edges repeated)."""
    if context == 0:
        return x
    n = len(x)
    padded = np.pad(x, ((context, context), (0, 0)), mode="edge")
    return np.concatenate([padded[i : i + n] for i in range(2 * context + 1)], axis=1)


def audio_frames_present(pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """(n_frames,) bool: the frame's span lies inside the PCM and is not digital silence."""
    edges = np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(int)
    nonzero = np.concatenate([[0], np.cumsum(np.abs(np.asarray(pcm)) > 1e-6)])
    ends = np.minimum(edges, len(pcm))
    return (edges[1:] <= len(pcm)) & (nonzero[ends[1:]] - nonzero[ends[:-1]] > 0)


def frame_dbfs(pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """RMS level of each frame's audio in dBFS (-inf-like -200 where silent or beyond the PCM)."""
    return 20 / np.log(10) * audio_envelope(pcm, sample_rate, n_frames, fps, floor=1e-10).astype(np.float64)


def sync_audio_features(
    pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float, n_mels: int = 16
) -> np.ndarray:
    """(n_frames, n_mels + 2): log mel bands, log energy and positive spectral flux per video frame."""
    import librosa

    hop = max(1, sample_rate // 100)
    need = int(np.ceil(n_frames / fps * sample_rate)) + 4 * hop
    pcm = np.asarray(pcm, np.float32)
    if len(pcm) < need:
        pcm = np.concatenate([pcm, np.zeros(need - len(pcm), np.float32)])
    power = librosa.feature.melspectrogram(
        y=pcm,
        sr=sample_rate,
        n_fft=4 * hop,
        hop_length=hop,
        n_mels=n_mels,
        fmin=80.0,
        fmax=min(7600.0, sample_rate / 2),
    )
    log_power = np.log(power + 1e-6)
    columns = np.concatenate(
        [
            log_power,
            np.log(power.sum(axis=0) + 1e-6)[None],
            np.maximum(np.diff(log_power, axis=1, prepend=log_power[:, :1]), 0).mean(axis=0)[None],
        ]
    )
    frame_of = np.floor(np.arange(power.shape[1]) * hop / sample_rate * fps).astype(int)
    keep = frame_of < n_frames
    sums = np.zeros((n_frames, columns.shape[0]))
    counts = np.zeros(n_frames)
    np.add.at(sums, frame_of[keep], columns[:, keep].T)
    np.add.at(counts, frame_of[keep], 1)
    return sums / np.maximum(counts, 1)[:, None]


def audio_envelope(
    pcm: np.ndarray, sample_rate: int, n_frames: int, fps: float, floor: float = 1e-4
) -> np.ndarray:
    """Log RMS energy of the audio in each video frame's time span (frame i covers [i/fps, (i+1)/fps))."""
    pcm = np.asarray(pcm, dtype=np.float32)
    edges = np.clip(np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(int), 0, len(pcm))
    power = np.concatenate([[0.0], np.cumsum(pcm.astype(np.float64) ** 2)])
    counts = np.maximum(edges[1:] - edges[:-1], 1)
    rms = np.sqrt((power[edges[1:]] - power[edges[:-1]]) / counts)
    return np.log(rms + floor).astype(np.float32)


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


def _resample(x: np.ndarray, fps: float, to_fps: float) -> np.ndarray:
    """Rows of `x` at `fps` linearly interpolated onto a `to_fps` grid over the same time span."""
    if abs(fps - to_fps) < 1e-6:
        return x
    n_out = int(np.floor(len(x) * to_fps / fps))
    t_in = np.arange(len(x)) / fps
    t_out = np.arange(n_out) / to_fps
    out = np.empty((n_out, x.shape[1]))
    for j in range(x.shape[1]):
        out[:, j] = np.interp(t_out, t_in, x[:, j])
    return out


# --- the projection ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyncProjection:
    """Directions in (lip shape × context) and (audio × context) space that move together in sync."""

    video: np.ndarray  # (27 * (2 context + 1), components)
    audio: np.ndarray  # ((n_mels + 2) * (2 context + 1), components)
    weights: np.ndarray  # (components,) canonical correlations on the fitting clips
    context: int = 2
    low_hz: float = 0.5
    high_hz: float = 8.0
    n_mels: int = 16
    fitted_on: tuple[str, ...] = field(default=())

    def project(
        self, lips: np.ndarray, lips_ok: np.ndarray, audio: np.ndarray, audio_ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(T, components) lip and audio signals of one clip at METER_FPS."""
        v = _standardise(_band_pass(_fill_missing(lips, lips_ok), self.low_hz, self.high_hz, METER_FPS))
        a = _fill_missing(audio, audio_ok)
        a = _standardise(_band_pass(a, self.low_hz, self.high_hz, METER_FPS))
        return _with_context(v, self.context) @ self.video, _with_context(a, self.context) @ self.audio

    def to_json(self) -> dict[str, object]:
        return {
            "format": 1,
            "fps": METER_FPS,
            "context": self.context,
            "band_hz": [self.low_hz, self.high_hz],
            "n_mels": self.n_mels,
            "weights": self.weights.round(6).tolist(),
            "video": self.video.round(6).tolist(),
            "audio": self.audio.round(6).tolist(),
            "fitted_on": list(self.fitted_on),
        }

    @classmethod
    def from_json(cls, data: dict) -> SyncProjection:
        return cls(
            video=np.asarray(data["video"], np.float64),
            audio=np.asarray(data["audio"], np.float64),
            weights=np.asarray(data["weights"], np.float64),
            context=int(data["context"]),
            low_hz=float(data["band_hz"][0]),
            high_hz=float(data["band_hz"][1]),
            n_mels=int(data["n_mels"]),
            fitted_on=tuple(data.get("fitted_on", ())),
        )


@lru_cache(maxsize=4)
def load_projection(path: str = PROJECTION_FILE) -> SyncProjection:
    """The projection shipped with the package (or another file written by the same fit)."""
    from core.errors import BadInput

    try:
        with open(path) as fh:
            return SyncProjection.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"sync projection {path} cannot be read: {exc}") from exc


def fit_projection(
    clips: Iterable[tuple[np.ndarray, np.ndarray, int, float]],
    names: Iterable[str] = (),
    components: int = 3,
    context: int = 2,
    ridge: float = 0.5,
    low_hz: float = 0.5,
    high_hz: float = 8.0,
    n_mels: int = 16,
) -> SyncProjection:
    """Regularised CCA of stacked lip and audio frames pooled over in-sync clips (lips, pcm, sr, fps).

    Each clip is standardised on its own, so no speaker or recording dominates by scale; `ridge` shrinks
    each covariance toward its mean variance (a fraction of the trace).
    """
    xs, ys = [], []
    for lips, pcm, sample_rate, fps in clips:
        lips25, lips_ok, audio, audio_ok = _meter_inputs(lips, pcm, sample_rate, fps, n_mels)
        v = _standardise(_band_pass(_fill_missing(lips25, lips_ok), low_hz, high_hz, METER_FPS))
        a = _standardise(_band_pass(_fill_missing(audio, audio_ok), low_hz, high_hz, METER_FPS))
        ok = lips_ok & audio_ok
        xs.append(_with_context(v, context)[ok])
        ys.append(_with_context(a, context)[ok])
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    x -= x.mean(axis=0)
    y -= y.mean(axis=0)
    n = len(x)
    cxx, cyy, cxy = x.T @ x / n, y.T @ y / n, x.T @ y / n
    cxx += ridge * np.trace(cxx) / len(cxx) * np.eye(len(cxx))
    cyy += ridge * np.trace(cyy) / len(cyy) * np.eye(len(cyy))
    wx = np.linalg.inv(np.linalg.cholesky(cxx))
    wy = np.linalg.inv(np.linalg.cholesky(cyy))
    u, s, vt = np.linalg.svd(wx @ cxy @ wy.T)
    return SyncProjection(
        video=(wx.T @ u)[:, :components],
        audio=(wy.T @ vt.T)[:, :components],
        weights=s[:components],
        context=context,
        low_hz=low_hz,
        high_hz=high_hz,
        n_mels=n_mels,
        fitted_on=tuple(names),
    )


# --- the meter --------------------------------------------------------------------------------------------
def _meter_inputs(
    lips: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, n_mels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lip shape and audio features on the meter's 25 fps grid, with their validity masks."""
    lips = np.asarray(lips, np.float64)
    lips_ok = np.isfinite(lips).all(axis=1)
    if abs(fps - METER_FPS) > 1e-6:
        filled = _fill_missing(lips, lips_ok) if lips_ok.any() else np.zeros_like(lips)
        ok_rate = _resample(lips_ok[:, None].astype(float), fps, METER_FPS)[:, 0] > 0.99
        lips, lips_ok = _resample(filled, fps, METER_FPS), ok_rate
    n = len(lips)
    audio = sync_audio_features(pcm, sample_rate, n, METER_FPS, n_mels)
    audio_ok = audio_frames_present(pcm, sample_rate, n, METER_FPS)
    return lips, lips_ok, audio, audio_ok


def lag_curve(
    video: np.ndarray, audio: np.ndarray, ok_video: np.ndarray, ok_audio: np.ndarray, reach: int, weights
) -> np.ndarray:
    """Weighted mean over components of corr(video[t], audio[t + lag]) for lag in -reach..reach.

    Every lag is compared over the same frames t (those with room for every lag), so no lag gains from a
    shorter, noisier overlap; frames invalid on either side at that lag are left out.
    """
    n = len(video)
    t = np.arange(reach, n - reach)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    curve = np.zeros(2 * reach + 1)
    for i, lag in enumerate(range(-reach, reach + 1)):
        keep = ok_video[t] & ok_audio[t + lag]
        if keep.sum() < MIN_SUPPORT_FRAMES:
            continue
        x, y = video[t[keep]], audio[t[keep] + lag]
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
        y = (y - y.mean(axis=0)) / (y.std(axis=0) + 1e-9)
        curve[i] = float(((x * y).mean(axis=0) * w).sum())
    return curve


def peak_confidence(curve: np.ndarray, best: int) -> float:
    """The peak's height above the lags more than 2 frames away, in their standard deviations."""
    far = np.abs(np.arange(len(curve)) - best) > 2
    if far.sum() < 3:
        return 0.0
    return float((curve[best] - curve[far].mean()) / (curve[far].std() + 1e-9))


def estimate_offset(
    lips: np.ndarray,
    pcm: np.ndarray,
    sample_rate: int,
    fps: float,
    max_lag: int = 15,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    projection: SyncProjection | None = None,
) -> OffsetEstimate:
    """AV offset of a clip from its per-frame lip shape (:func:`pipeline.landmarks.lip_shape`; NaN rows
    where there is no face) and its mono PCM. See the module docstring for the method."""
    projection = projection or load_projection()

    def abstain(reason: str) -> OffsetEstimate:
        return abstention(reason, min_confidence=min_confidence)

    lips = np.asarray(lips)
    if lips.ndim != 2:
        raise ValueError(f"lips must be (T, features) from lip_shape, got shape {lips.shape}")
    if len(lips) < MIN_SECONDS * fps:
        return abstain(TOO_SHORT)
    lips25, lips_ok, audio, audio_ok = _meter_inputs(lips, pcm, sample_rate, fps, projection.n_mels)
    if lips_ok.sum() < MIN_SECONDS * METER_FPS:
        return abstain(NO_FACE)
    sound = frame_dbfs(pcm, sample_rate, len(lips25), METER_FPS) > SPEECH_DBFS
    if sound.mean() < MIN_SPEECH_FRACTION or sound.sum() < MIN_SECONDS * METER_FPS:
        return abstain(NO_SPEECH)
    max_lag25 = int(np.ceil(max_lag * METER_FPS / fps))
    reach = min(max_lag25 + EDGE_FRAMES, (len(lips25) - MIN_SUPPORT_FRAMES) // 2)
    if reach < EDGE_FRAMES + 1:
        return abstain(TOO_SHORT)
    video_signal, audio_signal = projection.project(lips25, lips_ok, audio, audio_ok)
    curve = lag_curve(video_signal, audio_signal, lips_ok, audio_ok, reach, projection.weights)
    best = int(np.argmax(curve))
    lag25 = best - reach
    confidence = peak_confidence(curve, best)
    reason = ""
    if abs(lag25) > min(max_lag25, reach - EDGE_FRAMES):
        reason = AT_EDGE
    elif confidence < min_confidence:
        reason = LOW_CONFIDENCE
    return OffsetEstimate(
        offset_frames=int(round(lag25 * fps / METER_FPS)),
        confidence=confidence,
        peak_correlation=float(curve[best]),
        correlations=tuple(float(c) for c in curve),
        min_confidence=min_confidence,
        reason=reason,
    )


def offset_of_video(
    path: str,
    fps: float = 25.0,
    max_lag: int = 15,
    tracker=None,  # noqa: ANN001
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    meter=None,  # noqa: ANN001 - a pipeline.meters.SyncMeter; None: this module's landmark meter
) -> OffsetEstimate:
    """Decode one video (any fps, local or URI), track the face and read its AV offset."""
    from pipeline.landmarks import FaceMeshTracker, lip_shape, smooth_landmarks
    from pipeline.media import local_path, probe, read_audio, read_frames

    with local_path(path) as local:
        info = probe(local)
        frames = read_frames(local, fps=fps, size=analysis_size(info.width, info.height))
        pcm = read_audio(local, 16000)
    tracker = tracker or FaceMeshTracker(max_faces=1)
    track = tracker.track(frames, fps=fps)
    name = getattr(meter, "name", "landmarks")
    threshold = getattr(meter, "min_confidence", min_confidence)
    if len(frames) < MIN_SECONDS * fps:
        return abstention(TOO_SHORT, name, threshold)
    if not track.found.any():
        return abstention(NO_FACE, name, threshold)
    smooth = smooth_landmarks(track.landmarks, track.found)
    if meter is not None:
        return meter.measure(frames, smooth, pcm, 16000, fps, max_lag)
    return estimate_offset(lip_shape(smooth), pcm, 16000, fps, max_lag=max_lag, min_confidence=min_confidence)


def analysis_size(width: int, height: int, max_side: int = 720) -> tuple[int, int] | None:
    """Decode size with the longer side at most `max_side` (as preprocessing decodes), else None."""
    if max(width, height) <= max_side:
        return None
    return (max_side, -1) if width >= height else (-1, max_side)

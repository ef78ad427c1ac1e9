"""Model-free lip-sync measures: landmark AV offset, openness-envelope correlation, viseme agreement.

Nothing here needs trained weights, so every language is measured the same way:

- the AV-sync meter's offset (pipeline.offset: lip shape against the audio spectrum, ±max_lag frames),
  its confidence and whether it abstains, and the Pearson correlation of mouth openness with the audio envelope (log RMS per
  frame) as played, at lag 0;
- viseme agreement against a phoneme timeline in audio time: the share of bilabial phonemes (p, b, m)
  during which the lips close (the least open frame the phoneme overlaps is at most 0.35), and of open and
  open-mid vowels (viseme openness >= 0.65) during which the mouth is open (the mean over the frames they
  overlap is at least 0.4), each phoneme looked for MOUTH_LEAD_MS (80 ms) before it sounds. Openness is measured relative to the clip's own range (0 at its 5th percentile,
  1 at its 95th), so faces of any size and speakers who barely open their mouths are judged alike. Use
  unsmoothed landmarks: a two-frame closure is what smoothing removes first. The timeline comes from a JSON file (e.g. `lipsync synth`'s
  `*.phonemes.json`), else from the transcript: espeak-ng speaks it and dynamic time warping of MFCCs maps
  its phoneme times onto the clip's audio.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline import phonemes as ph
from pipeline.landmarks import lip_shape, mouth_openness
from pipeline.offset import OffsetEstimate, audio_envelope, estimate_offset

CLOSED_BELOW = 0.35  # normalised openness at or below which the lips count as closed
OPEN_ABOVE = 0.4  # mean normalised openness at or above which the mouth counts as open
OPEN_VOWEL_MIN_OPENNESS = 0.65  # vowels whose viseme target is at least this open (open and open-mid)
_DTW_HOP_S = 0.02
_DTW_MAX_CELLS = 25_000_000  # beyond this (about 100 s against 100 s) the transcript is not aligned


@dataclass(frozen=True)
class VisemeAgreement:
    """Viseme agreement of one clip; NaN where the timeline has no phoneme of that kind."""

    bilabial_closed: float  # share of p/b/m phonemes with the lips closed in some frame they overlap
    open_vowel_open: float  # share of open(-mid) vowels with the mouth open on average over their frames
    agreement: float  # mean of the two shares that exist
    n_bilabial: int
    n_open_vowel: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "viseme_agreement": self.agreement,
            "bilabial_closed": self.bilabial_closed,
            "open_vowel_open": self.open_vowel_open,
            "n_bilabial": self.n_bilabial,
            "n_open_vowel": self.n_open_vowel,
        }


# --- landmark offset and correlation --------------------------------------------------------------------
def landmark_sync(
    landmarks: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float, max_lag: int = 15
) -> tuple[OffsetEstimate, dict[str, float | int | bool | str]]:
    """The AV-sync meter's reading of smoothed landmarks and its scores: offset, confidence, whether it
    abstains, peak correlation, and the correlation of mouth openness with the audio envelope at the
    mouth's natural lead (`openness_envelope_r`)."""
    est = estimate_offset(lip_shape(landmarks), pcm, sample_rate, fps, max_lag=max_lag)
    openness = mouth_openness(landmarks)
    envelope = audio_envelope(pcm, sample_rate, len(openness), fps)
    curve = np.asarray(est.correlations)
    subframe = subframe_peak(curve, est.curve_max_lag) * fps / est.curve_fps if len(curve) else float("nan")
    scores = {
        "landmark_offset_frames": est.offset_frames,
        "landmark_offset_subframe": subframe,
        "landmark_confidence": est.confidence,
        "landmark_abstained": est.abstained,
        "landmark_reason": est.reason,
        "landmark_peak_correlation": est.peak_correlation,
        "openness_envelope_correlation": openness_envelope_r(openness, envelope, fps),
    }
    return est, scores


def openness_envelope_r(
    openness: np.ndarray, envelope: np.ndarray, fps: float, lead_ms: float = ph.MOUTH_LEAD_MS
) -> float:
    """Pearson r of mouth openness at frame t with the audio envelope `lead_ms` later (negative: earlier).

    A mouth shapes each sound before it is heard: the synth corpus is drawn `MOUTH_LEAD_MS` ahead (mean r
    0.65 at lag 0, 0.75 at 2 frames of 25 fps) and the 11 real dev clips read higher at 2 frames than at 0
    on 9 of 11 (mean 0.07 -> 0.12; benchmarks/envelope_lead.py; nothing here is fitted on them). Lag 0 marked
    a mouth with the natural lead down; the meter's offset 0 and viseme scoring already use the lead."""
    lag = int(round(lead_ms * fps / 1000.0))
    n = min(len(openness), len(envelope))
    return pearson(openness[max(0, -lag) : n - max(0, lag)], envelope[max(0, lag) : n - max(0, -lag)])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the frames where both are finite (NaN when either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 8 or a[ok].std() < 1e-9 or b[ok].std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def subframe_peak(curve: np.ndarray, max_lag: int) -> float:
    """Lag of the maximum refined by a parabola through it and its neighbours (in frames)."""
    best = int(np.argmax(curve))
    if 0 < best < len(curve) - 1:
        left, mid, right = curve[best - 1], curve[best], curve[best + 1]
        denom = left - 2 * mid + right
        if denom < 0:
            return float(best - max_lag + 0.5 * (left - right) / denom)
    return float(best - max_lag)


# --- viseme agreement -----------------------------------------------------------------------------------
def normalised_openness(openness: np.ndarray) -> np.ndarray:
    """Openness mapped so the clip's 5th percentile is 0 and its 95th is 1 (NaN stays NaN)."""
    x = np.asarray(openness, np.float64)
    if not np.isfinite(x).any():
        return np.full_like(x, np.nan)
    lo, hi = np.nanpercentile(x, [5, 95])
    return (x - lo) / max(hi - lo, 1e-9)


def frame_span(phoneme: ph.Phoneme, n_frames: int, fps: float) -> tuple[int, int]:
    """Half-open range of video frames whose time span overlaps the phoneme's."""
    start = math.floor(phoneme.start_ms * fps / 1000.0)
    end = math.ceil(phoneme.end_ms * fps / 1000.0)
    return max(start, 0), min(max(end, start + 1), n_frames)


def _hits(
    norm: np.ndarray,
    phonemes: list[ph.Phoneme],
    fps: float,
    reduce: Callable[[np.ndarray], float],
    test: Callable[[float], bool],
) -> list[bool]:
    out = []
    for p in phonemes:
        a, b = frame_span(p, len(norm), fps)
        values = norm[a:b]
        values = values[np.isfinite(values)]
        if len(values):
            out.append(bool(test(reduce(values))))
    return out


def viseme_agreement(
    openness: np.ndarray,
    phonemes: list[ph.Phoneme],
    fps: float = 25.0,
    closed_below: float = CLOSED_BELOW,
    open_above: float = OPEN_ABOVE,
    vowel_min_openness: float = OPEN_VOWEL_MIN_OPENNESS,
    lead_ms: float = ph.MOUTH_LEAD_MS,
) -> VisemeAgreement:
    """Share of bilabials with closed lips and of open vowels with an open mouth (timeline in audio time;
    each phoneme's shape is looked for `lead_ms` before it sounds)."""
    norm = normalised_openness(openness)
    phonemes = ph.shift_timeline(phonemes, -lead_ms)  # the face shapes each phoneme before it sounds
    bilabial = [p for p in phonemes if p.viseme == "bilabial"]
    vowels = [p for p in phonemes if p.viseme in ph.VOWEL_VISEMES and p.openness >= vowel_min_openness]
    closed = _hits(norm, bilabial, fps, np.min, lambda v: v <= closed_below)
    opened = _hits(norm, vowels, fps, np.mean, lambda v: v >= open_above)
    shares = [float(np.mean(h)) if h else float("nan") for h in (closed, opened)]
    present = [s for s in shares if not math.isnan(s)]
    return VisemeAgreement(
        bilabial_closed=shares[0],
        open_vowel_open=shares[1],
        agreement=float(np.mean(present)) if present else float("nan"),
        n_bilabial=len(closed),
        n_open_vowel=len(opened),
    )


# --- timelines ------------------------------------------------------------------------------------------
def timeline_from_document(document: str | bytes | list | dict) -> list[ph.Phoneme]:
    """Phonemes from a timeline JSON: a list of phoneme dicts or an object with a `phonemes` list."""
    data = json.loads(document) if isinstance(document, (str, bytes)) else document
    rows = data.get("phonemes", []) if isinstance(data, dict) else data
    return ph.timeline_from_json(rows)


def _dtw_features(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """(14, T) per-utterance normalised MFCCs every 20 ms, for alignment."""
    import librosa

    hop = int(round(_DTW_HOP_S * sample_rate))
    feats = librosa.feature.mfcc(
        y=np.asarray(pcm, np.float32), sr=sample_rate, n_mfcc=14, n_fft=2 * hop, hop_length=hop, n_mels=40
    )
    return (feats - feats.mean(axis=1, keepdims=True)) / (feats.std(axis=1, keepdims=True) + 1e-6)


def warm_up_alignment() -> None:
    """Load (or JIT-compile, on a fresh install) librosa's DTW kernels now, on 0.2 s of noise: an actor calls
    it when built, so its first clip with a transcript neither waits for numba nor counts it as its work."""
    noise = np.random.default_rng(0).standard_normal(3200).astype(np.float32)
    time_warp(noise, noise, 16000)


def time_warp(reference: np.ndarray, target: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference ms, target ms) points of the DTW path that maps the reference audio onto the target."""
    import librosa

    x, y = _dtw_features(reference, sample_rate), _dtw_features(target, sample_rate)
    if x.shape[1] * y.shape[1] > _DTW_MAX_CELLS:
        raise ValueError(f"audio too long to align ({x.shape[1]} x {y.shape[1]} DTW cells)")
    _, path = librosa.sequence.dtw(X=x, Y=y, metric="euclidean")
    path = path[::-1]
    ref_frames = np.unique(path[:, 0])
    mapped = np.array([path[path[:, 0] == i, 1].mean() for i in ref_frames])
    step_ms = 1000.0 * _DTW_HOP_S
    return ref_frames * step_ms, mapped * step_ms


def align_transcript(text: str, language: str, pcm: np.ndarray, sample_rate: int) -> list[ph.Phoneme]:
    """espeak-ng's phoneme timeline of `text`, moved onto the clip's audio by DTW (times in clip audio ms)."""
    import librosa

    speech = ph.synthesize(text, language)
    tts = librosa.resample(
        speech.pcm.astype(np.float32) / 32768.0, orig_sr=speech.sample_rate, target_sr=sample_rate
    )
    ref_ms, clip_ms = time_warp(tts, pcm, sample_rate)
    starts = np.interp([p.start_ms for p in speech.phonemes], ref_ms, clip_ms)
    ends = np.interp([p.end_ms for p in speech.phonemes], ref_ms, clip_ms)
    return [
        ph.Phoneme(p.phoneme, float(a), float(b), p.viseme, p.openness)
        for p, a, b in zip(speech.phonemes, starts, ends, strict=True)
    ]


def timeline_openness(phonemes: list[ph.Phoneme], n_frames: int, fps: float) -> np.ndarray:
    """The timeline's target openness per video frame, as a mouth leading the sound shows it (for plots
    against the measured openness)."""
    return ph.openness_per_frame(phonemes, n_frames, fps, shift_ms=-ph.MOUTH_LEAD_MS)

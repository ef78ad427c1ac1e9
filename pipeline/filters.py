"""Quality measures of a clip and the filters that reject it, each with its own reason code."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Reason codes (rejects.parquet `reason`): media-level ones come from pipeline.media.MediaError.
TOO_SHORT = "too_short"
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
FACE_TOO_SMALL = "face_too_small"
BLURRY = "blurry"
NO_AUDIO = "no_audio_stream"
SILENT_AUDIO = "silent_audio"
OFFSET_TOO_LARGE = "offset_too_large"
LOW_SYNC_CONFIDENCE = "low_sync_confidence"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the quality filters."""

    min_seconds: float = 1.0  # shorter segments/inputs are `too_short`
    min_face_fraction: float = 0.5  # share of an input's frames with the face, else `no_face`
    max_multi_face_fraction: float = 0.2  # share of face frames with a second sizeable face
    min_face_px: float = 48.0  # median face width in source pixels
    min_sharpness: float = 15.0  # variance of the Laplacian of the grey crops (mean over frames)
    silence_dbfs: float = -45.0  # RMS level below which the audio is silent


def sharpness(crops: np.ndarray, step: int = 5) -> float:
    """Mean variance of the Laplacian of grey crops (every `step`-th frame): low means blurry."""
    sample = crops[::step] if len(crops) > step else crops
    values = [cv2.Laplacian(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for c in sample]
    return float(np.mean(values)) if values else 0.0


def rms_dbfs(pcm: np.ndarray) -> float:
    """RMS level of float PCM in dB relative to full scale."""
    if len(pcm) == 0:
        return -np.inf
    rms = float(np.sqrt(np.mean(np.asarray(pcm, np.float64) ** 2)))
    return 20 * np.log10(max(rms, 1e-10))


def segment_rejection(
    cfg: FilterConfig,
    n_frames: int,
    fps: float,
    face_px: float,
    multi_face_fraction: float,
    crop_sharpness: float,
    audio_dbfs: float,
) -> tuple[str, str] | None:
    """(reason, message) of the first filter a segment fails, or None when it passes."""
    seconds = n_frames / fps
    checks = [
        (seconds < cfg.min_seconds, TOO_SHORT, f"{seconds:.2f} s < {cfg.min_seconds} s"),
        (
            multi_face_fraction > cfg.max_multi_face_fraction,
            MULTIPLE_FACES,
            f"a second face in {multi_face_fraction:.0%} of frames",
        ),
        (
            not face_px >= cfg.min_face_px,
            FACE_TOO_SMALL,
            f"face {face_px:.0f} px wide < {cfg.min_face_px:.0f} px",
        ),
        (crop_sharpness < cfg.min_sharpness, BLURRY, f"sharpness {crop_sharpness:.1f} < {cfg.min_sharpness}"),
        (audio_dbfs < cfg.silence_dbfs, SILENT_AUDIO, f"audio at {audio_dbfs:.1f} dBFS < {cfg.silence_dbfs}"),
    ]
    for failed, reason, message in checks:
        if failed:
            return reason, message
    return None

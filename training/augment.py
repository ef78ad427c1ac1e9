"""Training-window augmentation: photometric and small geometric changes to a window's faces, gain, noise and
room reverberation to a clip's audio before its mel. Train windows only; validation is never augmented.

Sync is untouched by construction: pixel changes are drawn once per window and applied alike to its frames
and to its reference window (no frame moves in time), and the audio changes are sample-aligned (gain and
noise per sample; the reverberation's impulse response has its direct path at lag 0, and its output is cut
to the input's length), so a window's frame indices and mel indices are exactly those of the clean window.

Pixel work is OpenCV's (already the crops' codec; it works on the uint8 HWC BGR frames the windows hold,
where torchvision's v2 transforms would need a tensor round trip and an exactly paired torchvision build);
the reverberation's convolution is scipy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.audio import melspectrogram


@dataclass(frozen=True)
class AugmentConfig:
    """What to change in a train window and by how much; `strength` scales every range (0: nothing)."""

    enabled: bool = False
    strength: float = 1.0
    brightness: float = 0.2  # ± fraction of full scale
    contrast: float = 0.2  # ± fraction
    saturation: float = 0.3  # ± fraction
    hue: float = 6.0  # ± degrees of the hue circle
    blur: float = 0.3  # probability of a Gaussian blur (sigma 0.3-1.2 px)
    jpeg: float = 0.3  # probability of JPEG re-compression (quality 30-90)
    scale: float = 0.05  # ± fraction
    shift: float = 0.03  # ± fraction of the image side
    rotation: float = 5.0  # ± degrees
    gain_db: float = 6.0  # ± dB
    noise: float = 0.5  # probability of white noise ...
    noise_snr_db: tuple[float, float] = (10.0, 40.0)  # ... at an SNR drawn from this range
    reverb: float = 0.0  # probability of room reverberation (RT60 0.2-0.6 s)

    @property
    def active(self) -> bool:
        return self.enabled and self.strength > 0

    @property
    def changes_audio(self) -> bool:
        return self.active and (self.gain_db > 0 or self.noise > 0 or self.reverb > 0)


# ---------------------------------------------------------------- pixels


@dataclass(frozen=True)
class PixelChange:
    """One draw of the pixel changes, applied alike to every frame it is given."""

    brightness: float  # added, in 0-255 units
    contrast: float  # factor
    saturation: float  # factor
    hue: float  # degrees
    blur_sigma: float  # 0: none
    jpeg_quality: int  # 0: none
    affine: np.ndarray | None  # 2x3 for an HxW frame (None: identity)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 BGR frames → changed copies."""
        return np.stack([self._frame(f) for f in frames])

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if self.affine is not None:
            frame = cv2.warpAffine(
                frame, self.affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
        mean = float(frame.mean())
        frame = cv2.convertScaleAbs(
            frame, alpha=self.contrast, beta=self.brightness + mean * (1 - self.contrast)
        )
        if self.saturation != 1.0 or self.hue:
            hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV_FULL).astype(np.float32)
            hsv[..., 0] = (hsv[..., 0] + self.hue * 256 / 360) % 256
            hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 255)
            frame = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR_FULL)
        if self.blur_sigma > 0:
            frame = cv2.GaussianBlur(frame, (0, 0), self.blur_sigma)
        if self.jpeg_quality:
            ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            frame = cv2.imdecode(jpeg, cv2.IMREAD_COLOR) if ok else frame
        return frame


def draw_pixel_change(cfg: AugmentConfig, rng: np.random.Generator, size: int) -> PixelChange:
    """One random PixelChange for `size`-pixel frames (ranges scaled by cfg.strength)."""
    s = cfg.strength

    def sym(amount: float) -> float:
        return float(rng.uniform(-amount * s, amount * s))

    angle, scale = sym(cfg.rotation), 1.0 + sym(cfg.scale)
    shift = np.array([sym(cfg.shift), sym(cfg.shift)]) * size
    affine = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    affine[:, 2] += shift
    blur = rng.random() < cfg.blur * s
    jpeg = rng.random() < cfg.jpeg * s
    return PixelChange(
        brightness=sym(cfg.brightness) * 255,
        contrast=1.0 + sym(cfg.contrast),
        saturation=1.0 + sym(cfg.saturation),
        hue=sym(cfg.hue),
        blur_sigma=float(rng.uniform(0.3, 1.2)) if blur else 0.0,
        jpeg_quality=int(rng.integers(30, 91)) if jpeg else 0,
        affine=None if not (angle or scale != 1.0 or shift.any()) else affine,
    )


# ---------------------------------------------------------------- audio


def augment_audio(
    pcm: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """`pcm` with a gain, white noise at a drawn SNR and room reverberation (each as configured and drawn),
    sample-aligned with the input and of its length."""
    s = cfg.strength
    out = np.asarray(pcm, np.float32).copy()
    if cfg.reverb and rng.random() < cfg.reverb * s:
        out = reverberate(out, float(rng.uniform(0.2, 0.6)), rng, sample_rate)
    if cfg.noise and rng.random() < cfg.noise * s:
        snr = float(rng.uniform(*cfg.noise_snr_db))
        power = float(np.mean(out**2)) or 1e-8
        out = out + rng.standard_normal(len(out)).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
    out *= 10 ** (float(rng.uniform(-cfg.gain_db * s, cfg.gain_db * s)) / 20)
    return np.clip(out, -1.0, 1.0)


def reverberate(pcm: np.ndarray, rt60_s: float, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """`pcm` through a synthetic room (exponentially decaying noise tail behind a unit direct path at lag 0),
    cut to the input's length and brought back to its RMS level."""
    from scipy.signal import fftconvolve

    n = int(rt60_s * sample_rate)
    tail = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)  # -60 dB at rt60
    ir = np.concatenate([[1.0], 0.3 * tail[1:] / np.sqrt(np.sum(tail**2))])
    wet = fftconvolve(pcm, ir)[: len(pcm)]
    rms_in, rms_out = np.sqrt(np.mean(pcm**2)), np.sqrt(np.mean(wet**2))
    return (wet * (rms_in / rms_out if rms_out > 0 else 1.0)).astype(np.float32)


def augmented_mel(
    pcm: np.ndarray, mel_frames: int, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """The (80, mel_frames) Wav2Lip mel of the augmented audio, frame for frame with the clean clip's mel."""
    from pipeline.audio import SAMPLE_RATE

    mel = melspectrogram(augment_audio(pcm, cfg, rng, SAMPLE_RATE))
    if mel.shape[1] < mel_frames:
        mel = np.pad(mel, ((0, 0), (0, mel_frames - mel.shape[1])), mode="edge")
    return mel[:, :mel_frames].astype(np.float32)

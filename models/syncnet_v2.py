"""The original SyncNet (joonson/syncnet_python ``SyncNetModel.py``, "syncnet_v2.model") and its inputs.

This is the network behind the field's LSE-D / LSE-C numbers. Its weights are not shipped: the user passes
``syncnet_v2.model`` (a plain state dict, as the reference's ``loadParameters`` reads it). Layer names match
the reference so its state dict loads key for key.

Inputs, as the reference's ``SyncNetInstance.evaluate`` builds them:
- video: 5 consecutive 224×224 face crops, BGR, float 0..255 (no normalisation), shaped (B, 3, 5, 224, 224);
- audio: 13 MFCCs of int16-scaled 16 kHz PCM (python_speech_features defaults: 25 ms rectangular windows
  every 10 ms, 26 filters, nfft 512, pre-emphasis 0.97, lifter 22, c0 replaced by log frame energy),
  20 MFCC frames (0.2 s) per window starting at 4 × the video frame index, shaped (B, 1, 13, 20).
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import torch
from scipy.fft import dct
from torch import nn

from core.errors import BadInput

INPUT_SIZE = 224
MFCC_PER_SECOND = 100
MFCC_WINDOW = 20  # MFCC frames per 5-frame video window (0.2 s)


def _conv_bn_relu(cin: int, cout: int, kernel: tuple[int, int], padding: tuple[int, int]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU()]


def _conv3d_bn_relu(cin: int, cout: int, kernel: tuple, stride: tuple, padding: tuple) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding), nn.BatchNorm3d(cout), nn.ReLU()]


def _fc(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, out_dim))


class SyncNetV2(nn.Module):
    """joonson/syncnet_python's ``S``: lip (3×5×224×224) and audio (1×13×20) streams → 1024-d features."""

    def __init__(self, embedding_dim: int = 1024) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv_bn_relu(1, 64, (3, 3), (1, 1)),
            nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            *_conv_bn_relu(64, 192, (3, 3), (1, 1)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            *_conv_bn_relu(192, 384, (3, 3), (1, 1)),
            *_conv_bn_relu(384, 256, (3, 3), (1, 1)),
            *_conv_bn_relu(256, 256, (3, 3), (1, 1)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            *_conv_bn_relu(256, 512, (5, 4), (0, 0)),
        )
        self.netfcaud = _fc(embedding_dim)
        self.netfclip = _fc(embedding_dim)
        self.netcnnlip = nn.Sequential(
            *_conv3d_bn_relu(3, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3d_bn_relu(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv3d_bn_relu(256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
            *_conv3d_bn_relu(256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
            *_conv3d_bn_relu(256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3d_bn_relu(256, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0)),
        )

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 13, 20) MFCC windows → (B, 1024) audio features."""
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 5, 224, 224) BGR 0..255 face windows → (B, 1024) lip features."""
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet_v2(path: str, device: str | torch.device = "cpu") -> SyncNetV2:
    """The reference network with the weights of ``syncnet_v2.model`` (a state dict; path or URI), in eval mode."""
    try:
        with fsspec.open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise BadInput(f"syncnet_v2 weights {path} do not exist") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise BadInput(f"syncnet_v2 weights {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = SyncNetV2()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BadInput(f"syncnet_v2 weights {path} do not fit the syncnet_v2 architecture: {exc}") from exc
    return model.to(device).eval()


# --- audio features: python_speech_features.mfcc with its defaults ---------------------------------------
def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mfcc_filterbank(n_filters: int = 26, nfft: int = 512, sample_rate: int = 16000) -> np.ndarray:
    """The (n_filters, nfft // 2 + 1) triangular mel filter bank, with the reference's bin rounding."""
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / sample_rate)
    bank = np.zeros((n_filters, nfft // 2 + 1))
    for j in range(n_filters):
        lo, mid, hi = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        for k in range(lo, mid):
            bank[j, k] = (k - bins[j]) / (bins[j + 1] - bins[j])
        for k in range(mid, hi):
            bank[j, k] = (bins[j + 2] - k) / (bins[j + 2] - bins[j + 1])
    return bank


def _frames(signal: np.ndarray, length: int, step: int) -> np.ndarray:
    """Overlapping rectangular frames, zero-padded at the end (python_speech_features ``framesig``)."""
    n = 1 if len(signal) <= length else 1 + math.ceil((len(signal) - length) / step)
    padded = np.concatenate([signal, np.zeros((n - 1) * step + length - len(signal))])
    index = np.arange(length)[None, :] + step * np.arange(n)[:, None]
    return padded[index]


def mfcc(pcm: np.ndarray, sample_rate: int = 16000, n_ceps: int = 13) -> np.ndarray:
    """(13, T) MFCCs of float PCM in [-1, 1], scaled to int16 as the reference reads its wav (T at 100 Hz)."""
    signal = np.asarray(pcm, np.float64) * 32768.0
    if len(signal) == 0:
        signal = np.zeros(1)
    signal = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    frames = _frames(signal, round(0.025 * sample_rate), round(0.01 * sample_rate))
    power = np.abs(np.fft.rfft(frames, 512)) ** 2 / 512
    energy = power.sum(axis=1)
    energy[energy == 0] = np.finfo(float).eps
    feat = power @ mfcc_filterbank(26, 512, sample_rate).T
    feat[feat == 0] = np.finfo(float).eps
    ceps = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :n_ceps]
    ceps *= 1 + 11.0 * np.sin(np.pi * np.arange(n_ceps) / 22)  # lifter L = 22
    ceps[:, 0] = np.log(energy)
    return ceps.T.astype(np.float32)


def mfcc_windows(pcm: np.ndarray, n_windows: int, sample_rate: int = 16000, fps: float = 25.0) -> np.ndarray:
    """(n_windows, 1, 13, 20) MFCC windows; window i starts at MFCC frame round(100 i / fps) (4 i at 25 fps)."""
    ceps = mfcc(pcm, sample_rate)
    starts = np.round(np.arange(n_windows) * MFCC_PER_SECOND / fps).astype(int)
    columns = np.clip(starts[:, None] + np.arange(MFCC_WINDOW)[None, :], 0, ceps.shape[1] - 1)
    return np.ascontiguousarray(ceps[:, columns].transpose(1, 0, 2)[:, None])


def lip_windows(crops_rgb: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(N, 3, 5, H, W) float32 BGR 0..255 windows of 5 frames from (T, H, W, 3) RGB crops."""
    bgr = crops_rgb[..., ::-1].astype(np.float32)
    stacked = np.stack([bgr[s : s + 5] for s in starts])  # (N, 5, H, W, 3)
    return np.ascontiguousarray(stacked.transpose(0, 4, 1, 2, 3))

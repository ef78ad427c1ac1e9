"""Building blocks shared by the Wav2Lip networks (reference: Rudrabha/Wav2Lip ``models/conv.py``).

Module and attribute names (``conv_block``, ``act``) follow the reference so that state dicts of the 96×96
models line up key for key with the published checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

IntPair = int | tuple[int, int]

BASE_IMG_SIZE = 96
"""The reference resolution; every other size adds stride-2 stages on top of its layer list."""

BASE_DOWNSAMPLINGS = 5
"""Stride-2 stages the reference face encoder uses to get from 96 to 3 (96 → 48 → 24 → 12 → 6 → 3)."""

BOTTLENECK_MAX = 4
"""Face encoders halve until the feature map is at most this big, then one valid conv takes it to 1×1."""


def scaled(channels: int, width: float) -> int:
    """A reference channel count times the width multiplier (at least 1; width 1.0 is the reference)."""
    return max(1, round(channels * width))


class Conv2d(nn.Module):
    """Conv → BatchNorm → ReLU; with ``residual`` the input is added before the ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and (cin != cout or _pair(stride) != (1, 1)):
            raise ValueError("a residual Conv2d block needs cin == cout and stride 1")
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """Transposed conv → BatchNorm → ReLU (the decoder's upsampling step).

    ``conv`` takes nn.ConvTranspose2d's keywords (stride, padding, output_padding).
    """

    def __init__(self, cin: int, cout: int, kernel_size: IntPair, **conv: IntPair) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, **conv),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


class NoNormConv2d(nn.Module):
    """Conv → LeakyReLU(0.01), no normalisation (the quality discriminator's block, ``nonorm_Conv2d``)."""

    def __init__(
        self, cin: int, cout: int, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def res_block(channels: int) -> Conv2d:
    """The reference's ubiquitous 3×3, stride-1, residual ``Conv2d``."""
    return Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, residual=True)


def audio_encoder(last_stage_residuals: int = 1, width: float = 1.0) -> nn.Sequential:
    """Mel window (N, 1, 80, 16) → (N, 512·width, 1, 1): the generator's (1 residual at 256) and SyncNet's
    (2); `width` scales every channel count."""
    c32, c64, c128, c256, c512 = (scaled(c, width) for c in (32, 64, 128, 256, 512))
    return nn.Sequential(
        Conv2d(1, c32, kernel_size=3, stride=1, padding=1),
        res_block(c32),
        res_block(c32),
        Conv2d(c32, c64, kernel_size=3, stride=(3, 1), padding=1),  # 27×16
        res_block(c64),
        res_block(c64),
        Conv2d(c64, c128, kernel_size=3, stride=3, padding=1),  # 9×6
        res_block(c128),
        res_block(c128),
        Conv2d(c128, c256, kernel_size=3, stride=(3, 2), padding=1),  # 3×3
        *[res_block(c256) for _ in range(last_stage_residuals)],
        Conv2d(c256, c512, kernel_size=3, stride=1, padding=0),  # 1×1
        Conv2d(c512, c512, kernel_size=1, stride=1, padding=0),
    )


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def halving_sizes(size: int) -> list[int]:
    """Sizes after repeated 3×3 / stride 2 / padding 1 convs until ≤ ``BOTTLENECK_MAX``: 96 → [48, 24, 12, 6, 3]."""
    sizes = []
    while size > BOTTLENECK_MAX:
        size = conv_out(size, 3, 2, 1)
        sizes.append(size)
    return sizes


def extra_stages(img_size: int) -> int:
    """Stride-2 stages to add to the reference layer list for ``img_size`` (0 at 96, 1 at 192 and 256, 2 at 384).

    Raises ``ValueError`` for sizes the architecture cannot take: odd sizes (the lower half would be ragged)
    and sizes below 96.
    """
    if img_size < BASE_IMG_SIZE or img_size % 2:
        raise ValueError(f"img_size must be an even number >= {BASE_IMG_SIZE}, got {img_size}")
    return max(0, len(halving_sizes(img_size)) - BASE_DOWNSAMPLINGS)


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (T·B, C, H, W), time-major like the reference's ``torch.cat`` over T."""
    b, c, t, h, w = x.shape
    return x.permute(2, 0, 1, 3, 4).reshape(t * b, c, h, w)


def unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`fold_time`: (T·B, C, H, W) → (B, C, T, H, W)."""
    n, c, h, w = x.shape
    return x.reshape(n // batch, batch, c, h, w).permute(1, 2, 0, 3, 4)


def _pair(value: IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])

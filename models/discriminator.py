"""The visual-quality discriminator (reference: Rudrabha/Wav2Lip ``models/wav2lip.py``, ``Wav2Lip_disc_qual``).

It judges the lower half of each frame (where the generator paints the mouth) with plain convolutions and
LeakyReLU, no normalisation. ``forward`` gives the probability that each frame is real;
``perceptual_forward`` is the generator's adversarial loss (BCE of generated frames against "real").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import NoNormConv2d, conv_out, extra_stages, fold_time, scaled


class QualityDiscriminator(nn.Module):
    """Frames (B, 3, T, H, W) or (N, 3, H, W) → real-probability per frame, (B·T, 1) time-major or (N, 1).
    `width` scales every channel count (1.0: the reference)."""

    def __init__(self, img_size: int = 96, width: float = 1.0) -> None:
        super().__init__()
        self.img_size, self.width = img_size, width
        extra = extra_stages(img_size)
        c32, c512 = scaled(32, width), scaled(512, width)

        # Follow the lower half's spatial size so the last valid conv lands on 1×1.
        h, w = img_size - img_size // 2, img_size
        for _ in range(extra):
            h, w = conv_out(h, 5, 2, 2), conv_out(w, 5, 2, 2)
        w = conv_out(w, 5, 2, 2)
        for _ in range(4):
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)

        def stage(cin: int, cout: int, kernel: int, stride: int | tuple[int, int]) -> nn.Sequential:
            pad, cin, cout = kernel // 2, scaled(cin, width), scaled(cout, width)
            return nn.Sequential(
                NoNormConv2d(cin, cout, kernel, stride, pad), NoNormConv2d(cout, cout, kernel, 1, pad)
            )

        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(NoNormConv2d(3, c32, kernel_size=7, stride=1, padding=3)),
                *[stage(32, 32, 5, 2) for _ in range(extra)],
                stage(32, 64, 5, (1, 2)),  # 48×48 at 96
                stage(64, 128, 5, 2),  # 24×24
                stage(128, 256, 5, 2),  # 12×12
                stage(256, 512, 3, 2),  # 6×6
                stage(512, 512, 3, 2),  # 3×3
                nn.Sequential(
                    NoNormConv2d(c512, c512, kernel_size=(h, w), stride=1, padding=0),  # 1×1
                    NoNormConv2d(c512, c512, kernel_size=1, stride=1, padding=0),
                ),
            ]
        )
        # Kept as (conv, sigmoid) for the reference's state-dict keys; ``logits`` applies only the conv.
        self.binary_pred = nn.Sequential(nn.Conv2d(c512, 1, kernel_size=1, stride=1, padding=0), nn.Sigmoid())

    def logits(self, face_sequences: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores, (B·T, 1) or (N, 1)."""
        x = fold_time(face_sequences) if face_sequences.dim() == 5 else face_sequences
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}×{self.img_size} frames, got {tuple(x.shape[-2:])}")
        x = x[:, :, x.size(2) // 2 :]  # lower half
        for block in self.face_encoder_blocks:
            x = block(x)
        return self.binary_pred[0](x).flatten(1)

    def forward(self, face_sequences: torch.Tensor) -> torch.Tensor:
        """Probability that each frame is real."""
        return torch.sigmoid(self.logits(face_sequences))

    def perceptual_forward(self, false_face_sequences: torch.Tensor) -> torch.Tensor:
        """Adversarial loss for the generator: BCE of generated frames against the "real" label.

        Same value as the reference (BCE on the sigmoid), computed from logits for stability and AMP.
        """
        logits = self.logits(false_face_sequences).float()
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

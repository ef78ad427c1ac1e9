"""The Wav2Lip generator (reference: Rudrabha/Wav2Lip ``models/wav2lip.py``, class ``Wav2Lip``).

A U-Net: the face encoder takes the masked target frame stacked with a reference frame (6 channels),
the audio encoder turns a 0.2 s mel window (1×80×16) into a 512-d code, and the decoder upsamples that
code while concatenating the face features of matching resolution (the skips). At img_size 96 the layer
list (and state-dict keys) equal the reference's; larger sizes add one stride-2 stage per halving
after the stem (encoder) and before the output block (decoder), so the bottleneck still reaches 1×1.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from models.layers import (
    Conv2d,
    Conv2dTranspose,
    audio_encoder,
    extra_stages,
    fold_time,
    halving_sizes,
    res_block,
    scaled,
    unfold_time,
)

STEM_CHANNELS = 16

# Decoder upsampling stages of the reference: (decoded input channels, skip channels concatenated to them,
# output channels, residual blocks); the reference's inputs are 1024, 768, 512, 320 and 160 channels.
_DECODER_UP = [
    (512, 512, 512, 2),
    (512, 256, 384, 2),
    (384, 128, 256, 2),
    (256, 64, 128, 2),
    (128, 32, 64, 2),
]
# An extra full-resolution stage repeats the last one; its input is 64 decoded + 16 skip channels.
_DECODER_EXTRA = (64, STEM_CHANNELS, 64, 2)


class Wav2Lip(nn.Module):
    """Generator: faces (B, 6, T, H, W) + mels (B, T, 1, 80, 16) → frames (B, 3, T, H, W) in [0, 1].

    Also accepts single frames: faces (N, 6, H, W) + mels (N, 1, 80, 16) → (N, 3, H, W).
    The 6 face channels are the target frame with its lower half zeroed, then the reference frame.
    `width` scales every channel count (1.0: the reference).
    """

    def __init__(self, img_size: int = 96, width: float = 1.0) -> None:
        super().__init__()
        self.img_size, self.width = img_size, width
        extra = extra_stages(img_size)
        sizes = [img_size, *halving_sizes(img_size)]  # encoder feature sizes, 96: [96, 48, 24, 12, 6, 3]
        bottleneck = sizes[-1]
        stem, c32, c512 = scaled(STEM_CHANNELS, width), scaled(32, width), scaled(512, width)

        def down(cin: int, cout: int, residuals: int) -> nn.Sequential:
            cin, cout = scaled(cin, width), scaled(cout, width)
            return nn.Sequential(
                Conv2d(cin, cout, kernel_size=3, stride=2, padding=1),
                *[res_block(cout) for _ in range(residuals)],
            )

        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(6, stem, kernel_size=7, stride=1, padding=3)),
                *[down(STEM_CHANNELS, STEM_CHANNELS, 2) for _ in range(extra)],
                down(STEM_CHANNELS, 32, 2),
                down(32, 64, 3),
                down(64, 128, 2),
                down(128, 256, 2),
                down(256, 512, 1),
                nn.Sequential(
                    Conv2d(c512, c512, kernel_size=bottleneck, stride=1, padding=0),  # 1×1
                    Conv2d(c512, c512, kernel_size=1, stride=1, padding=0),
                ),
            ]
        )

        self.audio_encoder = audio_encoder(last_stage_residuals=1, width=width)

        def up(decoded: int, skip: int, cout: int, residuals: int, src: int, dst: int) -> nn.Sequential:
            cin, cout = scaled(decoded, width) + scaled(skip, width), scaled(cout, width)
            # output_padding makes the transposed conv land exactly on the encoder's size (dst).
            return nn.Sequential(
                Conv2dTranspose(cin, cout, 3, stride=2, padding=1, output_padding=dst - 2 * src + 1),
                *[res_block(cout) for _ in range(residuals)],
            )

        up_specs = _DECODER_UP + [_DECODER_EXTRA] * extra
        up_sizes = list(pairwise(sizes[::-1]))  # 96: (3, 6), (6, 12), ..., (48, 96)
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(c512, c512, kernel_size=1, stride=1, padding=0)),
                nn.Sequential(
                    Conv2dTranspose(2 * c512, c512, kernel_size=bottleneck, stride=1, padding=0),
                    res_block(c512),
                ),
                *[up(*spec, *io) for spec, io in zip(up_specs, up_sizes, strict=True)],
            ]
        )

        self.output_block = nn.Sequential(
            Conv2d(scaled(64, width) + stem, c32, kernel_size=3, stride=1, padding=1),
            nn.Conv2d(c32, 3, kernel_size=1, stride=1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> torch.Tensor:
        """Generate frames; argument order (audio, faces) as in the reference."""
        batch = face_sequences.size(0)
        sequence = face_sequences.dim() == 5
        if sequence:
            audio_sequences = audio_sequences.transpose(0, 1).flatten(0, 1)  # (T·B, 1, 80, 16), time-major
            face_sequences = fold_time(face_sequences)
        if face_sequences.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}×{self.img_size} faces, got {tuple(face_sequences.shape[-2:])}"
            )

        feats = []
        x = face_sequences
        for block in self.face_encoder_blocks:
            x = block(x)
            feats.append(x)

        x = self.audio_encoder(audio_sequences)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), feats.pop()), dim=1)

        out = self.output_block(x)
        return unfold_time(out, batch) if sequence else out

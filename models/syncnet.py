"""The expert lip-sync discriminator (reference: Rudrabha/Wav2Lip ``models/syncnet.py``, ``SyncNet_color``).

Two encoders map a 5-frame window of lower-half faces (15×H/2×W) and the matching 0.2 s mel window
(1×80×16) to L2-normalised 512-d embeddings; their cosine similarity is read as the probability that the
pair is in sync and trained with binary cross-entropy (the reference's ``cosine_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.frames import SYNC_FRAMES
from models.layers import Conv2d, audio_encoder, conv_out, extra_stages, res_block, scaled

"""Frames per SyncNet window (the face input stacks their RGB channels: 15)."""

EMBEDDING_DIM = 512


class SyncNet(nn.Module):
    """Faces (B, 15, H/2, W) + mels (B, 1, 80, 16) → (audio, face) embeddings, each (B, 512·width) and
    unit-norm. `width` scales every channel count (1.0: the reference)."""

    def __init__(self, img_size: int = 96, width: float = 1.0) -> None:
        super().__init__()
        self.img_size, self.width = img_size, width
        extra = extra_stages(img_size)
        c32, c64, c128, c256, c512 = (scaled(c, width) for c in (32, 64, 128, 256, EMBEDDING_DIM))

        # Follow the spatial size of the lower-half input so the last valid conv lands on 1×1.
        h, w = img_size // 2, img_size
        for _ in range(extra):
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        h, w = conv_out(h, 5, 1, 1), conv_out(w, 5, 2, 1)
        for _ in range(4):
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)

        extra_layers = [
            layer
            for _ in range(extra)
            for layer in (
                Conv2d(c32, c32, kernel_size=3, stride=2, padding=1),
                res_block(c32),
                res_block(c32),
            )
        ]
        self.face_encoder = nn.Sequential(
            Conv2d(SYNC_FRAMES * 3, c32, kernel_size=7, stride=1, padding=3),
            *extra_layers,
            Conv2d(c32, c64, kernel_size=5, stride=(1, 2), padding=1),  # 46×47 at 96
            res_block(c64),
            res_block(c64),
            Conv2d(c64, c128, kernel_size=3, stride=2, padding=1),  # 23×24
            res_block(c128),
            res_block(c128),
            res_block(c128),
            Conv2d(c128, c256, kernel_size=3, stride=2, padding=1),  # 12×12
            res_block(c256),
            res_block(c256),
            Conv2d(c256, c512, kernel_size=3, stride=2, padding=1),  # 6×6
            res_block(c512),
            res_block(c512),
            Conv2d(c512, c512, kernel_size=3, stride=2, padding=1),  # 3×3
            Conv2d(c512, c512, kernel_size=(h, w), stride=1, padding=0),  # 1×1
            Conv2d(c512, c512, kernel_size=1, stride=1, padding=0),
        )
        self.audio_encoder = audio_encoder(last_stage_residuals=2, width=width)

    def forward(
        self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch; argument and result order (audio, faces) as in the reference."""
        return self.embed_audio(audio_sequences), self.embed_faces(face_sequences)

    def embed_faces(self, face_sequences: torch.Tensor) -> torch.Tensor:
        """Unit face embeddings of (B, 15, H/2, W) lower halves (one face pass serves many mel shifts)."""
        expected = (SYNC_FRAMES * 3, self.img_size // 2, self.img_size)
        if tuple(face_sequences.shape[1:]) != expected:
            raise ValueError(f"expected faces (B, {expected}), got {tuple(face_sequences.shape)}")
        return F.normalize(self.face_encoder(face_sequences).flatten(1), p=2, dim=1)

    def embed_audio(self, audio_sequences: torch.Tensor) -> torch.Tensor:
        """Unit audio embeddings of (B, 1, 80, 16) mel windows."""
        return F.normalize(self.audio_encoder(audio_sequences).flatten(1), p=2, dim=1)


def sync_probability(audio_emb: torch.Tensor, face_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair as an in-sync probability, shape (B,).

    The embeddings come out of a ReLU, so the similarity is already in [0, 1]; the clamp only absorbs
    rounding so that it is a valid input to binary cross-entropy.
    """
    return F.cosine_similarity(audio_emb, face_emb, dim=1).clamp(0.0, 1.0)


def sync_loss(audio_emb: torch.Tensor, face_emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of :func:`sync_probability` against labels (1 in sync, 0 not), mean over the batch.

    Computed in float32 with autocast off: ``binary_cross_entropy`` refuses to run under CUDA autocast.
    """
    with torch.autocast(device_type=audio_emb.device.type, enabled=False):
        prob = sync_probability(audio_emb.float(), face_emb.float())
        return F.binary_cross_entropy(prob, labels.reshape(prob.shape).to(prob.dtype))

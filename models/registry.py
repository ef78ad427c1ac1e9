"""Wav2Lip networks: the generator, the expert SyncNet and the visual-quality discriminator.

Layer lists and state-dict keys at img_size 96 match the reference repository (Rudrabha/Wav2Lip);
other sizes (192, 256, ...) add stride-2 stages so every encoder still ends at 1×1.
"""

from __future__ import annotations

from torch import nn

from models.discriminator import QualityDiscriminator
from models.syncnet import SyncNet, sync_loss, sync_probability
from models.wav2lip import Wav2Lip

MODELS: dict[str, type[nn.Module]] = {
    "wav2lip": Wav2Lip,
    "generator": Wav2Lip,
    "syncnet": SyncNet,
    "disc": QualityDiscriminator,
    "discriminator": QualityDiscriminator,
}


def build_model(kind: str, img_size: int = 96, width: float = 1.0) -> nn.Module:
    """A fresh model by name: ``wav2lip``/``generator``, ``syncnet`` or ``disc``/``discriminator``; ``width``
    scales its channel counts (1.0: the reference)."""
    try:
        cls = MODELS[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODELS)}") from None
    return cls(img_size=img_size, width=width)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "MODELS",
    "QualityDiscriminator",
    "SyncNet",
    "Wav2Lip",
    "build_model",
    "count_parameters",
    "sync_loss",
    "sync_probability",
]

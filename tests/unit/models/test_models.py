"""Wav2Lip networks: layer lists against the reference, I/O shapes at several sizes, the sync loss."""

from __future__ import annotations

import pytest
import torch

from models.registry import (
    QualityDiscriminator,
    SyncNet,
    Wav2Lip,
    build_model,
    count_parameters,
    sync_loss,
    sync_probability,
)

# ---------------------------------------------------------------------------------------------------------
# The reference architectures, transcribed from Rudrabha/Wav2Lip models/{wav2lip,syncnet}.py (commit
# db7bc44) independently of our module code. A layer is (kind, cin, cout, kernel):
#   c = conv.Conv2d (conv + BatchNorm), t = conv.Conv2dTranspose (+ BatchNorm),
#   n = conv.nonorm_Conv2d (conv only), p = a bare nn.Conv2d.
# A module is either a flat nn.Sequential (list of layers) or an nn.ModuleList of Sequentials (list of lists).
# ---------------------------------------------------------------------------------------------------------


def R(c: int, n: int) -> list[tuple]:
    """n residual 3×3 Conv2d(c, c) blocks."""
    return [("c", c, c, 3)] * n


REF_WAV2LIP = {
    "face_encoder_blocks": [
        [("c", 6, 16, 7)],
        [("c", 16, 32, 3), *R(32, 2)],
        [("c", 32, 64, 3), *R(64, 3)],
        [("c", 64, 128, 3), *R(128, 2)],
        [("c", 128, 256, 3), *R(256, 2)],
        [("c", 256, 512, 3), *R(512, 1)],
        [("c", 512, 512, 3), ("c", 512, 512, 1)],
    ],
    "audio_encoder": [
        ("c", 1, 32, 3), *R(32, 2),
        ("c", 32, 64, 3), *R(64, 2),
        ("c", 64, 128, 3), *R(128, 2),
        ("c", 128, 256, 3), *R(256, 1),
        ("c", 256, 512, 3), ("c", 512, 512, 1),
    ],
    "face_decoder_blocks": [
        [("c", 512, 512, 1)],
        [("t", 1024, 512, 3), *R(512, 1)],
        [("t", 1024, 512, 3), *R(512, 2)],
        [("t", 768, 384, 3), *R(384, 2)],
        [("t", 512, 256, 3), *R(256, 2)],
        [("t", 320, 128, 3), *R(128, 2)],
        [("t", 160, 64, 3), *R(64, 2)],
    ],
    "output_block": [("c", 80, 32, 3), ("p", 32, 3, 1)],
}  # fmt: skip

REF_SYNCNET = {
    "face_encoder": [
        ("c", 15, 32, 7),
        ("c", 32, 64, 5), *R(64, 2),
        ("c", 64, 128, 3), *R(128, 3),
        ("c", 128, 256, 3), *R(256, 2),
        ("c", 256, 512, 3), *R(512, 2),
        ("c", 512, 512, 3), ("c", 512, 512, 3), ("c", 512, 512, 1),
    ],
    "audio_encoder": [
        ("c", 1, 32, 3), *R(32, 2),
        ("c", 32, 64, 3), *R(64, 2),
        ("c", 64, 128, 3), *R(128, 2),
        ("c", 128, 256, 3), *R(256, 2),
        ("c", 256, 512, 3), ("c", 512, 512, 1),
    ],
}  # fmt: skip

REF_DISC = {
    "face_encoder_blocks": [
        [("n", 3, 32, 7)],
        [("n", 32, 64, 5), ("n", 64, 64, 5)],
        [("n", 64, 128, 5), ("n", 128, 128, 5)],
        [("n", 128, 256, 5), ("n", 256, 256, 5)],
        [("n", 256, 512, 3), ("n", 512, 512, 3)],
        [("n", 512, 512, 3), ("n", 512, 512, 3)],
        [("n", 512, 512, 3), ("n", 512, 512, 1)],
    ],
    "binary_pred": [("p", 512, 1, 1)],
}

PUBLISHED_MILLIONS = {"wav2lip": 36.3, "syncnet": 16.4, "disc": 14.1}
REFERENCE = {"wav2lip": REF_WAV2LIP, "syncnet": REF_SYNCNET, "disc": REF_DISC}


def layer_entries(path: str, layer: tuple) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes one reference layer produces."""
    kind, cin, cout, k = layer
    conv = f"{path}.conv_block.0" if kind in "ctn" else path
    weight = (cin, cout, k, k) if kind == "t" else (cout, cin, k, k)
    entries = {f"{conv}.weight": weight, f"{conv}.bias": (cout,)}
    if kind in "ct":
        bn = f"{path}.conv_block.1"
        entries |= {f"{bn}.{name}": (cout,) for name in ("weight", "bias", "running_mean", "running_var")}
        entries[f"{bn}.num_batches_tracked"] = ()
    return entries


def reference_state_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, module in spec.items():
        for i, item in enumerate(module):
            layers = item if isinstance(item, list) else [item]
            for j, layer in enumerate(layers):
                path = f"{name}.{i}.{j}" if isinstance(item, list) else f"{name}.{i}"
                out |= layer_entries(path, layer)
    return out


def reference_parameter_count(spec: dict) -> int:
    total = 0
    for key, shape in reference_state_shapes(spec).items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            total += torch.Size(shape).numel()
    return total


@pytest.mark.parametrize("kind", ["wav2lip", "syncnet", "disc"])
def test_matches_reference_layer_for_layer(kind: str) -> None:
    model = build_model(kind)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == reference_state_shapes(REFERENCE[kind])  # same keys, same shapes: checkpoints load
    expected = reference_parameter_count(REFERENCE[kind])
    assert count_parameters(model) == expected
    assert round(expected / 1e6, 1) == PUBLISHED_MILLIONS[kind]


def test_syncnet_shapes_and_unit_norm() -> None:
    model = SyncNet().eval()
    with torch.no_grad():
        audio, face = model(torch.randn(3, 1, 80, 16), torch.rand(3, 15, 48, 96))
    assert audio.shape == face.shape == (3, 512)
    torch.testing.assert_close(audio.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(face.norm(dim=1), torch.ones(3))
    assert ((p := sync_probability(audio, face)) >= 0).all() and (p <= 1).all()


def test_generator_shapes_and_time_order() -> None:
    """(B, 6, T, H, W) → (B, 3, T, H, W) in [0, 1]; frame t of the output equals the 4-D call on frame t."""
    model = Wav2Lip().eval()  # eval: no batch statistics, so frames are independent
    audio, faces = torch.randn(2, 2, 1, 80, 16), torch.rand(2, 6, 2, 96, 96)
    with torch.no_grad():
        seq = model(audio, faces)
        single = model(audio[:, 1], faces[:, :, 1])
    assert seq.shape == (2, 3, 2, 96, 96) and single.shape == (2, 3, 96, 96)
    assert seq.min() >= 0 and seq.max() <= 1
    torch.testing.assert_close(seq[:, :, 1], single)


def test_discriminator_shapes_and_losses() -> None:
    model = QualityDiscriminator()
    frames = torch.rand(2, 3, 2, 96, 96)
    pred = model(frames)
    assert pred.shape == (4, 1) and ((pred > 0) & (pred < 1)).all()
    loss = model.perceptual_forward(frames)
    expected = torch.nn.functional.binary_cross_entropy(pred, torch.ones_like(pred))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert model(frames[:, :, 0]).shape == (2, 1)


def test_discriminator_sees_only_the_lower_half() -> None:
    model = QualityDiscriminator().eval()
    frames = torch.rand(1, 3, 96, 96)
    changed = frames.clone()
    changed[:, :, :48] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(frames), model(changed))


@pytest.mark.parametrize("img_size", [192])
def test_larger_image_sizes(img_size: int) -> None:
    s = img_size
    with torch.no_grad():
        gen = Wav2Lip(s).eval()
        assert gen(torch.randn(1, 1, 1, 80, 16), torch.rand(1, 6, 1, s, s)).shape == (1, 3, 1, s, s)
        audio, face = SyncNet(s).eval()(torch.randn(1, 1, 80, 16), torch.rand(1, 15, s // 2, s))
        assert audio.shape == face.shape == (1, 512)
        assert QualityDiscriminator(s).eval()(torch.rand(1, 3, 1, s, s)).shape == (1, 1)


@pytest.mark.parametrize("img_size", [128, 160, 256, 288, 384])
def test_other_sizes_reach_1x1_shape_only(img_size: int) -> None:
    """Shape propagation only, on the meta device (no memory, no compute)."""
    s = img_size
    with torch.device("meta"):
        assert Wav2Lip(s)(torch.empty(2, 1, 80, 16), torch.empty(2, 6, s, s)).shape == (2, 3, s, s)
        assert SyncNet(s)(torch.empty(2, 1, 80, 16), torch.empty(2, 15, s // 2, s))[1].shape == (2, 512)
        assert QualityDiscriminator(s)(torch.empty(2, 3, s, s)).shape == (2, 1)


def test_rejects_bad_sizes() -> None:
    for bad in (64, 97):
        with pytest.raises(ValueError, match="img_size"):
            Wav2Lip(bad)
    with pytest.raises(ValueError, match="192"):
        Wav2Lip(96)(torch.randn(1, 1, 80, 16), torch.rand(1, 6, 192, 192))
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("vqgan")


def test_sync_loss_behaviour() -> None:
    emb = torch.nn.functional.normalize(torch.rand(4, 512), dim=1)
    other = torch.nn.functional.normalize(torch.rand(4, 512), dim=1)
    ones, zeros = torch.ones(4), torch.zeros(4, 1)
    assert sync_loss(emb, emb, ones) < 1e-3  # identical and labelled in sync: ~0
    assert sync_loss(emb, emb, zeros) > 10  # identical but labelled off-sync: very high
    assert sync_loss(emb, other, ones) > sync_loss(emb, emb, ones)

    a, f = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    sync_loss(a, f, zeros).backward()  # the worst case (cosine exactly 1, label 0) still has finite gradients
    assert torch.isfinite(a.grad).all() and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("kind", ["wav2lip", "syncnet", "disc"])
def test_width_one_is_the_reference_and_narrower_is_smaller(kind: str) -> None:
    """width 1.0 is today's model key for key; 0.25 keeps the keys with about a sixteenth of the weights."""
    ref = {k: tuple(v.shape) for k, v in build_model(kind).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in build_model(kind, 96, 1.0).state_dict().items()} == ref
    narrow = build_model(kind, 96, 0.25)
    assert set(narrow.state_dict()) == set(ref)
    ratio = count_parameters(narrow) / count_parameters(build_model(kind))
    assert 0.04 < ratio < 0.09


def test_narrow_models_run() -> None:
    w = 0.25
    with torch.no_grad():
        audio, face = SyncNet(96, w).eval()(torch.randn(2, 1, 80, 16), torch.rand(2, 15, 48, 96))
        assert audio.shape == face.shape == (2, 128)
        out = Wav2Lip(96, w).eval()(torch.randn(2, 2, 1, 80, 16), torch.rand(2, 6, 2, 96, 96))
        assert out.shape == (2, 3, 2, 96, 96)
        assert QualityDiscriminator(96, w)(torch.rand(1, 3, 96, 96)).shape == (1, 1)


def test_checkpoint_records_width(tmp_path) -> None:
    from models.checkpoint import checkpoint_payload, load_model, save_checkpoint

    model = build_model("syncnet", 96, 0.25)
    path = save_checkpoint(str(tmp_path / "c"), checkpoint_payload(model, "syncnet", 96, 0))
    loaded = load_model(path, expected_kind="syncnet")
    assert loaded.model.width == 0.25
    assert count_parameters(loaded.model) == count_parameters(model)

"""Training: window making and selection (plain functions), then short CPU runs of both jobs on Ray Train.

The runs use the real architectures at img_size 96 with a global batch of 2 and 1-2 steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import BadInput
from lipsync.cli import main
from models.checkpoint import checkpoint_payload, load_model, save_checkpoint
from models.frames import SYNC_FRAMES
from models.registry import build_model
from models.syncnet import SYNC_FRAMES as MODEL_SYNC_FRAMES
from pipeline.shards import encode_jpegs
from training.augment import AugmentConfig
from training.checkpoints import latest_checkpoint
from training.config import validate
from training.data import (
    DataSelection,
    WindowConfig,
    WindowMaker,
    clip_rng,
    select_clips,
    sync_samples,
    valid_starts,
    wav2lip_samples,
    windows_dataset,
)
from training.devices import amp_settings
from training.metrics import metric_history, mlflow_client
from training.optim import build_optimizer
from training.streams import select_splits, window_passes
from training.syncnet_job import SyncNetConfig
from training.syncnet_job import run as run_syncnet
from training.wav2lip_job import DISC_FILE, Wav2LipConfig
from training.wav2lip_job import run as run_wav2lip

N_FRAMES = 40
UPPER_RED = 200


# ---------------------------------------------------------------- a shard row whose pixels and mels say where they come from


def frame_value(t: int) -> int:
    """Red level of the lower half of frame t."""
    return 10 + 4 * t


def fake_row(n_frames: int = N_FRAMES) -> dict:
    """Frames with red = 200 above and 10 + 4t below (green 128, blue 30); mel column j holds j."""
    frames = np.zeros((n_frames, 96, 96, 3), np.uint8)
    frames[..., 1], frames[..., 2] = 128, 30
    frames[:, :48, :, 0] = UPPER_RED
    for t in range(n_frames):
        frames[t, 48:, :, 0] = frame_value(t)
    mel_frames = 1 + n_frames * 640 // 200
    mel = np.tile(np.arange(mel_frames, dtype=np.float32), (80, 1))
    return {
        "clip_id": "clip",
        "crops": encode_jpegs(frames),
        "mel": mel.astype("<f4").tobytes(),
        "mel_frames": mel_frames,
        "n_frames": n_frames,
        "fps": 25.0,
        "av_offset_frames": 0,
    }


def red_levels(faces_bgr: np.ndarray) -> list[float]:
    """Mean red level of each frame of BGR channels stacked frame-major (3·i + c)."""
    return [float(faces_bgr[3 * i + 2].mean()) for i in range(len(faces_bgr) // 3)]


def test_window_length_matches_the_model() -> None:
    assert SYNC_FRAMES == MODEL_SYNC_FRAMES


def test_positives_are_aligned_and_negatives_off_sync() -> None:
    cfg = WindowConfig(windows_per_clip=8, negative_min_shift=3)
    samples = sync_samples(fake_row(), cfg, 96, np.random.default_rng(0))
    assert len(samples) == 16 and sum(float(s["label"]) for s in samples) == 8
    for s in samples:
        start, mel_start = int(s["start"]), int(s["mel_start_frame"])
        assert s["faces"].shape == (15, 48, 96) and s["mel"].shape == (1, 80, 16)
        # faces: the lower halves of frames start..start+4, BGR (blue 30 in channel 0)
        assert np.allclose(red_levels(s["faces"]), [frame_value(start + i) for i in range(5)], atol=2)
        assert abs(float(s["faces"][0].mean()) - 30) < 2
        # mel: the window starting at int(80 * frame / 25), for the same frame (positives) or a far one
        assert s["mel"][0, 0, 0] == int(80 * mel_start / 25)
        assert np.array_equal(s["mel"][0, 0], np.arange(16) + int(80 * mel_start / 25))
        if s["label"] == 1:
            assert mel_start == start
        else:
            assert abs(mel_start - start) >= 3


def test_generator_samples_mask_the_lower_half_and_use_another_reference() -> None:
    cfg = WindowConfig(windows_per_clip=6)
    for s in wav2lip_samples(fake_row(), cfg, 96, np.random.default_rng(1)):
        start, ref = int(s["start"]), int(s["reference_start"])
        assert s["x"].shape == (6, 5, 96, 96) and s["y"].shape == (3, 5, 96, 96)
        assert abs(ref - start) >= SYNC_FRAMES  # no frame shared with the target
        target, reference = s["x"][:3].astype(float), s["x"][3:].astype(float)
        assert (target[:, :, 48:] == 0).all()
        assert abs(target[2, :, :40].mean() - UPPER_RED) < 2  # upper half kept (red in BGR channel 2)
        for i in range(SYNC_FRAMES):
            assert abs(s["y"][2, i, 56:].mean() - frame_value(start + i)) < 2
            assert abs(reference[2, i, 56:].mean() - frame_value(ref + i)) < 2
            assert s["indiv_mels"][i, 0, 0, 0] == int(80 * (start + i) / 25)
        assert s["mel"][0, 0, 0] == int(80 * start / 25)


def test_windows_are_deterministic_per_clip_and_stay_inside_it() -> None:
    row = fake_row()
    maker = WindowMaker("syncnet", WindowConfig(windows_per_clip=4, seed=3), 96)
    a, b = maker(row), maker(row)
    assert all(np.array_equal(x["mel"], y["mel"]) for x, y in zip(a, b, strict=True))
    assert set(a[0]) == {"faces", "mel", "label"}
    starts = valid_starts(N_FRAMES, row["mel_frames"])
    assert starts.min() == 0 and starts.max() == N_FRAMES - SYNC_FRAMES
    assert int(80 * starts.max() / 25) + 16 <= row["mel_frames"]
    assert clip_rng(0, "a").integers(1 << 30) != clip_rng(0, "b").integers(1 << 30)


def test_larger_img_size_resizes_crops() -> None:
    s = sync_samples(fake_row(), WindowConfig(windows_per_clip=1), 192, np.random.default_rng(0))[0]
    assert s["faces"].shape == (15, 96, 192)


def test_selection_filters() -> None:
    clips = pd.DataFrame(
        {
            "clip_id": list("abcde"),
            "language": ["en", "en", "hi", "hi", "es"],
            "speaker": ["s1", "s2", "s3", "s3", "s4"],
            "split": ["train", "val", "train", "train", "train"],
            "av_offset_frames": [0, 1, -3, 2, 0],
            "av_offset_confidence": [0.9, 0.9, 0.9, 0.2, 0.9],
            "face_size": [120.0, 120.0, 120.0, 120.0, 60.0],
        }
    )

    def ids(**kw: object) -> list[str]:
        split = kw.pop("split", None)
        return sorted(select_clips(clips, DataSelection(**kw), split)["clip_id"])  # type: ignore[arg-type]

    assert ids() == list("abcde")
    assert ids(languages=("hi",)) == ["c", "d"]
    assert ids(speakers=("s1", "s4")) == ["a", "e"]
    assert ids(split="train") == ["a", "c", "d", "e"]
    assert ids(max_abs_offset=2) == ["a", "b", "d", "e"]
    assert ids(min_offset_confidence=0.5) == ["a", "b", "c", "e"]
    assert ids(min_face_size=100.0) == list("abcd")
    assert ids(languages=("hi",), max_abs_offset=2, min_offset_confidence=0.5) == []


def test_amp_settings_with_a_fake_gpu() -> None:
    assert not amp_settings(gpu=False, bf16_supported=True).enabled
    bf16 = amp_settings(gpu=True, bf16_supported=True)
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.scaler
    fp16 = amp_settings(gpu=True, bf16_supported=False)
    assert fp16.enabled and fp16.dtype == torch.float16 and fp16.scaler


def test_optimizer_is_adam_with_the_betas_or_sgd_and_unknown_names_are_refused() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = build_optimizer(params, "adam", 1e-3, (0.5, 0.999))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.5, 0.999)
    sgd = build_optimizer(params, "sgd", 1e-2)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(BadInput, match="optimizer must be one of adam, sgd, not 'lamb'"):
        validate(SyncNetConfig(optimizer="lamb"))


GLOBAL_BN_SCRIPT = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from training.distributed import GlobalBatchNorm2d

def worker(rank, out):
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        x, upstream = torch.randn(6, 3, 4, 5, generator=g) * 3 + 1, torch.randn(6, 3, 4, 5, generator=g)
        x, upstream = x.to(dtype), upstream.to(dtype)
        bn = GlobalBatchNorm2d(3).to(dtype).train()
        part = x[3 * rank : 3 * rank + 3].clone().requires_grad_()
        y = bn(part)
        (y * upstream[3 * rank : 3 * rank + 3]).sum().backward()
        torch.save({"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "mean": bn.running_mean, "var": bn.running_var}, f"{out}/rank{rank}_{str(dtype)[6:]}.pt")

if __name__ == "__main__":
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=2, start_method="fork")
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_batchnorm_over_two_gloo_workers_equals_one_batch(tmp_path: Path, dtype: torch.dtype) -> None:
    """Two workers with 3 samples each: outputs, input/weight gradients and running stats of BatchNorm2d
    on all 6 (the DDP update equality rests on this). In float64 to float64 precision: the statistics are
    not computed in float32 behind the caller's back."""
    import os
    import subprocess
    import sys

    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-c", GLOBAL_BN_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}_{str(dtype)[6:]}.pt") for r in (0, 1)]
    assert ranks[0]["y"].dtype == dtype
    g = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(6, 3, 4, 5, generator=g) * 3 + 1, torch.randn(6, 3, 4, 5, generator=g)
    bn = torch.nn.BatchNorm2d(3).to(dtype).train()
    x, upstream = x.to(dtype).requires_grad_(), upstream.to(dtype)
    y = bn(x)
    (y * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12

    def close(ours: torch.Tensor, reference: torch.Tensor, scale: float = 1.0) -> bool:
        return torch.allclose(ours, reference, rtol=tol, atol=scale * tol)

    assert close(torch.cat([r["y"] for r in ranks]), y)
    assert close(torch.cat([r["dx"] for r in ranks]), x.grad)
    assert close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, 10)
    assert close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, 10)
    assert close(ranks[0]["mean"], bn.running_mean) and close(ranks[1]["var"], bn.running_var)


# ---------------------------------------------------------------- on the preprocessed synth corpus


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synth corpus preprocessed once (conftest's `preprocessed_corpus` when it exists)."""
    try:
        return request.getfixturevalue("preprocessed_corpus")
    except pytest.FixtureLookupError:
        from pipeline.preprocess import run
        from pipeline.preprocess_config import PreprocessConfig

        request.getfixturevalue("ray_session")
        out = tmp_path_factory.mktemp("train_corpus")
        run(PreprocessConfig(), str(request.getfixturevalue("synth_corpus")), str(out))
        return out


def small(cls: type, **changes: object):  # noqa: ANN201
    """A job config for a quick CPU run: global batch 2, few windows, checkpoint and log every step."""
    base = {
        "steps": 2,
        "batch_size": 2,
        "checkpoint_every": 1,
        "eval_every": 2,
        "log_every": 1,
        "eval_clips": 1,
        "eval_windows_per_clip": 1,
        "shuffle_buffer": 8,
        "windows": WindowConfig(windows_per_clip=2),
    }
    return cls(**(base | changes))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    """Run `lipsync ... --json` in-process; (exit code, last stdout JSON line, stderr)."""
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_splits_and_streamed_windows(corpus: Path, ray_session) -> None:  # noqa: ANN001
    train, val = select_splits(str(corpus), small(SyncNetConfig, eval_clips=None))
    clips = pd.read_parquet(corpus / "clips.parquet")
    assert set(train.clip_ids) == set(clips[clips.split == "train"].clip_id)
    assert set(val.clip_ids) == set(clips[clips.split == "val"].clip_id)
    ds = windows_dataset(train, "syncnet", WindowConfig(windows_per_clip=3), 96)
    rows = ds.take_all()
    assert len(rows) == 2 * 3 * len(train.clip_ids)
    assert sum(r["label"] for r in rows) == 3 * len(train.clip_ids)
    assert rows[0]["faces"].dtype == np.uint8 and rows[0]["faces"].shape == (15, 48, 96)


def sample_digest(sample: dict) -> str:
    return hashlib.sha256(
        sample["faces"].tobytes() + sample["mel"].tobytes() + bytes([int(sample["label"])])
    ).hexdigest()


def test_each_pass_of_the_train_windows_cuts_new_windows(corpus: Path, ray_session) -> None:  # noqa: ANN001
    """A run longer than one pass over the windows gets distinct windows per pass, not the same ones again."""
    train, _ = select_splits(str(corpus), small(SyncNetConfig, eval_clips=None))
    windows = WindowConfig(windows_per_clip=3)
    one = windows_dataset(train, "syncnet", windows, 96).take_all()
    rows = windows_dataset(train, "syncnet", windows, 96, passes=2).take_all()
    assert len(rows) == 2 * len(one) == 2 * 2 * 3 * len(train.clip_ids)
    first, both = {sample_digest(r) for r in one}, {sample_digest(r) for r in rows}
    assert set(first) < set(both)  # pass 0 is the one-pass dataset; pass 1 brings windows it lacks
    per_pass = len(train.clip_ids) * 3 * 2
    cfg = small(SyncNetConfig, windows=windows, batch_size=per_pass)
    assert window_passes(dataclasses.replace(cfg, steps=1), "syncnet", len(train.clip_ids)) == 1
    assert window_passes(dataclasses.replace(cfg, steps=3), "syncnet", len(train.clip_ids)) == 3
    assert window_passes(dataclasses.replace(cfg, steps=10_000), "syncnet", len(train.clip_ids)) == 8
    fixed = dataclasses.replace(cfg, steps=10_000, windows=dataclasses.replace(windows, passes=1))
    assert window_passes(fixed, "syncnet", len(train.clip_ids)) == 1


def test_bad_inputs_exit_2(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "train", "syncnet", str(corpus), str(tmp_path / "o"), "--languages", "xx")
    assert code == 2 and "no clips for language(s) xx" in out["error"] and len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "clips.parquet").write_bytes((corpus / "clips.parquet").read_bytes())
    code, out, _ = cli(capsys, "train", "syncnet", str(empty), str(tmp_path / "o"))
    assert code == 2 and "empty shard set" in out["error"]

    wrong = tmp_path / "disc"
    save_checkpoint(str(wrong), checkpoint_payload(build_model("disc"), "disc", 96, 0))
    code, out, _ = cli(capsys, "train", "wav2lip", str(corpus), str(tmp_path / "o"), "--syncnet", str(wrong))
    assert code == 2 and "holds a disc model, expected syncnet" in out["error"]

    code, out, _ = cli(
        capsys, "train", "syncnet", str(corpus), str(tmp_path / "o"), "--init-from", str(wrong)
    )
    assert code == 2 and "expected syncnet" in out["error"]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SyncNet checkpoint with weights of its own (seed 123) to fine-tune from."""
    torch.manual_seed(123)
    directory = tmp_path_factory.mktemp("base") / "checkpoint_00000007"
    save_checkpoint(str(directory), checkpoint_payload(build_model("syncnet"), "syncnet", 96, 7))
    return directory


@pytest.fixture(scope="module")
def syncnet_run(corpus: Path, base_checkpoint: Path, ray_session, tmp_path_factory) -> tuple[Path, dict]:  # noqa: ANN001
    """One short run: fine-tuning the base checkpoint on Hindi clips only, on a cosine lr schedule."""
    out = tmp_path_factory.mktemp("syncnet_out")
    cfg = small(SyncNetConfig, data=DataSelection(languages=("hi",)), lr_schedule="cosine")
    return out, run_syncnet(cfg, str(corpus), str(out), init_from=str(base_checkpoint))


def test_syncnet_run_checkpoints_and_logs(syncnet_run: tuple[Path, dict]) -> None:
    out, result = syncnet_run
    assert result["step"] == 2 and Path(result["checkpoint"]).name == "checkpoint_00000002"
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(result["metrics"])
    loaded = load_model(
        str(out), expected_kind="syncnet"
    )  # an OUT directory resolves to its newest checkpoint
    assert loaded.step == 2 and loaded.config["batch_size"] == 2 and loaded.optimizer is not None
    checkpoints = sorted(p.name for p in (out / "syncnet").glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_00000001", "checkpoint_00000002"]
    history = metric_history(result["mlflow_tracking_uri"], result["mlflow_run_id"], "train_loss")
    assert [step for step, _ in history] == [1, 2]
    lr = loaded.config["lr"]  # the cosine of 2 steps: the first at lr, the second at half of it
    assert metric_history(result["mlflow_tracking_uri"], result["mlflow_run_id"], "lr") == [
        (1, pytest.approx(lr)),
        (2, pytest.approx(lr / 2)),
    ]


@pytest.mark.timeout(420)
def test_workers_leaving_less_than_one_free_cpu_still_get_their_windows(
    corpus: Path,
    ray_session,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """2 workers x 0.8 CPU on the 2-CPU session Ray leave 0.4 CPU: the window tasks (0.2 each) must fit there.
    With `read_parquet` the run waited forever for a whole free CPU (its file-listing tasks take one)."""
    cfg = small(SyncNetConfig, workers=2, cpus_per_worker=0.8, data_cpus_per_task=0.2, eval_clips=0)
    result = run_syncnet(cfg, str(corpus), str(tmp_path / "out"))
    assert result["step"] == 2


def test_init_from_fine_tunes_one_language(syncnet_run: tuple[Path, dict], base_checkpoint: Path) -> None:
    _, result = syncnet_run
    tuned = load_model(result["checkpoint"], "syncnet").model.state_dict()
    base = load_model(str(base_checkpoint), "syncnet").model.state_dict()
    torch.manual_seed(0)
    fresh = build_model("syncnet").state_dict()  # what the run would start from without --init-from
    assert load_model(result["checkpoint"], "syncnet").config["data"]["languages"] == ["hi"]
    conv = "face_encoder.0.conv_block.0.weight"
    assert (tuned[conv] - base[conv]).abs().max() < 1e-3  # two Adam steps of lr 1e-4 away from the base
    assert (fresh[conv] - base[conv]).abs().max() > 1e-2


def test_a_checkpoint_cut_short_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    """A worker killed while Ray Train copies a checkpoint into place leaves a truncated model.pt."""
    model = build_model("syncnet", 96)
    for step in (4, 8):
        save_checkpoint(
            str(tmp_path / "syncnet" / f"checkpoint_{step:08d}"),
            checkpoint_payload(model, "syncnet", 96, step),
        )
    newest = tmp_path / "syncnet" / "checkpoint_00000008" / "model.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert latest_checkpoint(str(tmp_path), "syncnet") == (
        str(tmp_path / "syncnet" / "checkpoint_00000004"),
        4,
    )
    newest.unlink()
    (tmp_path / "syncnet" / "checkpoint_00000004" / "model.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path), "syncnet") is None


def test_rerunning_a_finished_command_does_no_more_steps(
    syncnet_run: tuple[Path, dict], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, first = syncnet_run
    config = tmp_path / "small.yaml"
    config.write_text("batch_size: 2\ncheckpoint_every: 1\nwindows: {windows_per_clip: 2}\n")
    before = latest_checkpoint(str(out), "syncnet")
    code, result, _ = cli(
        capsys, "train", "syncnet", str(corpus), str(out), "--steps", "2", "--config", str(config)
    )
    assert code == 0 and result["step"] == 2 and result["already_finished"] is True
    assert result["checkpoint"] == first["checkpoint"] and latest_checkpoint(str(out), "syncnet") == before


def test_wav2lip_run_with_the_expert(syncnet_run: tuple[Path, dict], corpus: Path, tmp_path: Path) -> None:
    _, expert = syncnet_run
    cfg = small(  # a 4-step toy expert; augmented windows (audio too) and a uniform language mix on Ray Data
        Wav2LipConfig,
        checkpoint_every=2,
        expert_max_val_loss=None,
        augment=AugmentConfig(enabled=True, reverb=1.0),
        balance={"language": "uniform"},
    )
    result = run_wav2lip(cfg, str(corpus), str(tmp_path), syncnet=expert["checkpoint"])
    watched = {"train_l1", "train_mouth_l1", "train_sync", "train_disc", "val_l1", "val_mouth_l1"}
    assert result["step"] == 2 and watched <= set(result["metrics"])
    generator = load_model(str(tmp_path), expected_kind="wav2lip")
    assert generator.step == 2 and generator.config["gan"] is True
    assert generator.config["balance"] == {"language": "uniform"} and generator.config["augment"]["enabled"]
    mix = result["data_mix"]["language"]  # the run's data card, also in its MLflow run
    assert len(mix) >= 2 and all(abs(g["window_share"] - 1 / len(mix)) < 0.01 for g in mix.values())
    artifacts = mlflow_client(result["mlflow_tracking_uri"]).list_artifacts(result["mlflow_run_id"])
    assert "data_mix.json" in {a.path for a in artifacts}
    assert (Path(result["checkpoint"]) / DISC_FILE).is_file()
    x = torch.zeros(1, 6, 5, 96, 96)
    assert generator.model(torch.zeros(1, 5, 1, 80, 16), x).shape == (1, 3, 5, 96, 96)

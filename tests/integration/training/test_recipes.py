"""Recipes: one set-up / step / evaluate / payloads per model, driven by Ray Train, Tune trials and plain loops.

No Ray cluster here: a tiny corpus is written straight to parquet, and a trial runs in this process with
Tune's three session calls stood in for (what `tune.Tuner` would provide).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.shards import encode_jpegs

REPO = Path(__file__).resolve().parents[3]
N_FRAMES = 30
TINY = {"batch_size": 2, "eval_windows_per_clip": 1, "shuffle_buffer": 4, "windows": {"windows_per_clip": 2}}


def shard_row(clip_id: str, seed: int) -> dict[str, Any]:
    """A shard row of random 96 px crops and mels (the columns the window makers read)."""
    rng = np.random.default_rng(seed)
    mel_frames = 1 + N_FRAMES * 640 // 200
    return {
        "clip_id": clip_id,
        "crops": encode_jpegs(rng.integers(0, 256, (N_FRAMES, 96, 96, 3), dtype=np.uint8)),
        "mel": rng.standard_normal((80, mel_frames)).astype("<f4").tobytes(),
        "mel_frames": mel_frames,
        "n_frames": N_FRAMES,
        "fps": 25.0,
        "av_offset_frames": 0,
    }


def write_corpus(root: Path) -> Path:
    """A preprocess OUT with one train clip and one val clip in one shard file."""
    rows = [shard_row("train_a", 0), shard_row("val_a", 1)]
    (root / "shards").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "shards" / "part-0.parquet")
    clips = pd.DataFrame(
        {
            "clip_id": ["train_a", "val_a"],
            "language": ["en", "en"],
            "speaker": ["s1", "s2"],
            "split": ["train", "val"],
            "av_offset_frames": [0, 0],
            "shard": ["shards/part-0.parquet"] * 2,
            "n_frames": [N_FRAMES] * 2,
        }
    )
    clips.to_parquet(root / "clips.parquet")
    return root


class FakeTune:
    """Tune's session calls for a function trainable run outside a Tuner: no checkpoint to restore, reports
    (and the payloads of their checkpoints) kept."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict[str, float], dict[str, Any] | None]] = []

    def get_checkpoint(self) -> None:
        return None

    def get_context(self) -> Any:
        return type("Context", (), {"get_trial_id": staticmethod(lambda: "trial_0")})()

    def report(self, metrics: dict[str, float], checkpoint: Any = None) -> None:
        payload = None
        if checkpoint is not None:  # its directory is temporary: read it now
            payload = torch.load(os.path.join(checkpoint.path, "model.pt"), weights_only=False)
        self.reports.append((dict(metrics), payload))


@pytest.mark.parametrize(("schedule", "last_lr"), [("constant", 1e-3), ("cosine", 5e-4)])
def test_a_one_worker_trial_trains_with_the_base_configs_optimizer(
    schedule: str, last_lr: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray import tune

    from tuning.trial import TrialSetup, in_process_trial

    fake = FakeTune()
    for name in ("get_checkpoint", "get_context", "report"):
        monkeypatch.setattr(tune, name, getattr(fake, name))
    data = write_corpus(tmp_path / "data")
    base = TINY | {"optimizer": "sgd", "lr_schedule": schedule}
    setup = TrialSetup("syncnet", str(data), str(tmp_path / "out"), base, 2, 1, 2)
    in_process_trial({"lr": 1e-3}, setup)

    assert [m["step"] for m, _ in fake.reports] == [1, 2]
    payload = fake.reports[-1][1]
    assert payload is not None and payload["step"] == 2
    group = payload["optimizer"]["param_groups"][0]
    assert "momentum" in group and "dampening" in group, f"not SGD: {sorted(group)}"
    assert "betas" not in group and group["momentum"] == 0.9
    assert group["lr"] == pytest.approx(last_lr)  # the second (last) of 2 steps: half the lr on the cosine


PLAIN_LOOP = """
import json, sys, tempfile
import torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests/integration/training"]
from models.checkpoint import checkpoint_payload, save_checkpoint
from models.registry import build_model
from test_recipes import TINY, shard_row
from core.config import from_dict
from training.checkpoints import write_payloads
from training.recipe import recipe_class
from training.streams import BatchStream, val_batches

out = {}
with tempfile.TemporaryDirectory() as tmp:
    expert = save_checkpoint(tmp + "/expert", checkpoint_payload(build_model("syncnet", 96), "syncnet", 96, 0))
    for name in ("syncnet", "wav2lip"):
        recipe_cls = recipe_class(name)
        small = {"steps": 2} if name == "syncnet" else {"steps": 1, "gan": False}  # a GAN step: ~10 s
        cfg = from_dict(recipe_cls.config, TINY | small | {"optimizer": "sgd", "lr_schedule": "cosine"})
        recipe = recipe_cls(cfg, torch.device("cpu"), expert=expert)
        stream = BatchStream([shard_row("a", 0)], cfg, name)
        losses = [recipe.step(next(stream)) for _ in range(cfg.steps)]
        metrics = recipe.evaluate(val_batches([shard_row("b", 1)], cfg, name))
        write_payloads(f"{tmp}/{name}", recipe.payloads(cfg.steps, metrics))
        resumed = recipe_cls(cfg, torch.device("cpu"), resume=recipe.payloads(cfg.steps, metrics), expert=expert)
        out[name] = {
            "losses": losses,
            "metrics": metrics,
            "logged": resumed.logged(),
            "last_lr_share": recipe.optimizers()[0][0].param_groups[0]["lr"] / cfg.lr,
            "resumed_at": resumed.steps_done,
        }
out["ray"] = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(json.dumps(out))
"""


def test_a_plain_loop_drives_both_recipes_without_ray() -> None:
    """What a machine with torch but no Ray runs: set-up, steps, evaluation, payloads, resume."""
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOOP, str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ray"] == []
    assert set(out["syncnet"]["metrics"]) == {"val_loss", "val_accuracy"}
    assert set(out["wav2lip"]["losses"][0]) == {"train_l1", "train_mouth_l1", "train_sync", "train_loss"}
    assert set(out["wav2lip"]["metrics"]) == {"val_l1", "val_mouth_l1", "val_sync"}
    assert "sync_weight" in out["wav2lip"]["logged"]
    # a plain loop trains on the configured cosine too: the second of 2 steps at half the lr
    assert out["syncnet"]["last_lr_share"] == pytest.approx(0.5)
    assert out["syncnet"]["resumed_at"] == 2 and out["wav2lip"]["resumed_at"] == 1

"""`lipsync train syncnet DATA OUT`: the expert lip-sync discriminator, its recipe and its command.

Reference: Rudrabha/Wav2Lip `color_syncnet_train.py` (Adam lr 1e-4, batch 64, BCE of the cosine similarity
of the face and audio embeddings). On Ray Train each worker streams its shard of in-sync/off-sync windows
from Ray Data and drives `SyncNetRecipe` (`training.loop`); rank 0 checkpoints every `checkpoint_every`
steps into OUT/syncnet/checkpoint_<step>/model.pt, which generation and scoring load by path
(`models.checkpoint.load_model`). Tune trials and plain loops drive the same recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.checkpoint import MODEL_FILE, read_payload
from models.registry import build_model, sync_loss
from models.syncnet import sync_probability
from training import expert_health
from training.config import TrainConfig, validate
from training.devices import Amp, images
from training.distributed import global_sum, unwrap
from training.driver import fit_job
from training.optim import backward_step, build_optimizer
from training.recipe import Batch, Payloads, Recipe, finite, load_trained, trained_payload

NAME = "syncnet"


@dataclass(frozen=True)
class SyncNetConfig(TrainConfig):
    """SyncNet training with the reference hparams (lr 1e-4, global batch 64, Adam)."""

    batch_size: int = 64
    lr: float = 1e-4
    eval_at_start: bool = False  # a validation pass before the first step (the untrained baseline)
    stuck_after_steps: int | None = 5000  # warn if val loss is still >= 0.68 from this step (None: never)


def sync_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, amp: Amp
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE loss, in-sync probabilities) of a batch of windows."""
    with amp.autocast(device):
        audio, face = model(batch["mel"].to(device), images(batch["faces"], device))
    return sync_loss(audio, face, batch["label"]), sync_probability(audio.float(), face.float())


class SyncNetRecipe(Recipe):
    """SyncNet, its optimiser and loss scaler: one step is one optimiser step on a batch of windows."""

    name = NAME
    config = SyncNetConfig

    def build(self, expert: str | None) -> None:
        self.model = build_model(NAME, self.cfg.img_size, self.cfg.width).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), self.cfg.optimizer, self.cfg.lr)
        self.scaler = self.amp.grad_scaler()

    def load(self, payloads: Payloads) -> dict[str, Any]:
        return load_trained(payloads[MODEL_FILE], self.model, self.optimizer, self.scaler)

    def init_from(self, uri: str) -> None:
        self.model.load_state_dict(read_payload(uri)[0]["state_dict"])

    def parallelize(self, wrap: Any) -> None:
        self.model = wrap(self.model)

    def watch(self, setup: dict[str, Any] | None, rank: int) -> None:
        self.health = expert_health.Health(setup, self.cfg, rank)  # offset ranks, the stuck warning

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        health = getattr(self, "health", None)
        return health.evaluate(self.model, step, metrics) if health is not None else {}

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        return [(self.optimizer, self.cfg.lr)]

    def update(self, batch: Batch) -> dict[str, float]:
        """One optimiser step; this worker's loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = sync_batch_loss(self.model, batch, self.device, self.amp)
        backward_step(loss, self.optimizer, self.scaler)
        return {"train_loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation BCE and accuracy over every worker's shard of the val windows."""
        model, device = unwrap(self.model).eval(), self.device
        loss_sum = correct = count = 0.0
        for batch in batches:
            loss, prob = sync_batch_loss(model, batch, device, self.amp)
            n = len(prob)
            loss_sum += float(loss) * n
            correct += float(((prob > 0.5).float() == batch["label"].to(device)).sum())
            count += n
        loss_sum, correct, count = global_sum([loss_sum, correct, count], device)
        return {"val_loss": loss_sum / count, "val_accuracy": correct / count} if count else {}

    @torch.no_grad()
    def finite_on(self, batch: Batch) -> bool:
        model = unwrap(self.model).eval()
        audio, face = model(batch["mel"].to(self.device), images(batch["faces"], self.device))
        return finite(model, audio, face)

    def payloads(self, step: int, metrics: dict[str, float]) -> Payloads:
        """model.pt: model + optimiser + step + config (+ the train state: scaler, resume trail)."""
        main = trained_payload(
            self.model, NAME, self.cfg, step, metrics, self.optimizer, self.scaler, self.train_state
        )
        return {MODEL_FILE: main}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop of this recipe (`training.loop.train_loop`)."""
    from training.loop import train_loop as recipe_loop

    recipe_loop(SyncNetRecipe, config)


def run(
    cfg: SyncNetConfig, data: str, out: str, address: str | None = None, init_from: str | None = None
) -> dict:
    """Train (or resume, or do nothing if finished) and return {checkpoint, step, metrics}."""
    validate(cfg)
    health = expert_health.job_setup(data, cfg)
    result = fit_job(NAME, train_loop, cfg, data, out, address=address, init_from=init_from,
                     loop_config={"health": health})  # fmt: skip
    return {**result, "health": expert_health.job_summary(result, cfg, health)}

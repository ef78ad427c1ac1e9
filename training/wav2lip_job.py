"""`lipsync train wav2lip DATA OUT --syncnet CKPT`: the generator, its recipe and its command.

Reference: Rudrabha/Wav2Lip `hq_wav2lip_train.py` (with the visual-quality GAN, the default here) and
`wav2lip_train.py` (`gan: false`). Loss = w_sync · expert sync BCE + w_disc · adversarial + (1 − w_sync −
w_disc) · L1, where L1 is the whole frame's (the reference's) or, with `mouth_weight` w > 0,
(L1 + w · L1 of the mouth box) / (1 + w). The sync weight starts at 0 and becomes 0.03 (0.01 without the GAN)
once the frozen expert's loss on generated validation frames falls below 0.75, as in the reference; disc
weight 0.07; Adam lr 1e-4, betas (0.5, 0.999) with the GAN. Checkpoints hold the generator in model.pt (what
generation loads) and the discriminator in disc.pt. Ray Train workers (`training.loop`), Tune trials and
plain loops all drive `Wav2LipRecipe`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import BadInput
from models.checkpoint import MODEL_FILE, load_model, read_payload
from models.registry import build_model, sync_loss
from models.syncnet import SYNC_FRAMES
from training import expert_health
from training.checkpoints import storage_root
from training.config import TrainConfig, validate
from training.data import WindowConfig
from training.devices import Amp, images
from training.distributed import global_sum, unwrap
from training.driver import fit_job
from training.optim import backward_step, build_optimizer
from training.recipe import Batch, Payloads, Recipe, finite, load_trained, trained_payload

NAME = "wav2lip"
DISC_FILE = "disc.pt"


@dataclass(frozen=True)
class Wav2LipConfig(TrainConfig):
    """Generator training with the reference hparams."""

    steps: int = 200_000
    batch_size: int = 16
    lr: float = 1e-4
    gan: bool = True  # train the visual-quality discriminator (hq_wav2lip_train.py)
    disc_lr: float = 1e-4
    disc_weight: float = 0.07
    sync_weight: float | None = None  # None: 0.03 with the GAN, 0.01 without (the reference's values)
    sync_threshold: float = 0.75  # the sync loss is switched on once the expert's val loss is below this
    mouth_weight: float = 0.0  # extra weight of the mouth box's L1 (0: the reference's whole-frame L1)
    expert_max_val_loss: float | None = 0.75  # refuse an expert whose val loss is above this (None: any)
    eval_clips: int | None = 8
    shuffle_buffer: int = 64
    windows: WindowConfig = field(default_factory=lambda: WindowConfig(windows_per_clip=16))

    @property
    def target_sync_weight(self) -> float:
        if self.sync_weight is not None:
            return self.sync_weight
        return 0.03 if self.gan else 0.01

    @property
    def betas(self) -> tuple[float, float]:
        return (0.5, 0.999) if self.gan else (0.9, 0.999)

    def validate_own(self) -> None:
        if self.mouth_weight < 0:
            raise BadInput(f"mouth_weight must be >= 0 (0: the reference's L1), not {self.mouth_weight}")


# ---------------------------------------------------------------- losses, one step, one evaluation

# Where the mouth moves in a face crop (fractions of its height and width): in the lower half, between the
# nose and the chin. Whole-frame L1 spends most of its weight on pixels the masked input already shows.
MOUTH_BOX = ((0.58, 0.86), (0.30, 0.70))


def mouth_box(frames: torch.Tensor) -> torch.Tensor:
    """The mouth box of (..., H, W) frames."""
    (top, bottom), (left, right) = MOUTH_BOX
    h, w = frames.shape[-2:]
    return frames[..., int(top * h) : int(bottom * h), int(left * w) : int(right * w)]


def reconstruction_loss(losses: dict[str, torch.Tensor], mouth_weight: float) -> torch.Tensor:
    """Whole-frame L1 blended with the mouth box's L1, on the whole-frame L1's scale."""
    return (losses["l1"] + mouth_weight * losses["mouth_l1"]) / (1.0 + mouth_weight)


def expert_sync_loss(expert: nn.Module, mel: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The frozen expert's BCE (label: in sync) on the lower halves of generated (B, 3, 5, H, W) frames."""
    lower = generated[:, :, :, generated.size(3) // 2 :]
    faces = torch.cat([lower[:, :, i] for i in range(SYNC_FRAMES)], dim=1)
    audio, face = expert(mel, faces)
    return sync_loss(audio, face, torch.ones(len(faces), device=faces.device))


def generator_losses(
    gen: nn.Module, disc: nn.Module | None, expert: nn.Module, batch: dict, device: torch.device, amp: Amp
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(generated frames, {l1, mouth_l1, sync, perceptual}) for a batch."""
    x, y = images(batch["x"], device), images(batch["y"], device)
    with amp.autocast(device):
        g = gen(batch["indiv_mels"].to(device), x)
        frames = g.float()
        losses = {
            "l1": F.l1_loss(frames, y),
            "mouth_l1": F.l1_loss(mouth_box(frames), mouth_box(y)),
            "sync": expert_sync_loss(expert, batch["mel"].to(device), g),
        }
        if disc is not None:
            losses["perceptual"] = perceptual_loss(disc, g)
    return g, losses


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The bare module with its parameters out of autograd (gradients still flow to its input)."""
    module = unwrap(model)
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def perceptual_loss(disc: nn.Module, generated: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss; the discriminator is frozen for it (its own step comes next)."""
    with frozen(disc) as module:
        return module.perceptual_forward(generated)


def disc_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, amp: Amp) -> torch.Tensor:
    """The discriminator's BCE: real frames → 1, generated → 0 (terms summed as the reference's two
    backward passes do), in one forward pass so DDP sees one forward per backward."""
    batch = len(real)
    with amp.autocast(real.device):
        scores = disc(torch.cat([real, fake.detach()])).float()
    scores = scores.reshape(-1, 2 * batch)  # time-major rows: (T, 2B)
    real_p, fake_p = scores[:, :batch], scores[:, batch:]
    return F.binary_cross_entropy(real_p, torch.ones_like(real_p)) + F.binary_cross_entropy(
        fake_p, torch.zeros_like(fake_p)
    )


# ---------------------------------------------------------------- the recipe


class Wav2LipRecipe(Recipe):
    """Generator, discriminator (with the GAN), frozen expert, optimisers and loss scalers; one step is a
    generator step and, with the GAN, a discriminator step."""

    name = NAME
    config = Wav2LipConfig

    def build(self, expert: str | None) -> None:
        if not expert:
            raise ValueError("a Wav2Lip recipe needs the expert SyncNet checkpoint")
        cfg, device = self.cfg, self.device
        self.gen = build_model(NAME, cfg.img_size, cfg.width).to(
            device
        )  # before the optimisers: their state lands there
        self.disc = build_model("disc", cfg.img_size, cfg.width).to(device) if cfg.gan else None
        self.expert = load_model(expert, expected_kind="syncnet", device=device).model.eval()
        for p in self.expert.parameters():
            p.requires_grad_(False)
        self.opt = build_optimizer(self.gen.parameters(), cfg.optimizer, cfg.lr, cfg.betas)
        self.disc_opt = (
            build_optimizer(self.disc.parameters(), cfg.optimizer, cfg.disc_lr, cfg.betas)
            if self.disc is not None
            else None
        )
        self.scaler, self.disc_scaler = self.amp.grad_scaler(), self.amp.grad_scaler()
        self.train_state = {"sync_weight": 0.0}

    def load(self, payloads: Payloads) -> dict[str, Any]:
        train_state = load_trained(payloads[MODEL_FILE], self.gen, self.opt, self.scaler)
        if self.disc is not None and DISC_FILE in payloads:
            load_trained(payloads[DISC_FILE], self.disc, self.disc_opt, self.disc_scaler)
        return train_state

    def init_from(self, uri: str) -> None:
        init = read_checkpoint_files(uri)
        self.gen.load_state_dict(init[MODEL_FILE]["state_dict"])
        if self.disc is not None and DISC_FILE in init:
            self.disc.load_state_dict(init[DISC_FILE]["state_dict"])

    def parallelize(self, wrap: Any) -> None:
        self.gen = wrap(self.gen)
        if self.disc is not None:
            self.disc = wrap(self.disc)

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        own = [(self.opt, self.cfg.lr)]
        return own + ([(self.disc_opt, self.cfg.disc_lr)] if self.disc_opt is not None else [])

    def update(self, batch: Batch) -> dict[str, float]:
        """One generator step (and one discriminator step with the GAN); this worker's losses."""
        cfg, device, amp, disc = self.cfg, self.device, self.amp, self.disc
        sync_weight = self.train_state["sync_weight"]
        self.gen.train()
        self.opt.zero_grad(set_to_none=True)
        g, losses = generator_losses(self.gen, disc, self.expert, batch, device, amp)
        disc_weight = cfg.disc_weight if disc is not None else 0.0
        l1 = reconstruction_loss(losses, cfg.mouth_weight)
        loss = (1.0 - sync_weight - disc_weight) * l1 + sync_weight * losses["sync"]
        if disc is not None:
            loss = loss + disc_weight * losses["perceptual"]
        backward_step(loss, self.opt, self.scaler)
        out = {f"train_{k}": float(v.detach()) for k, v in losses.items()} | {
            "train_loss": float(loss.detach())
        }
        if disc is not None:
            disc.train()
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss = disc_loss(disc, images(batch["y"], device), g, amp)
            backward_step(d_loss, self.disc_opt, self.disc_scaler)
            out["train_disc"] = float(d_loss.detach())
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation L1 and expert sync loss of generated frames over every worker's val shard; the sync
        loss is switched on (the reference's switch) once the expert's loss is below `sync_threshold`."""
        gen = unwrap(self.gen).eval()
        disc = unwrap(self.disc).eval() if self.disc is not None else None
        names = ("l1", "mouth_l1", "sync")
        sums = dict.fromkeys(names, 0.0) | {"n": 0.0}  # each loss · batch size, and the windows
        for batch in batches:
            _, losses = generator_losses(gen, disc, self.expert, batch, self.device, self.amp)
            n = len(batch["x"])
            sums = {k: sums[k] + float(losses[k]) * n for k in names} | {"n": sums["n"] + n}
        totals = dict(zip(sums, global_sum(list(sums.values()), self.device), strict=True))
        n = totals.pop("n")
        metrics = {f"val_{k}": total / n for k, total in totals.items()} if n else {}
        if metrics.get("val_sync", 1.0) < self.cfg.sync_threshold:
            self.train_state["sync_weight"] = self.cfg.target_sync_weight
        return metrics

    def logged(self) -> dict[str, float]:
        return {"sync_weight": self.train_state["sync_weight"]}

    @torch.no_grad()
    def finite_on(self, batch: Batch) -> bool:
        gen = unwrap(self.gen).eval()
        frames = gen(batch["indiv_mels"].to(self.device), images(batch["x"], self.device))
        return finite(gen, self.disc, frames)

    def payloads(self, step: int, metrics: dict[str, float]) -> Payloads:
        """model.pt (generator, optimiser, train state) and disc.pt (discriminator, its optimiser)."""
        cfg, state = self.cfg, self.train_state
        out = {MODEL_FILE: trained_payload(self.gen, NAME, cfg, step, metrics, self.opt, self.scaler, state)}
        if self.disc is not None:
            out[DISC_FILE] = trained_payload(
                self.disc, "disc", cfg, step, metrics, self.disc_opt, self.disc_scaler, {}
            )
        return out


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop of this recipe (`training.loop.train_loop`); `config["syncnet"]`: the
    expert's model.pt."""
    from training.loop import train_loop as recipe_loop

    recipe_loop(Wav2LipRecipe, config)


def read_checkpoint_files(uri: str) -> dict[str, dict[str, Any]]:
    """model.pt (and disc.pt when present) of a wav2lip checkpoint for --init-from."""
    payload, target, _ = read_payload(uri)
    out = {MODEL_FILE: payload}
    disc_uri = target.rsplit("/", 1)[0] + "/" + DISC_FILE
    with contextlib.suppress(BadInput):
        out[DISC_FILE] = read_payload(disc_uri)[0]
    return out


# ---------------------------------------------------------------- the driver


def check_expert(uri: str | None, img_size: int, max_val_loss: float | None = None) -> str:
    """--syncnet must be a SyncNet checkpoint of this img_size (whose val loss is at most `max_val_loss`);
    returns its model.pt."""
    if not uri:
        raise BadInput("train wav2lip needs --syncnet CKPT (an expert SyncNet checkpoint)")
    loaded = load_model(uri, expected_kind="syncnet")
    if loaded.img_size != img_size:
        raise BadInput(f"--syncnet {uri} is a {loaded.img_size}px SyncNet, the config trains {img_size}px")
    expert_health.gate_expert(loaded.metrics, uri, max_val_loss)
    return loaded.uri


def run(
    cfg: Wav2LipConfig,
    data: str,
    out: str,
    syncnet: str | None,
    address: str | None = None,
    init_from: str | None = None,
) -> dict:
    """Train (or resume, or do nothing if finished) and return {checkpoint, step, metrics}."""
    validate(cfg)
    expert = check_expert(syncnet, cfg.img_size, cfg.expert_max_val_loss)
    return fit_job(
        NAME,
        train_loop,
        cfg,
        data,
        out,
        address=address,
        init_from=init_from,
        loop_config={"syncnet": storage_root(expert)},
    )

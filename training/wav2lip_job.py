"""`lipsync train wav2lip DATA OUT --syncnet CKPT`: the generator on Ray Train, one recipe top to bottom.

Reference: Rudrabha/Wav2Lip `hq_wav2lip_train.py` (with the visual-quality GAN, the default here) and
`wav2lip_train.py` (`gan: false`). Loss = w_sync · expert sync BCE + w_disc · adversarial + (1 − w_sync −
w_disc) · L1. The sync weight starts at 0 and becomes 0.03 (0.01 without the GAN) once the frozen expert's
loss on generated validation frames falls below 0.75, as in the reference; disc weight 0.07; Adam lr 1e-4,
betas (0.5, 0.999) with the GAN. Checkpoints hold the generator in model.pt (what generation loads) and the
discriminator in disc.pt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import config_hash, from_dict, to_dict
from core.errors import BadInput
from core.watchdog import Beats
from models.checkpoint import MODEL_FILE, checkpoint_payload, load_model, read_payload
from models.registry import build_model, sync_loss
from models.syncnet import SYNC_FRAMES
from training import expert_health
from training.common import (
    WAITING_FOR_WINDOWS,
    Amp,
    MetricsLog,
    Throughput,
    TrainConfig,
    batches,
    build_optimizer,
    check_resumable,
    find_resume,
    fit_job,
    global_mean,
    global_sum,
    images,
    one_pass,
    prepare,
    report_checkpoint,
    seed_everything,
    storage_root,
    unwrap,
    use_worker_threads,
    validate,
    worker_amp,
    worker_device,
    world,
)
from training.data import WindowConfig

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- losses, one step, one evaluation


def expert_sync_loss(expert: nn.Module, mel: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The frozen expert's BCE (label: in sync) on the lower halves of generated (B, 3, 5, H, W) frames."""
    lower = generated[:, :, :, generated.size(3) // 2 :]
    faces = torch.cat([lower[:, :, i] for i in range(SYNC_FRAMES)], dim=1)
    audio, face = expert(mel, faces)
    return sync_loss(audio, face, torch.ones(len(faces), device=faces.device))


def generator_losses(
    gen: nn.Module, disc: nn.Module | None, expert: nn.Module, batch: dict, device: torch.device, amp: Amp
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(generated frames, {l1, sync, perceptual}) for a batch."""
    x, y = images(batch["x"], device), images(batch["y"], device)
    with amp.autocast(device):
        g = gen(batch["indiv_mels"].to(device), x)
        losses = {
            "l1": F.l1_loss(g.float(), y),
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


def train_step(
    state: dict[str, Any], batch: dict, device: torch.device, amp: Amp, cfg: Wav2LipConfig, sync_weight: float
) -> dict[str, float]:
    """One generator step (and one discriminator step with the GAN); returns this worker's losses."""
    gen, disc, expert = state["gen"], state["disc"], state["expert"]
    gen.train()
    state["opt"].zero_grad(set_to_none=True)
    g, losses = generator_losses(gen, disc, expert, batch, device, amp)
    disc_weight = cfg.disc_weight if disc is not None else 0.0
    loss = (1.0 - sync_weight - disc_weight) * losses["l1"] + sync_weight * losses["sync"]
    if disc is not None:
        loss = loss + disc_weight * losses["perceptual"]
    state["scaler"].scale(loss).backward()
    state["scaler"].step(state["opt"])
    state["scaler"].update()
    out = {f"train_{k}": float(v.detach()) for k, v in losses.items()} | {"train_loss": float(loss.detach())}
    if disc is not None:
        disc.train()
        state["disc_opt"].zero_grad(set_to_none=True)
        d_loss = disc_loss(disc, images(batch["y"], device), g, amp)
        state["disc_scaler"].scale(d_loss).backward()
        state["disc_scaler"].step(state["disc_opt"])
        state["disc_scaler"].update()
        out["train_disc"] = float(d_loss.detach())
    return out


@torch.no_grad()
def evaluate(
    state: dict[str, Any], cfg: Wav2LipConfig, device: torch.device, amp: Amp, world_size: int
) -> dict:
    """Validation L1 and expert sync loss of generated frames over every worker's val shard."""
    gen = unwrap(state["gen"]).eval()
    disc = unwrap(state["disc"]).eval() if state["disc"] is not None else None
    sums = [0.0, 0.0, 0.0]  # l1·n, sync·n, n
    for batch in one_pass("val", max(1, cfg.batch_size // world_size), device):
        _, losses = generator_losses(gen, disc, state["expert"], batch, device, amp)
        n = len(batch["x"])
        sums = [sums[0] + float(losses["l1"]) * n, sums[1] + float(losses["sync"]) * n, sums[2] + n]
    l1, sync, n = global_sum(sums, device)
    return {"val_l1": l1 / n, "val_sync": sync / n} if n else {}


# ---------------------------------------------------------------- the recipe (runs on every worker)


def build_state(cfg: Wav2LipConfig, expert_uri: str, device: torch.device, amp: Amp) -> dict[str, Any]:
    """Generator, discriminator (with the GAN), frozen expert, optimisers and loss scalers."""
    seed_everything(cfg.seed)
    gen = build_model(NAME, cfg.img_size, cfg.width).to(device)  # before the optimisers (their state follows)
    disc = build_model("disc", cfg.img_size, cfg.width).to(device) if cfg.gan else None
    expert = load_model(expert_uri, expected_kind="syncnet", device=device).model
    for p in expert.parameters():
        p.requires_grad_(False)
    return {
        "gen": gen,
        "disc": disc,
        "expert": expert.eval(),
        "opt": build_optimizer(gen.parameters(), cfg.optimizer, cfg.lr, cfg.betas),
        "disc_opt": build_optimizer(disc.parameters(), cfg.optimizer, cfg.disc_lr, cfg.betas)
        if disc
        else None,
        "scaler": amp.grad_scaler(),
        "disc_scaler": amp.grad_scaler(),
    }


def load_state(state: dict[str, Any], payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Weights, optimisers and scalers from a checkpoint; returns its train_state."""
    main = payloads[MODEL_FILE]
    state["gen"].load_state_dict(main["state_dict"])
    state["opt"].load_state_dict(main["optimizer"])
    train_state = main.get("train_state", {})
    if train_state.get("scaler"):
        state["scaler"].load_state_dict(train_state["scaler"])
    if state["disc"] is not None and DISC_FILE in payloads:
        state["disc"].load_state_dict(payloads[DISC_FILE]["state_dict"])
        state["disc_opt"].load_state_dict(payloads[DISC_FILE]["optimizer"])
        if payloads[DISC_FILE].get("train_state", {}).get("scaler"):
            state["disc_scaler"].load_state_dict(payloads[DISC_FILE]["train_state"]["scaler"])
    return train_state


def payloads_of(
    state: dict[str, Any], cfg: Wav2LipConfig, step: int, metrics: dict, train_state: dict
) -> dict[str, dict[str, Any]]:
    """model.pt (generator) and disc.pt of a checkpoint."""
    config = to_dict(cfg) | {"config_hash": config_hash(cfg)}
    main = checkpoint_payload(state["gen"], NAME, cfg.img_size, step, config, metrics, state["opt"])
    main["train_state"] = train_state | {"scaler": state["scaler"].state_dict()}
    out = {MODEL_FILE: main}
    if state["disc"] is not None:
        disc = checkpoint_payload(
            state["disc"], "disc", cfg.img_size, step, config, metrics, state["disc_opt"]
        )
        disc["train_state"] = {"scaler": state["disc_scaler"].state_dict()}
        out[DISC_FILE] = disc
    return out


def train_loop(config: dict[str, Any]) -> None:
    """Set-up, loop, checkpoint. `config`: cfg, syncnet, out, init_from, mlflow_uri, mlflow_run_id."""
    # -- set-up: device, models, optimisers, state to resume from
    cfg = from_dict(Wav2LipConfig, config["cfg"])
    rank, world_size = world()
    Beats(config.get("progress"), rank == 0)("setting up the worker", 0)  # the driver's watchdog
    device, amp = worker_device(), worker_amp(cfg.gpu)
    use_worker_threads(cfg)
    state = build_state(cfg, config["syncnet"], device, amp)
    step, train_state = 0, {"sync_weight": 0.0, "resumed_from": []}
    resume = find_resume(config["out"], NAME)
    if resume is not None:
        check_resumable(resume.payloads[MODEL_FILE].get("config", {}), cfg)
        train_state = {**train_state, **load_state(state, resume.payloads)}
        step = resume.step
        train_state["resumed_from"] = [*train_state.get("resumed_from", []), step]
        log.info("rank %d: resuming from %s at step %d", rank, resume.source, step)
    elif config.get("init_from"):
        init = read_checkpoint_files(config["init_from"])
        state["gen"].load_state_dict(init[MODEL_FILE]["state_dict"])
        if state["disc"] is not None and DISC_FILE in init:
            state["disc"].load_state_dict(init[DISC_FILE]["state_dict"])
    state["gen"] = prepare(state["gen"], cfg, world_size)
    if state["disc"] is not None:
        state["disc"] = prepare(state["disc"], cfg, world_size)
    metrics_log = MetricsLog(config.get("mlflow_uri"), config.get("mlflow_run_id"), rank == 0)
    train_batches = batches("train", cfg.batch_size // world_size, device, cfg)
    has_val = config.get("has_val", False)
    beat = Beats(config.get("progress"), rank == 0)  # the driver's watchdog (core.watchdog)

    # -- loop
    window: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    throughput = Throughput()
    while step < cfg.steps:
        beat(WAITING_FOR_WINDOWS, step)
        batch = throughput.next(train_batches)
        beat("training a step", step)
        losses = train_step(state, batch, device, amp, cfg, train_state["sync_weight"])
        window.append({k: global_mean(v, device) for k, v in losses.items()})
        step += 1
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]} | throughput.read()
            window = []
            if has_val and (step % cfg.eval_every == 0 or last):
                beat("evaluating", step)
                metrics.update(evaluate(state, cfg, device, amp, world_size))
                if metrics.get("val_sync", 1.0) < cfg.sync_threshold:
                    train_state["sync_weight"] = cfg.target_sync_weight
            metrics["sync_weight"] = train_state["sync_weight"]
            metrics_log.log(step, {**metrics, "step": step})

        # -- checkpoint: generator (+ discriminator) + optimisers + step + config
        if step % cfg.checkpoint_every == 0 or last:
            beat("checkpointing", step)
            report_checkpoint(step, payloads_of(state, cfg, step, metrics, train_state), metrics, rank)
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0:
            throughput.reset()  # evaluation and checkpoint time are not training throughput


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

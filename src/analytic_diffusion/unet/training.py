"""Train the DDPM UNet on a dataset store (Ho et al. 2020, Algorithm 1): minimise ||eps - eps_theta(x_t, t)||^2 with
x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t uniform in [0, 1000), under the sampler's linear beta schedule.

Resumable by construction: a checkpoint at an epoch boundary holds the weights, the EMA, the optimizer (and
fp16 loss scaler), the epoch and step counters and every random state (global CPU/CUDA generators for dropout,
the data-order generator, the noise generator), so a resumed run continues with the losses an uninterrupted run
would have had (bit for bit on the CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.store import DatasetStore
from ..errors import StudioError
from ..fileio import atomic_write, atomic_write_json
from .checkpoint import FILENAME, UNetCheckpoint, build_network, read_checkpoint, save_checkpoint
from .model import UNet, UNetConfig, count_parameters
from .networks import NETWORKS, build_unet, export_network
from .schedule import NoiseSchedule
from ..figures import pyplot

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "no")
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@dataclass
class TrainingConfig:
    """Hyper-parameters of one training run; the architecture is stored in the checkpoint with the weights."""

    architecture: UNetConfig = field(default_factory=UNetConfig)
    epochs: int = 100  # passes over the dataset; raise it and rerun to train a finished run further
    batch_size: int = 128  # images per optimizer step (the last incomplete batch of an epoch is dropped)
    learning_rate: float = 2e-4  # AdamW step size after warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 1000  # linear learning-rate warm-up from 0 over this many steps
    lr_schedule: str = "constant"  # constant | cosine: anneal to 0 by the last step of `epochs` (short runs)
    loss_weighting: str = "uniform"  # uniform: the eps MSE of DDPM | min_snr: weighted by min(SNR_t, gamma) / SNR_t
    min_snr_gamma: float = 5.0  # gamma of min_snr (Hang et al. 2023, arXiv 2303.09556): SNR_t = ab_t / (1 - ab_t)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    ema_decay: float = 0.9999  # decay of the exponential moving average of the weights
    ema_warmup: bool = True  # use min(ema_decay, (1 + n) / (10 + n)) after n updates, so short runs get a useful EMA
    mixed_precision: str = "auto"  # CUDA autocast: auto (bf16 if supported, else fp16) | bf16 | fp16 | no; CPU: off
    random_flip: bool = False  # random horizontal flips (natural images; not digits)
    checkpoint_every: int = 10  # write a checkpoint every this many epochs (and always after the last)
    preview_samples: int = 64  # images in samples.png, sampled with the EMA weights at each checkpoint; 0 = none
    preview_steps: int = 50  # DDIM steps used for samples.png
    preview_eta: float = 0.0  # DDIM eta of samples.png (1 = ancestral, DDPM-like: kinder to an undertrained network)
    resume: bool = True  # continue from <output>/checkpoint.pt if it exists (False: refuse to overwrite it)


@dataclass
class TrainingResult:
    """What a finished (or already finished) run reports."""

    checkpoint: Path
    epochs: int
    steps: int
    losses: list[float]  # one per optimizer step since the run began, resumed parts included
    epoch_losses: list[float]  # mean loss of each epoch
    seconds: float  # training wall time over all sessions of the run
    parameters: int


def check_training_config(config: TrainingConfig) -> None:
    """Raise a StudioError for values no run can use."""
    positive = {"epochs": config.epochs, "batch_size": config.batch_size, "checkpoint_every": config.checkpoint_every}
    for key, value in positive.items():
        if value < 1:
            raise StudioError(f"training.{key} must be at least 1, got {value}")
    if config.learning_rate <= 0:
        raise StudioError(f"training.learning_rate must be positive, got {config.learning_rate}")
    if min(config.weight_decay, config.warmup_steps, config.grad_clip, config.preview_samples) < 0:
        raise StudioError("training.weight_decay, warmup_steps, grad_clip and preview_samples must not be negative")
    if not 0 <= config.ema_decay < 1:
        raise StudioError(f"training.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.mixed_precision not in PRECISIONS:
        raise StudioError(f"training.mixed_precision must be one of {', '.join(PRECISIONS)}, not '{config.mixed_precision}'")
    if config.lr_schedule not in LR_SCHEDULES:
        raise StudioError(f"training.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not '{config.lr_schedule}'")
    if config.loss_weighting not in LOSS_WEIGHTINGS:
        raise StudioError(f"training.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, not '{config.loss_weighting}'")
    if config.min_snr_gamma <= 0:
        raise StudioError(f"training.min_snr_gamma must be positive, got {config.min_snr_gamma}")
    if config.preview_steps < 1:
        raise StudioError(f"training.preview_steps must be at least 1, got {config.preview_steps}")
    if config.architecture.network not in NETWORKS:
        raise StudioError(f"training.architecture.network must be one of {', '.join(NETWORKS)}, "
                          f"not '{config.architecture.network}'")
    if config.preview_eta < 0:
        raise StudioError(f"training.preview_eta must not be negative, got {config.preview_eta}")


def learning_rate(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The step size of optimizer step `step` (0-based): linear warm-up, then constant or cosine-annealed to 0."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "cosine":
        return config.learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    return config.learning_rate * warmup


def autocast_dtype(option: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on CUDA, or None for full precision (always on the CPU)."""
    if device.type != "cuda" or option == "no":
        return None
    if option == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if option == "bf16" else torch.float16


class ExponentialMovingAverage:
    """Shadow weights w_ema <- d w_ema + (1 - d) w after every optimizer step; buffers are copied."""

    def __init__(self, network: UNet, decay: float, warmup: bool):
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: UNet) -> None:
        weight = 1.0 - self.current_decay()
        for shadow, live in zip(self.network.parameters(), network.parameters()):
            shadow.lerp_(live.detach(), weight)
        for shadow, live in zip(self.network.buffers(), network.buffers()):
            shadow.copy_(live)
        self.updates += 1


@dataclass
class _Progress:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Trainer:
    """The mutable objects of a run, gathered so that they can be saved and restored together."""

    network: UNet
    ema: ExponentialMovingAverage
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_rng: torch.Generator  # CPU: the order of the images in each epoch
    noise_rng: torch.Generator  # on the device: timesteps, noise and flips
    progress: _Progress

    def random_states(self) -> dict[str, Any]:
        states: dict[str, Any] = {
            "torch_cpu": torch.get_rng_state(),
            "data": self.data_rng.get_state(),
            "noise": self.noise_rng.get_state(),
        }
        if torch.cuda.is_available():
            states["torch_cuda"] = torch.cuda.get_rng_state_all()
        return states

    def restore_random_states(self, states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch_cpu"])
        self.data_rng.set_state(states["data"])
        self.noise_rng.set_state(states["noise"])
        if "torch_cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch_cuda"])


def _differences(stored: Any, wanted: Any) -> list[str]:
    return [
        f"{f.name}={getattr(stored, f.name)} (config: {getattr(wanted, f.name)})"
        for f in dataclasses.fields(wanted)
        if getattr(stored, f.name) != getattr(wanted, f.name)
    ]


def _restore(trainer: _Trainer, path: Path, config: TrainingConfig, store: DatasetStore) -> None:
    """Load the state of an interrupted run into `trainer`, refusing a checkpoint from another model or dataset."""
    checkpoint = read_checkpoint(path)
    changed = _differences(checkpoint.architecture, config.architecture)
    if changed:
        raise StudioError(
            f"{path} was trained with another architecture: {', '.join(changed)}; restore those values or train into "
            "another folder (experiment.name)"
        )
    if tuple(checkpoint.image_shape) != store.sample_shape or checkpoint.dataset.get("fingerprint") != store.fingerprint:
        raise StudioError(
            f"{path} was trained on dataset {checkpoint.dataset.get('name')} ({checkpoint.dataset.get('fingerprint')}, "
            f"{checkpoint.image_shape}), not on this one ({store.name}, {store.fingerprint}, {store.sample_shape}); "
            "train into another folder (experiment.name)"
        )
    state = checkpoint.training
    if not {"optimizer", "random", "epoch", "step"} <= set(state):
        raise StudioError(f"{path} holds weights but no training state, so it cannot be resumed; train into another folder")
    trainer.network.load_state_dict(build_network(checkpoint, path, use_ema=False).state_dict())
    trainer.ema.network.load_state_dict(build_network(checkpoint, path, use_ema=True).state_dict())
    trainer.ema.updates = int(state["ema_updates"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.restore_random_states(state["random"])
    trainer.progress = _Progress(
        int(state["epoch"]), int(state["step"]), list(state["losses"]), list(state["epoch_losses"]), float(state["seconds"])
    )
    stored_config = state.get("config", {})
    changed = [k for k, v in stored_config.items() if k != "architecture" and getattr(config, k, v) != v]
    if changed:
        log.warning("resuming %s with changed training settings: %s", path, ", ".join(changed))


def _save(trainer: _Trainer, path: Path, config: TrainingConfig, store: DatasetStore, schedule: NoiseSchedule) -> None:
    progress = trainer.progress
    save_checkpoint(
        path,
        UNetCheckpoint(
            architecture=config.architecture,
            image_shape=store.sample_shape,
            model={k: v.detach().cpu() for k, v in trainer.network.state_dict().items()},
            ema={k: v.detach().cpu() for k, v in trainer.ema.network.state_dict().items()},
            schedule=schedule,
            dataset={"name": store.name, "fingerprint": store.fingerprint, "num_images": store.num_images},
            training={
                "config": dataclasses.asdict(config),
                "optimizer": trainer.optimizer.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "ema_updates": trainer.ema.updates,
                "random": trainer.random_states(),
                "epoch": progress.epoch,
                "step": progress.step,
                "losses": progress.losses,
                "epoch_losses": progress.epoch_losses,
                "seconds": progress.seconds,
            },
        ),
    )


def save_loss_plot(path: Path, losses: list[float], epoch_losses: list[float], steps_per_epoch: int) -> None:
    """loss.png: the loss of every step, a running mean, and the mean of each epoch, on a log scale."""
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(7, 4))
    steps = torch.arange(1, len(losses) + 1)
    axes.plot(steps, losses, lw=0.5, alpha=0.35, label="step")
    window = max(1, min(len(losses) // 20, 200))
    if len(losses) >= window:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
        axes.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window} steps")
    ends = [steps_per_epoch * (i + 1) for i in range(len(epoch_losses))]
    axes.plot(ends, epoch_losses, "o", ms=3, label="epoch mean")
    axes.set(xlabel="optimizer step", ylabel="MSE(eps, eps_theta)", yscale="log", title="UNet training loss")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


@torch.no_grad()
def save_preview(
    path: Path, network: UNet, schedule: NoiseSchedule, count: int, steps: int, seed: int, eta: float = 0.0
) -> None:
    """samples.png: `count` DDIM samples of the network from a fixed seed, without touching the training RNGs."""
    from torchvision.utils import make_grid, save_image

    from ..denoisers.unet import UNetDenoiser
    from ..noise import SharedNoise
    from ..sampling import SchedulerOptions, make_scheduler, sample

    device = next(network.parameters()).device
    options = SchedulerOptions(
        num_inference_steps=steps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        num_train_timesteps=schedule.num_train_timesteps,
    )
    denoiser = UNetDenoiser(device=device).use_network(network, schedule)
    generator = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn((count, network.channels, network.resolution, network.resolution), generator=generator, device=device)
    noise = SharedNoise(generator, count, tuple(x_T.shape[1:]))  # the scheduler's variance noise when eta > 0
    images = sample(denoiser, make_scheduler(options), x_T, noise, eta).x0_hat
    grid = make_grid(((images + 1) / 2).clamp(0, 1).cpu(), nrow=max(1, round(math.sqrt(count))), padding=2)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def min_snr_loss(prediction: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighted eps MSE (Hang et al. 2023, eq. 6 for eps prediction): each sample's MSE times
    min(SNR_t, gamma) / SNR_t, so the nearly clean timesteps no longer dominate the gradient; mean over the batch."""
    snr = alpha_bar / (1 - alpha_bar)
    per_sample = (prediction - eps).square().flatten(1).mean(1)
    return (per_sample * snr.clamp(max=gamma) / snr).mean()


def _diffuse(
    x0: torch.Tensor, alphas_cumprod: torch.Tensor, rng: torch.Generator, flip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw t and eps for a batch: returns (x_t, t, eps)."""
    batch = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (batch,), generator=rng, device=x0.device)
    eps = torch.randn(x0.shape, generator=rng, device=x0.device)
    if flip:
        flipped = torch.rand(batch, generator=rng, device=x0.device) < 0.5
        x0 = torch.where(flipped[:, None, None, None], x0.flip(-1), x0)
    ab = alphas_cumprod[t].view(batch, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, eps


def train(
    config: TrainingConfig,
    store: DatasetStore,
    output_dir: str | Path,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress_bar: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Train (or resume training) a UNet on `store`, writing checkpoint.pt, loss.png, samples.png and training.json
    into `output_dir`. `on_step(step)` is called after every optimizer step (tests use it to interrupt a run)."""
    check_training_config(config)
    device = torch.device(device)
    channels, height, width = store.sample_shape
    if height != width:
        raise StudioError(f"the UNet trains on square images; dataset {store.name} has {height}x{width}")
    batch_size = min(config.batch_size, store.num_images)
    steps_per_epoch = store.num_images // batch_size
    output_dir = Path(output_dir)
    path = output_dir / FILENAME
    schedule = NoiseSchedule()

    torch.manual_seed(seed)  # weight initialisation, then dropout
    network = build_unet(config.architecture, channels, height).to(device)
    trainer = _Trainer(
        network=network,
        ema=ExponentialMovingAverage(network, config.ema_decay, config.ema_warmup),
        optimizer=torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=autocast_dtype(config.mixed_precision, device) == torch.float16),
        data_rng=torch.Generator().manual_seed(seed),
        noise_rng=torch.Generator(device).manual_seed(seed + 1),
        progress=_Progress(),
    )
    if path.exists():
        if not config.resume:
            raise StudioError(f"{path} exists and training.resume is false; delete it or train into another folder")
        _restore(trainer, path, config, store)
        log.info("resuming %s after epoch %d (step %d)", path, trainer.progress.epoch, trainer.progress.step)

    precision = autocast_dtype(config.mixed_precision, device)
    alphas_cumprod = schedule.alphas_cumprod().to(device)
    images = store.images.to(device)
    progress = trainer.progress
    log.info("UNet with %d parameters, %d steps per epoch", count_parameters(network), steps_per_epoch)
    bar = tqdm(
        total=steps_per_epoch * config.epochs, initial=min(progress.step, steps_per_epoch * config.epochs),
        desc="training UNet", unit="step", disable=not progress_bar, dynamic_ncols=True,
    )
    for epoch in range(progress.epoch, config.epochs):
        started = time.perf_counter()
        network.train()
        order = torch.randperm(store.num_images, generator=trainer.data_rng)[: steps_per_epoch * batch_size]
        epoch_losses = torch.zeros(steps_per_epoch, device=device)
        for index, batch in enumerate(order.view(steps_per_epoch, batch_size)):
            x_t, t, eps = _diffuse(store.decode(images[batch.to(device)]), alphas_cumprod, trainer.noise_rng, config.random_flip)
            with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
                prediction = network(x_t, t).float()
            loss = F.mse_loss(prediction, eps)  # recorded and plotted: the plain eps MSE whatever the weighting
            objective = loss
            if config.loss_weighting == "min_snr":
                objective = min_snr_loss(prediction, eps, alphas_cumprod[t], config.min_snr_gamma)
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.scaler.scale(objective).backward()
            if config.grad_clip > 0:
                trainer.scaler.unscale_(trainer.optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
            for group in trainer.optimizer.param_groups:
                group["lr"] = learning_rate(config, progress.step, steps_per_epoch * config.epochs)
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
            trainer.ema.update(network)
            epoch_losses[index] = loss.detach()
            progress.step += 1
            bar.update()
            if index % 10 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            if on_step is not None:
                on_step(progress.step)
        progress.losses.extend(epoch_losses.tolist())
        progress.epoch_losses.append(float(epoch_losses.mean()))
        progress.epoch = epoch + 1
        progress.seconds += time.perf_counter() - started
        if progress.epoch % config.checkpoint_every == 0 or progress.epoch == config.epochs:
            _save(trainer, path, config, store, schedule)
            export_network(trainer.ema.network, output_dir, schedule)
            save_loss_plot(output_dir / "loss.png", progress.losses, progress.epoch_losses, steps_per_epoch)
            if config.preview_samples:
                save_preview(
                    output_dir / "samples.png", trainer.ema.network, schedule,
                    config.preview_samples, config.preview_steps, seed, config.preview_eta,
                )
    bar.close()
    result = TrainingResult(
        path, progress.epoch, progress.step, progress.losses, progress.epoch_losses, progress.seconds, count_parameters(network)
    )
    atomic_write_json(
        output_dir / "training.json",
        {
            "checkpoint": str(path),
            "epochs": result.epochs,
            "steps": result.steps,
            "parameters": result.parameters,
            "seconds": round(result.seconds, 2),
            "first_epoch_loss": result.epoch_losses[0] if result.epoch_losses else None,
            "last_epoch_loss": result.epoch_losses[-1] if result.epoch_losses else None,
            "epoch_losses": result.epoch_losses,
        },
    )
    return result

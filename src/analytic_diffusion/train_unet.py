"""The train-unet job: config -> dataset store -> UNet training (resumed if interrupted) -> checkpoint folder."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from .config import StudioConfig, to_yaml
from .data.store import StoreRequest, load_or_build_store
from .devices import resolve_device
from .fileio import atomic_write_text, make_directory
from .unet.networks import DDPM_FILENAME
from .unet.training import TrainingResult, check_training_config, train

log = logging.getLogger("analytic_diffusion")


def train_unet(cfg: StudioConfig) -> tuple[TrainingResult, float]:
    """Train `cfg.training` on `cfg.dataset` into `cfg.training.output_dir`; returns the result and the wall time."""
    check_training_config(cfg.training)
    device = resolve_device(cfg.experiment.device)
    started = time.perf_counter()
    store, _ = load_or_build_store(StoreRequest(**asdict(cfg.dataset)), Path(cfg.paths.datasets), Path(cfg.paths.cache))
    output = Path(cfg.training.output_dir)
    make_directory(output, "training.output_dir")
    atomic_write_text(output / "config.yaml", to_yaml(cfg))
    log.info("training a UNet on %s (%d images of %s) on %s into %s", cfg.dataset.name, store.num_images,
             "x".join(map(str, store.sample_shape)), device, output)
    result = train(cfg.training, store, output, device=device, seed=cfg.experiment.seed)
    return result, time.perf_counter() - started


def summary(result: TrainingResult, wall_seconds: float) -> str:
    """The report printed at the end of `ads train-unet`."""
    first, last = (result.epoch_losses[0], result.epoch_losses[-1]) if result.epoch_losses else (float("nan"),) * 2
    folder = result.checkpoint.parent
    return (
        f"Trained a UNet with {result.parameters:,} parameters for {result.epochs} "
        f"epoch{'s' if result.epochs != 1 else ''} ({result.steps} steps; "
        f"{result.seconds:.0f} s of training over all sessions, this session {wall_seconds:.0f} s wall): epoch loss "
        f"{first:.4f} -> {last:.4f}. Checkpoint {result.checkpoint}; loss curve {folder / 'loss.png'}; samples "
        f"{folder / 'samples.png'}.{_exported(folder)} Compare with it: ads generate -c <method>/<dataset> "
        f"baseline.checkpoint={folder}"
    )


def _exported(folder: Path) -> str:
    """The sentence naming the ecosystem export of the training folder, if the network has one."""
    if (folder / "config.json").is_file():
        return f" diffusers UNet2DModel (EMA weights): UNet2DModel.from_pretrained('{folder}')."
    if (folder / DDPM_FILENAME).is_file():
        return f" DDPM-UNet state dict (EMA weights, the reference framework's format): {folder / DDPM_FILENAME}."
    return ""


"""A trained DDPM UNet as a denoiser: x0_hat = (x_t - sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(ab_t)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..data.store import DatasetStore
from ..errors import StudioError
from ..unet.checkpoint import load_unet
from ..unet.model import UNet
from ..unet.schedule import NoiseSchedule
from .base import Denoised, Denoiser, NoiseLevel, register_denoiser

SCHEDULE_TOLERANCE = 1e-5  # |ab_t(sampler) - ab_t(training)| above this means the schedules differ


@dataclass
class UNetParams:
    checkpoint: Optional[str] = None  # checkpoint file written by `ads train-unet`, or its training folder
    use_ema: bool = True  # sample with the EMA weights (False: the raw weights of the last step)


@register_denoiser("unet")
class UNetDenoiser(Denoiser):
    """The learned baseline: epsilon prediction of a UNet conditioned on the training timestep t."""

    Params = UNetParams
    exact_float32 = False  # a trained approximation: it runs at the process's precision (cuDNN TF32 convs by default)

    def fit(self, store: DatasetStore) -> UNetDenoiser:
        if not self.params.checkpoint:
            raise StudioError("the unet method needs model.params.checkpoint=<path to a checkpoint from `ads train-unet`>")
        network, schedule = load_unet(self.params.checkpoint, self.device, self.params.use_ema, store.sample_shape)
        return self.use_network(network, schedule)

    def use_network(self, network: UNet, schedule: NoiseSchedule) -> UNetDenoiser:
        """Denoise with an in-memory network (e.g. the EMA copy during training) instead of a checkpoint file."""
        self.network = network.eval()
        self.alphas_cumprod = schedule.alphas_cumprod()
        return self

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        trained = float(self.alphas_cumprod[level.timestep])
        if abs(trained - level.alpha_bar) > SCHEDULE_TOLERANCE:
            raise StudioError(
                f"the sampler's noise level at t={level.timestep} (ab_t={level.alpha_bar:.6g}) differs from the UNet's "
                f"training schedule (ab_t={trained:.6g}); sample with the schedule it was trained with"
            )
        timesteps = torch.full((x_t.shape[0],), level.timestep, device=x_t.device, dtype=torch.long)
        eps = self.network(x_t, timesteps).to(x_t.dtype)
        x0_hat = (x_t - level.noise_variance**0.5 * eps) / level.signal_scale
        return Denoised(x0_hat)

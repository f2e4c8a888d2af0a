"""A trained network as a denoiser: x0_hat = (x_t - sqrt(1 - ab_t) eps_theta(x_t, t')) / sqrt(ab_t) (DESIGN.md §7).

ab_t is the sampler's level (x_t is at that level); t' is the backbone timestep with that ab (the sampler's own t
when the schedules agree, see backbones.schedule). Any format of `backbones.load_backbone` is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..backbones import Backbone, load_backbone
from ..data.store import DatasetStore
from ..errors import StudioError
from ..unet.schedule import NoiseSchedule
from .base import Denoised, Denoiser, NoiseLevel, register_denoiser


@dataclass
class UNetParams:
    checkpoint: Optional[str] = None  # a backbone: file or folder in any format of docs/backbones.md
    use_ema: bool = True  # EMA weights where the file has both (studio, pytorch-ddpm); False: the raw weights


@register_denoiser("unet")
class UNetDenoiser(Denoiser):
    """The learned baseline: the epsilon prediction of a trained network, at the backbone timestep of each level."""

    Params = UNetParams
    exact_float32 = False  # a trained approximation: it runs at the process's precision (cuDNN TF32 convs by default)

    def fit(self, store: DatasetStore) -> UNetDenoiser:
        if not self.params.checkpoint:
            raise StudioError("the unet method needs model.params.checkpoint=<a trained network; see docs/backbones.md>")
        backbone = load_backbone(self.params.checkpoint, self.params.use_ema, self.device)
        backbone.check_images(store.sample_shape)
        return self.use_backbone(backbone)

    def use_backbone(self, backbone: Backbone) -> UNetDenoiser:
        """Denoise with an already loaded backbone."""
        self.backbone = backbone
        return self

    def use_network(self, network: nn.Module, schedule: NoiseSchedule) -> UNetDenoiser:
        """Denoise with an in-memory studio UNet (e.g. the EMA copy during training) instead of a file."""
        return self.use_backbone(Backbone(
            network.eval(), schedule.alphas_cumprod(), network.channels, network.resolution, "studio", "memory",
        ))

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        eps = self.backbone.eps(x_t, self.backbone.timestep(level.timestep, level.alpha_bar))
        return Denoised((x_t - level.noise_variance**0.5 * eps) / level.signal_scale)

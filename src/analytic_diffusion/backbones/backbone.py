"""A trained network as the studio sees it: eps_theta(x_t, t), its noise schedule and the images it takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import StudioError
from .schedule import backbone_timestep


@dataclass
class Backbone:
    """One loaded network in eval mode (dropout off), gradients off.

    `network(x_t, t)` takes x_t [B, C, H, W] in model space [-1, 1] and integer timesteps t [B] of the backbone's
    own schedule `alphas_cumprod` [T] and returns eps [B, C, H, W].
    """

    network: nn.Module
    alphas_cumprod: torch.Tensor  # [T] float32 on the CPU: ab_t of the backbone's training schedule
    channels: int
    resolution: int | None  # the side length it was trained at; None: any side divisible by `divisor`
    format: str  # ddpm_unet | pytorch_ddpm | diffusers | studio
    source: str  # the path it was loaded from
    divisor: int = 1
    weights: str = "only"  # ema | raw | only (the file has one set)
    architecture: dict[str, Any] = field(default_factory=dict)  # hyper-parameters, as read or inferred
    schedule_source: str = ""  # where alphas_cumprod came from

    def check_images(self, sample_shape: tuple[int, ...]) -> None:
        """Raise a one-line StudioError unless the backbone takes images of `sample_shape` (C, H, W)."""
        channels, height, width = sample_shape
        wanted = "x".join(map(str, sample_shape))
        if self.resolution is not None and (channels, height, width) != (self.channels, self.resolution, self.resolution):
            raise StudioError(
                f"backbone {self.source} ({self.format}) was trained on {self.channels}x{self.resolution}x"
                f"{self.resolution} images (channels x height x width) but the dataset gives {wanted}; set "
                f"dataset.resolution={self.resolution} dataset.channels={self.channels} or use another backbone"
            )
        if channels != self.channels:
            raise StudioError(
                f"backbone {self.source} ({self.format}) takes {self.channels}-channel images but the dataset gives "
                f"{wanted} (channels x height x width); set dataset.channels={self.channels} or use another backbone"
            )
        if height % self.divisor or width % self.divisor:
            raise StudioError(
                f"backbone {self.source} ({self.format}) halves the image {self.divisor.bit_length() - 1} times, so "
                f"the dataset's {height}x{width} must be divisible by {self.divisor}; set dataset.resolution"
            )

    def timestep(self, timestep: int, alpha_bar: float) -> int:
        """The backbone timestep of a sampler level (see schedule.backbone_timestep)."""
        return backbone_timestep(self.alphas_cumprod, timestep, alpha_bar)

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """The network's noise prediction at one backbone timestep for the whole batch, in x_t's dtype."""
        t = torch.full((x_t.shape[0],), timestep, device=x_t.device, dtype=torch.long)
        return self.network(x_t, t).to(x_t.dtype)

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of the backbone for metrics.json."""
        return {"format": self.format, "weights": self.weights, "channels": self.channels,
                "resolution": self.resolution, "architecture": self.architecture,
                "schedule_source": self.schedule_source}


class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel called as network(x_t, t) -> eps."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t).sample

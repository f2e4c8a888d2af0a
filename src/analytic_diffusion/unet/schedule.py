"""The DDPM forward-process schedule a UNet is trained under (DESIGN.md §2): betas linear from 1e-4 to 0.02."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps with ab_t = prod_{s<=t} (1 - beta_s); the sampler's defaults."""

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        """ab_t for t = 0..T-1, computed in float32 exactly as diffusers' DDIMScheduler does."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)

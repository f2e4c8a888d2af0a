"""A backbone's noise schedule and the map from the sampler's noise levels to its timesteps (DESIGN.md §7).

Variance-preserving processes share x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps whatever the schedule, so a sampler
level with ab can be handed to any VP backbone at the backbone timestep whose ab is nearest. With the studio's own
linear schedule that timestep is the sampler's and nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StudioError

SAME_LEVEL = 1e-6  # |ab(sampler) - ab(backbone)| at or below this: the same noise level, the timestep passes unchanged


def linear_alphas_cumprod(beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000) -> torch.Tensor:
    """ab_t of DDPM's linear betas, float32 as diffusers computes it: [steps]."""
    return torch.cumprod(1.0 - torch.linspace(beta_start, beta_end, steps, dtype=torch.float32), dim=0)


def scheduler_alphas_cumprod(config: dict[str, Any], where: str) -> torch.Tensor:
    """ab_t of a diffusers scheduler config (any scheduler class: the beta keys are shared), via diffusers itself."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    try:
        scheduler = DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
    except Exception as exc:
        raise StudioError(f"cannot read the noise schedule of {where}: {str(exc).splitlines()[0][:160]}") from None
    return scheduler.alphas_cumprod.float().clone()


def backbone_timestep(alphas_cumprod: torch.Tensor, timestep: int, alpha_bar: float) -> int:
    """The backbone timestep for a sampler level (timestep, ab): the same timestep when the backbone's ab there is
    the same, otherwise the timestep whose ab is nearest (ties to the lower timestep)."""
    if 0 <= timestep < alphas_cumprod.shape[0] and abs(float(alphas_cumprod[timestep]) - alpha_bar) <= SAME_LEVEL:
        return timestep
    return int((alphas_cumprod.double() - alpha_bar).abs().argmin())


def timestep_mapping(alphas_cumprod: torch.Tensor, levels: list[tuple[int, float]]) -> dict[str, Any]:
    """JSON-ready record of how the sampler's levels (timestep, ab) reach the backbone (metrics.json)."""
    mapped = [backbone_timestep(alphas_cumprod, t, ab) for t, ab in levels]
    return {
        "same_as_sampler": all(m == t for m, (t, _) in zip(mapped, levels)),
        "sampler_timesteps": [t for t, _ in levels],
        "sampler_alpha_bar": [float(f"{ab:.8g}") for _, ab in levels],
        "backbone_timesteps": mapped,
        "backbone_alpha_bar": [float(f"{float(alphas_cumprod[m]):.8g}") for m in mapped],
    }

"""The DDIM sampling loop shared by every method (DESIGN.md §2), as a function of (denoiser, scheduler, noise).

One step at timestep t, with ab_t = alphas_cumprod[t]:
    x0_hat = D(x_t, t);  eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t + 1e-8);  x_{t-1} = DDIM(eps, t, x_t)
The generated image is the last x0_hat, not the last x_{t-1}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from .denoisers.base import Denoised, Denoiser, NoiseLevel
from .noise import NoiseSource

EPS_FLOOR = 1e-8  # added under the square root of 1 - ab_t, as in the reference framework


@dataclass
class SchedulerOptions:
    """The DDIM options that change results; defaults are the reference framework's (diffusers defaults)."""

    num_inference_steps: int = 10
    clip_sample: bool = True  # the scheduler clips its internal x0 to [-1, 1]
    timestep_spacing: str = "leading"  # 10 steps -> 900, 800, ..., 0
    eta: float = 0.0  # 0 = deterministic DDIM
    set_alpha_to_one: bool = True
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000


def make_scheduler(options: SchedulerOptions) -> DDIMScheduler:
    """A DDIM scheduler over the linear beta schedule, with its timesteps set."""
    scheduler = DDIMScheduler(
        num_train_timesteps=options.num_train_timesteps,
        beta_start=options.beta_start,
        beta_end=options.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=options.clip_sample,
        set_alpha_to_one=options.set_alpha_to_one,
        timestep_spacing=options.timestep_spacing,
    )
    scheduler.set_timesteps(options.num_inference_steps)
    return scheduler


def noise_level(scheduler: DDIMScheduler, timestep: int) -> NoiseLevel:
    """The NoiseLevel of a training timestep under the scheduler's schedule."""
    return NoiseLevel(int(timestep), float(scheduler.alphas_cumprod[int(timestep)]))


@dataclass
class Step:
    """What the sampler reports to its callback after the denoiser ran at one step."""

    index: int  # 0-based position in the schedule
    timestep: int
    x_t: torch.Tensor  # the input of the step
    x0_hat: torch.Tensor  # the denoiser's estimate at this step
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


StepCallback = Callable[[Step], None]


def epsilon_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise implied by an x0 estimate: (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t + 1e-8)."""
    return (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar + EPS_FLOOR).sqrt()


@torch.no_grad()
def sample(
    denoiser: Denoiser | Callable[..., Denoised],
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    noise: NoiseSource | None = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Denoised:
    """Run DDIM from x_T over `scheduler.timesteps`; return the final step's estimate and diagnostics.

    `noise` feeds stochastic denoisers and, when eta > 0, the scheduler's variance noise (required then: without
    it diffusers would draw from torch's global generator and the run would not follow its seed).
    """
    if eta > 0 and noise is None:
        raise ValueError("sampling with eta > 0 needs a noise source (e.g. SharedNoise) for its variance noise")
    x_t = x_T
    result = Denoised(x_T)
    for index, t in enumerate(scheduler.timesteps.tolist()):
        result = denoiser(x_t, noise_level(scheduler, t), noise)
        if callback is not None:
            callback(Step(index, t, x_t, result.x0_hat, result.diagnostics))
        alpha_bar = scheduler.alphas_cumprod[t].to(x_t.device)
        eps = epsilon_from_x0(x_t, result.x0_hat, alpha_bar)
        variance_noise = noise.randn() if eta > 0 else None
        x_t = scheduler.step(eps, t, x_t, eta=eta, variance_noise=variance_noise).prev_sample
    return result

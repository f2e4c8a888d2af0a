"""The DDIM sampling loop shared by every method (DESIGN.md §2), as a function of (denoiser, scheduler, noise).

One step at timestep t, with ab_t = alphas_cumprod[t] and s the next timestep of the schedule:
    x0_hat = D(x_t, t);  eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t + 1e-8);  x_s = DDIM(eps, t -> s, x_t)
The generated image is the last x0_hat, not the last x_s. The step goes to the schedule's own next timestep:
diffusers' `DDIMScheduler.step` assumes s = t - 1000 // steps, which holds for `leading` spacing only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from .denoisers.base import Denoised, Denoiser, NoiseLevel
from .noise import NoiseSource

EPS_FLOOR = 1e-8  # added under the square root of 1 - ab_t, as in the reference framework
MAX_START_ALPHA_BAR = 0.01  # x_T is pure noise: a first timestep with ab_t above this (signal scale sqrt(ab_t) > 0.1)
# treats it as holding a tenth of an image or more


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


def start_warning(scheduler: DDIMScheduler) -> str | None:
    """A sentence when the schedule's first timestep is far from pure noise (ab_t > MAX_START_ALPHA_BAR), else None.

    `leading` spacing starts at (steps - 1) * (1000 // steps): 1 step is [0] (pure noise treated as a clean image),
    2 steps start at 500; `trailing` starts at 999 for every step count.
    """
    first = int(scheduler.timesteps[0])
    alpha_bar = float(scheduler.alphas_cumprod[first])
    if alpha_bar <= MAX_START_ALPHA_BAR:
        return None
    steps, spacing = len(scheduler.timesteps), scheduler.config.timestep_spacing
    return (
        f"the schedule ({steps} step{'s' if steps > 1 else ''}, {spacing} spacing) starts at timestep {first}, where "
        f"alpha_bar is {alpha_bar:.3g}: the initial noise is treated as {alpha_bar ** 0.5:.0%} image, so samples are "
        f"off; set sampling.timestep_spacing=trailing to start at timestep {scheduler.config.num_train_timesteps - 1}"
    )


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


def ddim_step(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    timestep: int,
    next_timestep: int | None,
    x_t: torch.Tensor,
    eta: float = 0.0,
    variance_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x at `next_timestep` (None: the end, ab = `final_alpha_cumprod`) from x_t and eps: DDIM (Song et al. 2021, eq. 12).

    The arithmetic of `DDIMScheduler.step` (so bit-identical to it where its own previous timestep is right: leading
    spacing), with the target timestep given instead of assumed to be t - 1000 // steps.
    sigma_t = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s) (eq. 16); `variance_noise` is needed when eta > 0.
    """
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_prev = scheduler.alphas_cumprod[next_timestep] if next_timestep is not None else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    x0_hat = (x_t - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)  # the scheduler's own x0, clipped below
    if scheduler.config.clip_sample:
        x0_hat = x0_hat.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    variance = ((1 - alpha_prod_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev_t = eta * variance ** (0.5)
    direction = (1 - alpha_prod_prev - std_dev_t**2) ** (0.5) * eps
    x_prev = alpha_prod_prev ** (0.5) * x0_hat + direction
    if eta > 0:
        if variance_noise is None:
            raise ValueError("a DDIM step with eta > 0 needs its variance noise")
        x_prev = x_prev + std_dev_t * variance_noise
    return x_prev


@torch.no_grad()
def sample(
    denoiser: Denoiser | Callable[..., Denoised],
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    noise: NoiseSource | None = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> Denoised:
    """Run DDIM from x_T over `scheduler.timesteps`, each step to the next timestep of that list (the last one to
    ab = 1 with set_alpha_to_one); return the final step's estimate and diagnostics.

    `noise` feeds stochastic denoisers and, when eta > 0, the scheduler's variance noise (required then: without
    it diffusers would draw from torch's global generator and the run would not follow its seed).
    """
    if eta > 0 and noise is None:
        raise ValueError("sampling with eta > 0 needs a noise source (e.g. SharedNoise) for its variance noise")
    x_t = x_T
    result = Denoised(x_T)
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        result = denoiser(x_t, noise_level(scheduler, t), noise)
        if callback is not None:
            callback(Step(index, t, x_t, result.x0_hat, result.diagnostics))
        alpha_bar = scheduler.alphas_cumprod[t].to(x_t.device)
        eps = epsilon_from_x0(x_t, result.x0_hat, alpha_bar)
        variance_noise = noise.randn() if eta > 0 else None
        next_timestep = timesteps[index + 1] if index + 1 < len(timesteps) else None
        x_t = ddim_step(scheduler, eps, t, next_timestep, x_t, eta, variance_noise)
    return result

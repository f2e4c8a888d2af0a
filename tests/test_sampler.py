"""The DDIM loop of DESIGN.md §2: schedule, the eps formula, the last x0_hat as output, and the callback."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import Denoised, NoiseLevel
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, sample


def test_ten_leading_steps_are_900_to_0():
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=10))
    assert scheduler.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert scheduler.config.clip_sample and scheduler.config.set_alpha_to_one


def test_one_image_dataset_returns_that_image():
    image = torch.rand(1, 1, 6, 6) * 2 - 1
    store = DatasetStore.from_tensor(image)
    denoiser = NearestDataset().fit(store)
    x_T = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    out = sample(denoiser, make_scheduler(SchedulerOptions()), x_T)
    assert torch.equal(out.x0_hat, image.expand(3, -1, -1, -1))


def test_loop_matches_a_direct_transcription_of_the_reference():
    """A denoiser with a non-trivial answer, sampled by our loop and by the reference loop written out by hand."""
    def shrink(x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return Denoised(torch.tanh(x_t * level.signal_scale))

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample(shrink, make_scheduler(SchedulerOptions(num_inference_steps=7)), x_T).x0_hat

    reference = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")
    reference.set_timesteps(7)
    latents, pred_x0 = x_T, None
    for t in reference.timesteps:
        alpha_prod_t = reference.alphas_cumprod[t]
        pred_x0 = torch.tanh(latents * float(alpha_prod_t) ** 0.5)
        eps = (latents - alpha_prod_t.sqrt() * pred_x0) / (1 - alpha_prod_t + 1e-8).sqrt()
        latents = reference.step(eps, t, latents).prev_sample
    assert torch.equal(ours, pred_x0)


def test_callback_sees_every_step_in_order():
    seen = []
    x_T = torch.randn(2, 1, 3, 3)
    sample(lambda x, level, noise=None: Denoised(torch.zeros_like(x)), make_scheduler(SchedulerOptions(num_inference_steps=4)),
           x_T, callback=lambda step: seen.append((step.index, step.timestep, step.x_t.shape)))
    assert [(i, t) for i, t, _ in seen] == [(0, 750), (1, 500), (2, 250), (3, 0)]
    assert all(shape == x_T.shape for *_, shape in seen)


def test_eta_above_zero_without_a_noise_source_is_refused():
    """Otherwise diffusers draws the variance noise from torch's global generator, outside the run's seed."""
    with pytest.raises(ValueError, match="eta > 0 needs a noise source"):
        sample(lambda x, level, noise=None: Denoised(torch.zeros_like(x)), make_scheduler(SchedulerOptions()),
               torch.zeros(1, 1, 2, 2), eta=1.0)


SPACINGS = ("leading", "trailing", "linspace")
STEP_COUNTS = (1, 2, 3, 7, 10, 50)


class ZeroMeanNoise:
    """A noise source whose draws have mean exactly 0 per sample, so they never move a constant image's level."""

    def __init__(self, shape: tuple[int, ...], seed: int):
        self.shape, self.generator = shape, torch.Generator().manual_seed(seed)

    def randn(self, *leading: int) -> torch.Tensor:
        draw = torch.randn((*leading, *self.shape), generator=self.generator, dtype=torch.float64)
        return draw - draw.mean(dim=(-3, -2, -1), keepdim=True)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_every_x_t_is_at_the_noise_level_the_denoiser_is_told(steps, spacing, eta):
    """A probe denoiser whose answer is always the same constant image y: then x_t = sqrt(ab) y + noise of mean 0,
    so mean(x_t) / y is the signal scale sqrt(ab) of the x_t it really receives. It must be sqrt(ab_t) of the t it is
    told, at every step (x_T itself is made at the first timestep's level, so the start is right by construction)."""
    y = 0.5
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=steps, timestep_spacing=spacing))
    alpha_bar = scheduler.alphas_cumprod.double()
    first = int(scheduler.timesteps[0])
    noise = ZeroMeanNoise((2, 1, 16, 16), seed=steps)
    x_T = alpha_bar[first].sqrt() * y + (1 - alpha_bar[first]).sqrt() * noise.randn()
    seen = []

    def probe(x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        seen.append((level.timestep, level.alpha_bar, x_t.mean(dim=(1, 2, 3)) / y))
        return Denoised(torch.full_like(x_t, y))

    sample(probe, scheduler, x_T, noise, eta=eta)
    assert [t for t, _, _ in seen] == scheduler.timesteps.tolist()
    for told, told_alpha_bar, signal_scale in seen:
        actual = signal_scale.square()
        assert torch.allclose(actual, torch.tensor(told_alpha_bar, dtype=torch.float64), rtol=1e-4, atol=0), (
            f"told timestep {told} (alpha_bar {told_alpha_bar:.6g}) but x_t is at alpha_bar {actual.tolist()}, "
            f"timestep {int((alpha_bar - actual[0]).abs().argmin())}"
        )


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_leading_spacing_steps_are_bit_identical_to_diffusers(steps, eta):
    """Where diffusers' own previous timestep (t - 1000 // steps) is right, the results are today's, bit for bit."""
    def shrink(x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return Denoised(torch.tanh(x_t * level.signal_scale))

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps))
    variance = torch.randn(steps, 2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + steps))
    draws = iter(variance)

    class Replay:
        def randn(self):
            return next(draws)

    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=steps))
    seen = []
    ours = sample(shrink, scheduler, x_T, Replay(), eta=eta, callback=lambda step: seen.append(step.x_t)).x0_hat

    reference = DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")
    reference.set_timesteps(steps)
    latents = x_T
    for index, t in enumerate(reference.timesteps):
        assert torch.equal(seen[index], latents)
        alpha_prod_t = reference.alphas_cumprod[t]
        pred_x0 = torch.tanh(latents * float(alpha_prod_t) ** 0.5)
        eps = (latents - alpha_prod_t.sqrt() * pred_x0) / (1 - alpha_prod_t + 1e-8).sqrt()
        latents = reference.step(eps, t, latents, eta=eta, variance_noise=variance[index] if eta else None).prev_sample
    assert torch.equal(ours, pred_x0)

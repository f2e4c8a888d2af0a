"""The nearest-dataset baseline (shared/seeds, DESIGN.md §3): x0_hat = y_{i*}, i* = argmin_i ||x_t - y_i||."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.store import DatasetStore
from ..search import knn_search
from .base import Denoised, Denoiser, NoiseLevel, register_denoiser


@dataclass
class NearestDatasetParams:
    timestep_aware: bool = False  # compare x_t / sqrt(ab_t) instead of x_t with the clean images
    chunk_size: int | None = None  # dataset images per search chunk; None = chosen from memory


@register_denoiser("nearest_dataset")
class NearestDataset(Denoiser):
    """Returns the training image closest to x_t: the floor every analytic denoiser is measured against."""

    Params = NearestDatasetParams

    def fit(self, store: DatasetStore) -> NearestDataset:
        self.store = store
        return self

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        query = x_t / level.signal_scale if self.params.timestep_aware else x_t
        found = knn_search(query, self.store, k=1, chunk_size=self.params.chunk_size)
        index = found.indices[:, 0]
        x0_hat = self.store.gather(index, device=x_t.device, dtype=x_t.dtype)
        return Denoised(x0_hat, {"nearest_index": index, "nearest_distance": found.distances[:, 0]})

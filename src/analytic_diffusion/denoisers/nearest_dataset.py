"""The nearest-dataset baseline (shared/seeds, DESIGN.md §3): x0_hat = y_{i*}, i* = argmin_i ||x_t - y_i||."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.store import DatasetStore
from ..errors import StudioError, unknown_name
from ..search import BACKENDS, build_index
from .base import Denoised, Denoiser, NoiseLevel, check_chunk_size, register_denoiser


@dataclass
class NearestDatasetParams:
    timestep_aware: bool = False  # compare x_t / sqrt(ab_t) instead of x_t with the clean images
    backend: str = "exact"  # exact (chunked GEMM, exact re-scoring) | cdist (the specification's cdist + min) | faiss
    chunk_size: int | None = None  # exact backend: dataset images per search chunk; None = chosen from memory
    faiss_index: str = "Flat"  # faiss backend: index_factory string; Flat = exhaustive, e.g. IVF1024,Flat = approximate
    faiss_nprobe: int = 8  # faiss backend, IVF indexes: inverted lists visited per query

    def __post_init__(self) -> None:  # checked with the config, before a run directory exists
        if self.backend not in BACKENDS:
            raise unknown_name("nearest-neighbour backend", self.backend, BACKENDS)
        check_chunk_size(self.chunk_size)
        if self.faiss_nprobe < 1:
            raise StudioError(f"model.params.faiss_nprobe must be at least 1, got {self.faiss_nprobe}")


@register_denoiser("nearest_dataset")
class NearestDataset(Denoiser):
    """Returns the training image closest to x_t: the floor every analytic denoiser is measured against."""

    Params = NearestDatasetParams

    def fit(self, store: DatasetStore) -> NearestDataset:
        params = self.params
        self.store = store
        self.index = build_index(
            store, params.backend, self.device, params.chunk_size, params.faiss_index, params.faiss_nprobe
        )
        return self

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        query = x_t / level.signal_scale if self.params.timestep_aware else x_t
        found = self.index.search(query, k=1)
        index = found.indices[:, 0]
        x0_hat = self.store.gather(index, device=x_t.device, dtype=x_t.dtype)
        return Denoised(x0_hat, {"nearest_index": index, "nearest_distance": found.distances[:, 0]})

"""Exact k-nearest-neighbour search in Euclidean distance over a dataset store, chunked over the dataset."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..data.store import DatasetStore


class KnnResult(NamedTuple):
    """The k nearest images of each query, nearest first (ties broken by the lowest index)."""

    distances: torch.Tensor  # [B, k] Euclidean distances, float32
    indices: torch.Tensor  # [B, k] int64 indices into the store


def knn_search(
    queries: torch.Tensor, store: DatasetStore, k: int = 1, chunk_size: int | None = None
) -> KnnResult:
    """Exact k-NN of `queries` [B, ...] (flattened to [B, n]) among the store's images, in model space.

    Distances are accumulated in float64 one dataset chunk at a time, so peak extra memory is
    O(B x chunk x n) and the full [B, N] distance matrix is never built.
    """
    flat = queries.reshape(queries.shape[0], -1).to(torch.float64)
    if flat.shape[1] != store.dim:
        raise ValueError(f"queries have {flat.shape[1]} values each, the store's images {store.dim}")
    k = min(k, store.num_images)
    chunk = chunk_size or max(1, (8 << 20) // max(1, flat.shape[0] * store.dim))
    best_d = torch.full((flat.shape[0], 0), float("inf"), dtype=torch.float64, device=flat.device)
    best_i = torch.zeros((flat.shape[0], 0), dtype=torch.int64, device=flat.device)
    for start in range(0, store.num_images, chunk):
        block = store.model_space(start, start + chunk, flat.device, torch.float64).reshape(-1, store.dim)
        d = ((flat[:, None, :] - block[None]) ** 2).sum(-1)
        idx = torch.arange(start, start + block.shape[0], device=flat.device).expand_as(d)
        best_d, order = torch.cat([best_d, d], 1).sort(dim=1, stable=True)
        best_i = torch.cat([best_i, idx], 1).gather(1, order)
        best_d, best_i = best_d[:, :k], best_i[:, :k]
    return KnnResult(best_d.sqrt().to(torch.float32), best_i)

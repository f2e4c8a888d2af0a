"""One constructor for every nearest-neighbour backend; each returns an object with `search(queries, k)`."""

from __future__ import annotations

from typing import Protocol

import torch

from ..data.store import DatasetStore
from ..errors import unknown_name
from .knn import KnnIndex, KnnResult

BACKENDS = ("exact", "cdist", "faiss")


class NeighbourIndex(Protocol):
    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult: ...


def build_index(
    store: DatasetStore,
    backend: str = "exact",
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    faiss_index: str = "Flat",
    faiss_nprobe: int = 8,
) -> NeighbourIndex:
    """exact: KnnIndex (the default); cdist: the specification's torch.cdist + min; faiss: FaissIndex."""
    if backend == "exact":
        return KnnIndex(store, device=device, chunk_size=chunk_size)
    if backend == "cdist":
        from .cdist_index import CdistIndex

        return CdistIndex(store, device=device)
    if backend == "faiss":
        from .faiss_index import FaissIndex

        return FaissIndex(store, factory=faiss_index, nprobe=faiss_nprobe, device=device)
    raise unknown_name("nearest-neighbour backend", backend, BACKENDS)

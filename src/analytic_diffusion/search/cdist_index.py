"""The specification's nearest-neighbour search, kept as the baseline the exact kernel is measured against.

The whole dataset lives as float32 model space on the device (4x the uint8 store), and every call builds the
[B, N] distance matrix with `torch.cdist` then takes `min` (or `topk` for k > 1). Ties and rounding follow
whatever cdist computes; nothing here is exact.
"""

from __future__ import annotations

import torch

from ..data.store import DatasetStore
from .knn import KnnResult


class CdistIndex:
    """torch.cdist + min over a float32 copy of the store (DESIGN.md §3, the limits issue 3 removes)."""

    def __init__(self, store: DatasetStore, device: torch.device | str = "cpu"):
        self.data = store.model_space(device=device).reshape(store.num_images, -1)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult:
        """The k nearest by cdist distance [B, N], nearest first."""
        flat = queries.reshape(queries.shape[0], -1).to(self.data)
        distances = torch.cdist(flat, self.data)
        if k == 1:
            best, index = distances.min(dim=1)
            return KnnResult(best[:, None], index[:, None])
        best, index = distances.topk(min(k, self.data.shape[0]), dim=1, largest=False)
        return KnnResult(best, index)

"""The `samples` strategy: every rank holds the whole store and samples its contiguous share of the run's
sampling batches; rank 0 gathers the finished batches in order and writes the one run directory.

The batches are those of a one-process run (same sizes, same per-sample seeds), so every sample is computed from
the same inputs by the same code: the gathered samples equal the one-process run's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..data.store import DatasetStore
from ..errors import StudioError
from ..search import KnnResult, knn_search
from .group import Ranks, all_arrived, collective


def check_samples_strategy(per_sample_seeds: bool) -> None:
    """The samples strategy needs per-sample seeds (a shared generator would give rank r other noise)."""
    if not per_sample_seeds:
        raise StudioError("distributed.strategy=samples (the default) needs per-sample seeds, so that each sample's "
                          "noise does not depend on which rank draws it: add sampling.per_sample_seeds=true (each "
                          "rank samples its share; the samples of a one-process run with that override) or "
                          "distributed.strategy=dataset (the samples of this command in one process; the store "
                          "split across the ranks, merged every step)")


def idle_ranks_warning(num_batches: int, ranks: Ranks) -> str | None:
    """A sentence for the run's warnings when some ranks get no sampling batch (they wait for the others)."""
    if num_batches >= ranks.world_size:
        return None
    idle = ranks.world_size - num_batches
    return (f"{num_batches} sampling batch{'es' if num_batches > 1 else ''} for {ranks.world_size} ranks: {idle} "
            f"rank{'s' if idle > 1 else ''} idle (lower sampling.batch_size to give every rank a batch)")


def gather_batches(ranks: Ranks, items: list[Any]) -> list[Any] | None:
    """Every rank's `items` (picklable, on the CPU) concatenated in rank order on rank 0; None on the others. The
    ranks first wait for each other for as long as the others make progress (`all_arrived`): their shares of the
    batches may differ by one, which may take longer than the collective's timeout."""
    all_arrived("gather_batches")
    parts: list[Any] | None = [None] * ranks.world_size if ranks.is_writer else None
    collective(dist.gather_object, items, parts, dst=0)
    if parts is None:
        return None
    return [item for part in parts for item in part]


class SplitQueries:
    """Exact k-NN search over a store every rank holds, the queries split: each rank searches its contiguous share
    and every rank receives all results, in order (each query's neighbours are those of a one-process search)."""

    def __init__(self, store: DatasetStore, ranks: Ranks):
        self.store, self.ranks = store, ranks

    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult:
        part = self.ranks.share(queries.shape[0])
        if len(part):
            found = knn_search(queries[part.start : part.stop], self.store, k)
            mine = (found.distances.cpu(), found.indices.cpu())
        else:
            width = min(k, self.store.num_images)
            mine = (torch.empty(0, width), torch.empty(0, width, dtype=torch.long))
        parts: list[Any] = [None] * self.ranks.world_size
        collective(dist.all_gather_object, parts, mine)
        return KnnResult(torch.cat([d for d, _ in parts]).to(queries.device),
                         torch.cat([i for _, i in parts]).to(queries.device))

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        return self.store.gather(indices, device, dtype)

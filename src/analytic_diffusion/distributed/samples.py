"""The `samples` strategy: every rank holds the whole store and samples its contiguous share of the run's
sampling batches; rank 0 gathers the finished batches in order and writes the one run directory.

The batches are those of a one-process run (same sizes, same per-sample seeds), so every sample is computed from
the same inputs by the same code: the gathered samples equal the one-process run's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..errors import StudioError
from .group import Ranks, collective


def check_samples_strategy(per_sample_seeds: bool, num_batches: int, ranks: Ranks) -> None:
    """The samples strategy needs per-sample seeds (a shared generator would give rank r other noise)."""
    if not per_sample_seeds:
        raise StudioError("distributed.strategy=samples needs per-sample seeds, so that each sample's noise does not "
                          "depend on which rank draws it: set sampling.per_sample_seeds=true (or use "
                          "distributed.strategy=dataset)")
    if num_batches < ranks.world_size:
        raise StudioError(f"{num_batches} sampling batch(es) for {ranks.world_size} ranks: some ranks would idle; "
                          "lower sampling.batch_size or raise sampling.num_samples")


def gather_batches(ranks: Ranks, items: list[Any]) -> list[Any] | None:
    """Every rank's `items` (picklable, on the CPU) concatenated in rank order on rank 0; None on the others."""
    parts: list[Any] | None = [None] * ranks.world_size if ranks.is_writer else None
    collective(dist.gather_object, items, parts, dst=0)
    if parts is None:
        return None
    return [item for part in parts for item in part]

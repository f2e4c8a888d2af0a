"""Where every random number of a run comes from, under the two seed conventions (DESIGN.md §2).

`SharedNoise` is the reference convention: one generator per run, one draw per sampling batch, batches in
order, so a sample's noise depends on the batch size. `PerSampleNoise` gives sample i its own generator seeded
from (seed, i), so results do not depend on how samples are batched.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class NoiseSource(Protocol):
    """Draws standard normal noise for one sampling batch of shape [B, *sample_shape]."""

    def randn(self, *leading: int) -> torch.Tensor:
        """Return noise of shape [*leading, B, *sample_shape] on the batch's device."""
        ...


class SharedNoise:
    """One generator shared by all batches of a run: `torch.randn((*leading, B, ...), generator=g)`."""

    def __init__(self, generator: torch.Generator, batch_size: int, sample_shape: tuple[int, ...]):
        self.generator = generator
        self.shape = (batch_size, *sample_shape)

    def randn(self, *leading: int) -> torch.Tensor:
        return torch.randn((*leading, *self.shape), generator=self.generator, device=self.generator.device)


class PerSampleNoise:
    """One generator per sample; each draw takes [*leading, *sample_shape] from every sample's generator."""

    def __init__(self, generators: list[torch.Generator], sample_shape: tuple[int, ...]):
        self.generators = generators
        self.sample_shape = sample_shape

    def randn(self, *leading: int) -> torch.Tensor:
        draws = [torch.randn((*leading, *self.sample_shape), generator=g, device=g.device) for g in self.generators]
        return torch.stack(draws, dim=len(leading))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` under the per-sample convention: a SeedSequence hash of (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batch_noise_sources(
    seed: int, num_samples: int, batch_size: int, sample_shape: tuple[int, ...], device: torch.device, per_sample: bool
) -> list[NoiseSource]:
    """The noise source of each sampling batch in order; the last batch may be smaller."""
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    if not per_sample:
        generator = torch.Generator(device).manual_seed(seed)
        return [SharedNoise(generator, size, sample_shape) for size in sizes]
    sources: list[NoiseSource] = []
    for start, size in zip(range(0, num_samples, batch_size), sizes):
        gens = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in range(start, start + size)]
        sources.append(PerSampleNoise(gens, sample_shape))
    return sources

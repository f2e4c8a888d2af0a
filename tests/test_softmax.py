"""The streaming log-sum-exp equals torch.softmax in float64 for every chunking, masked (-inf) logits included."""

from __future__ import annotations

import math

import pytest
import torch

from analytic_diffusion.search.softmax import StreamingSoftmax


def streamed(logits: torch.Tensor, values: torch.Tensor, chunk: int) -> StreamingSoftmax:
    softmax = StreamingSoftmax(track_concentration=True)
    for start in range(0, logits.shape[1], chunk):
        rows = values[start : start + chunk]
        softmax.update(logits[:, start : start + chunk], lambda p: p @ rows)
    return softmax


@pytest.mark.parametrize("chunk", [1, 4, 7, 29])
def test_masked_prefix_and_masked_entries_match_torch_softmax(chunk):
    """-inf logits weigh 0 wherever they are, also when a whole chunk (or the first ones) holds nothing else."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 29, generator=generator, dtype=torch.float64) * 5
    logits[:, :10] = -math.inf  # the first chunks of every size but 29 are fully masked
    logits[1, 15::3] = -math.inf
    values = torch.randn(29, 4, generator=generator, dtype=torch.float64)
    weights = torch.softmax(logits, dim=1)
    softmax = streamed(logits, values, chunk)
    torch.testing.assert_close(softmax.mean(), weights @ values, rtol=0, atol=1e-12)
    torch.testing.assert_close(softmax.effective_count(), 1 / weights.square().sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(softmax.top_weight(), weights.amax(1), rtol=1e-12, atol=0)


def test_all_masked_row_is_nan_and_leaves_other_rows_alone():
    logits = torch.tensor([[-math.inf] * 6, [0.0, 1.0, 2.0, 3.0, -1e4, 1e4]], dtype=torch.float64)
    values = torch.arange(6, dtype=torch.float64)[:, None]
    for chunk in (1, 2, 6):
        mean = streamed(logits, values, chunk).mean()
        assert torch.isnan(mean[0]).all()
        torch.testing.assert_close(mean[1], torch.softmax(logits[1], 0) @ values, rtol=0, atol=1e-12)

"""One streaming (running-max) log-sum-exp primitive for every softmax-weighted average over the dataset.

The softmax over N images is accumulated chunk by chunk: keep the running maximum m of the logits, the sum
s = sum_i exp(l_i - m) and the numerator sum_i exp(l_i - m) v_i, and rescale both by exp(m_old - m_new)
whenever the maximum grows. The result equals the softmax over the whole set, whatever the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def logit_floor(dtype: torch.dtype) -> float:
    """log(tiny) / 2 of `dtype` (-43.7 in float32): logits relative to the maximum are floored here, so that no
    weight e^l is subnormal (see StreamingSoftmax.update)."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


class StreamingSoftmax:
    """Accumulates softmax-weighted sums over chunks of a set; `mean()` is the softmax average.

    Logits have shape [*batch, K] for a chunk of K items; the numerator has shape [*batch, *value_shape].
    """

    def __init__(self, track_concentration: bool = False):
        self.max: torch.Tensor | None = None  # running max of the logits, [*batch]
        self.total: torch.Tensor | None = None  # sum exp(l - max), [*batch]
        self.numerator: torch.Tensor | None = None  # sum exp(l - max) v, [*batch, *value_shape]
        self.squares: torch.Tensor | None = None  # sum exp(2 (l - max)), for the effective count
        self.track_concentration = track_concentration

    def update(self, logits: torch.Tensor, weighted_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add one chunk: `weighted_sum(p)` maps weights p = exp(logits - max) [*batch, K] to [*batch, *value_shape]."""
        chunk_max = logits.amax(dim=-1)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        # weights near the underflow limit (exp(-87) in float32) make the CPU exp and the products that follow
        # 20-50x slower (subnormal numbers); flooring the exponent at log(tiny) / 2 (e^-43.7 in float32) changes
        # a sum whose largest term is 1 by at most K * e^-43.7, far below float precision (-inf logits included)
        floor = logit_floor(logits.dtype)
        # rows with only -inf logits so far are shifted by 0, not by -inf (-inf - -inf = NaN would poison every
        # later chunk); what they add is wiped by the rescale exp(-inf) = 0 at their first finite logit
        shift = new_max.masked_fill(new_max == -math.inf, 0.0)
        weights = torch.exp((logits - shift.unsqueeze(-1)).clamp_(min=floor))
        chunk_sum = weighted_sum(weights)
        if self.max is None:
            self.total, self.numerator = weights.sum(-1), chunk_sum
            self.squares = weights.square().sum(-1) if self.track_concentration else None
        else:
            rescale = torch.exp(self.max - shift)
            self.total = self.total * rescale + weights.sum(-1)
            self.numerator = self.numerator * _trailing(rescale, self.numerator) + chunk_sum
            if self.track_concentration:
                self.squares = self.squares * rescale.square() + weights.square().sum(-1)
        self.max = new_max

    def mean(self) -> torch.Tensor:
        """The softmax-weighted average sum_i softmax(l)_i v_i over everything added so far."""
        if self.numerator is None:
            raise RuntimeError("StreamingSoftmax.mean() called before any update()")
        return self.numerator / _trailing(self._total(), self.numerator)

    def top_weight(self) -> torch.Tensor:
        """The largest softmax weight: exp(max - max) / total."""
        return 1.0 / self._total()

    def effective_count(self) -> torch.Tensor:
        """1 / sum_i w_i^2: how many items effectively share the weight (1 = collapsed onto one)."""
        if self.squares is None:
            raise RuntimeError("create StreamingSoftmax(track_concentration=True) to get the effective count")
        return self._total().square() / self.squares

    def _total(self) -> torch.Tensor:
        """The normaliser, NaN for rows whose logits were all -inf (no distribution, as torch.softmax says)."""
        return self.total.masked_fill(self.max == -math.inf, math.nan)


def _trailing(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`scale` [*batch] viewed with trailing singleton dims to broadcast against `like` [*batch, *value_shape]."""
    return scale.reshape(*scale.shape, *([1] * (like.ndim - scale.ndim)))

"""The patch posterior composite with square patches (PSPC; Niedoba et al., arXiv 2411.19339; DESIGN.md §6).

For every top-left anchor a where a P x P square fits, the posterior mean of that square under the training
images cropped at the same place; each pixel's x0_hat is the average of the square means that cover it:

    w_i(a) = softmax_i(-||S_a(x_t) - sqrt(ab_t) S_a(y_i)||^2 / (2 (1 - ab_t) tau)),  m_a = sum_i w_i(a) S_a(y_i)
    x0_hat(p) = mean over squares a containing p of m_a(p)

With P = H (one square, the whole image) PSPC is `optimal`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import StudioError
from ..search.patch_softmax import PatchGroup, PatchSoftmaxResult, WindowSpec
from .base import register_denoiser
from .local_patch import LocalPatchDenoiser, LocalPatchParams, Plan


@dataclass
class PspcParams(LocalPatchParams):
    odd_sizes = False  # a square of any side P <= the image size


@register_denoiser("pspc")
class PatchPosteriorComposite(LocalPatchDenoiser):
    """Posterior means of every P x P square (location-specific dictionary), averaged where they overlap."""

    Params = PspcParams

    @classmethod
    def check_fits(cls, params: PspcParams, size: int, sample_shape: tuple[int, int, int]) -> None:
        _, height, width = sample_shape
        if size > min(height, width):
            raise StudioError(f"pspc needs patch_size <= the image size {height}x{width}, got {size}")

    def plan(self, size: int) -> Plan:
        _, height, width = self.store.sample_shape
        anchors = torch.arange((height - size + 1) * (width - size + 1))
        return Plan(WindowSpec((size, size), 0, "window"), [PatchGroup(anchors, anchors[:, None], aligned=True)])

    def queries(self, x_t: torch.Tensor, size: int) -> torch.Tensor:
        return F.unfold(x_t, size)

    def pixel_location(self, row: int, column: int, size: int) -> int:
        """The square (anchor) centred on the pixel as far as the image allows."""
        _, height, width = self.store.sample_shape
        top = min(max(row - size // 2, 0), height - size)
        left = min(max(column - size // 2, 0), width - size)
        return top * (width - size + 1) + left

    def assemble(self, result: PatchSoftmaxResult, shape: torch.Size, size: int) -> torch.Tensor:
        """The square means summed over the squares covering each pixel (`result.folded`), divided by how many
        squares cover it."""
        folded = result.folded
        anchors = (shape[-2] - size + 1) * (shape[-1] - size + 1)
        cover = F.fold(folded.new_ones(1, size * size, anchors), shape[-2:], size)
        # folded(p) = sum_i y_i(p) s_i(p), where s_i(p), image i's normalised weights summed over the squares
        # covering p, add up to cover(p) only to float32 rounding: a pixel that is -1 in every image came out as
        # -1.0000001. The exact x0_hat is a convex combination of the store's values, all in [-1, 1] (model space).
        return (folded / cover).clamp_(-1.0, 1.0)

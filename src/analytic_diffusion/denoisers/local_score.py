"""The local score machine (LS; Kamb & Ganguli, arXiv 2412.20292; DESIGN.md §6): each pixel is denoised from the
k x k window of x_t around it against the windows of every training image at the *same* place.

    w_i(p) = softmax_i(-||Q_k(x_t, p) - sqrt(ab_t) Q_k(y_i, p)||^2 / (2 (1 - ab_t) tau)),  x0_hat(p) = sum_i w_i(p) y_i(p)

Windows are zero-padded in both (positions outside the image count for nothing). With k >= 2H - 1 every window
covers the whole image from every pixel and LS is `optimal`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..search.patch_softmax import PatchGroup, WindowSpec
from .base import register_denoiser
from .local_patch import LocalPatchDenoiser, Plan


@register_denoiser("local_score")
class LocalScore(LocalPatchDenoiser):
    """Per-pixel softmax over the training windows at the same location (no equivariance)."""

    def plan(self, size: int) -> Plan:
        _, height, width = self.store.sample_shape
        pixels = torch.arange(height * width)
        return Plan(WindowSpec((size, size), size // 2, "centre"), [PatchGroup(pixels, pixels[:, None], aligned=True)])

    def queries(self, x_t: torch.Tensor, size: int) -> torch.Tensor:
        return F.unfold(x_t, size, padding=size // 2)

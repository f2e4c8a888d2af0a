"""The equivariant local score machine (ELS; Kamb & Ganguli, arXiv 2412.20292; DESIGN.md §6): each pixel is
denoised from the k x k window of x_t around it against every k x k patch of every training image.

    w_phi(p) = softmax_phi(-||Q_k(x_t, p) - sqrt(ab_t) phi||^2 / (2 (1 - ab_t) tau)),  x0_hat(p) = sum_phi w_phi(p) centre(phi)

`boundary: circular`: query windows are circularly padded and the dictionary is every fully-inside patch,
N (H - k + 1)(W - k + 1) of them, the same for every pixel. `boundary: broken` (the zero-padded machine): a pixel
whose window lies inside the image uses that dictionary; along each axis a coordinate within r = k // 2 of an edge
only matches training windows at the same coordinate, zero-padded the same way. So a pixel near one edge compares
with windows at the same distance from that edge anywhere along it, a pixel near two edges (a corner) with
windows at its own offset only, and k >= H is the local score machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import StudioError, closest
from ..search.patch_softmax import PatchGroup, WindowSpec
from .base import register_denoiser
from .local_patch import LocalPatchDenoiser, LocalPatchParams, Plan

BOUNDARIES = ("circular", "broken")


@dataclass
class ElsParams(LocalPatchParams):
    boundary: str = "circular"  # circular: circular query padding, interior dictionary; broken: zero padding

    def __post_init__(self) -> None:
        if self.boundary not in BOUNDARIES:
            raise StudioError(f"model.params.boundary must be one of {', '.join(BOUNDARIES)}, not "
                              f"'{self.boundary}'{closest(self.boundary, BOUNDARIES)}")
        super().__post_init__()


def axis_classes(length: int, radius: int) -> tuple[list[int], list[int]]:
    """Coordinates along one axis whose window lies inside (the interior, any of which matches any other) and
    those within `radius` of an edge (each matching only itself)."""
    interior = list(range(radius, length - radius))
    edge = [i for i in range(length) if i not in interior]
    return interior, edge


def broken_groups(height: int, width: int, radius: int) -> list[PatchGroup]:
    """The dictionary rule of the boundary-broken machine as query groups (positions = pixel indices), from the
    classes of each axis (the interior range, or a single edge coordinate): the interior pixels share one
    dictionary; each edge line (an edge row across the interior columns, or an edge column across the interior
    rows) has its own, the lines of equal length gathered into one group of several runs; the corners (an edge
    coordinate on both axes) are aligned: each compared with the windows at its own place."""
    rows_in, rows_edge = axis_classes(height, radius)
    cols_in, cols_edge = axis_classes(width, radius)
    groups = []
    if rows_in and cols_in:
        interior = torch.tensor([i * width + j for i in rows_in for j in cols_in], dtype=torch.long)
        groups.append(PatchGroup(interior, interior[None, :]))
    lines = [[i * width + j for j in cols_in] for i in rows_edge if cols_in]
    lines += [[i * width + j for i in rows_in] for j in cols_edge if rows_in]
    for length in sorted({len(line) for line in lines}):
        same = torch.tensor([line for line in lines if len(line) == length], dtype=torch.long)  # [G, S]
        groups.append(PatchGroup(same.flatten(), same))
    corners = torch.tensor([i * width + j for i in rows_edge for j in cols_edge], dtype=torch.long)
    if corners.numel():
        groups.append(PatchGroup(corners, corners[:, None], aligned=True))
    return groups


@register_denoiser("els")
class EquivariantLocalScore(LocalPatchDenoiser):
    """Per-pixel softmax over every training patch (circular) or over the patches with the same boundary
    (broken)."""

    Params = ElsParams

    @classmethod
    def check_fits(cls, params: ElsParams, size: int, sample_shape: tuple[int, int, int]) -> None:
        _, height, width = sample_shape
        if params.boundary == "circular" and size > min(height, width):
            raise StudioError(f"els with boundary=circular needs patch_size <= the image size {height}x{width}, got "
                              f"{size}; use boundary=broken (k >= H is then local_score) or local_score")

    def plan(self, size: int) -> Plan:
        _, height, width = self.store.sample_shape
        radius = size // 2
        window = WindowSpec((size, size), radius, "centre")
        if self.params.boundary == "broken":
            return Plan(window, broken_groups(height, width, radius))
        interior = torch.tensor([i * width + j for i in range(radius, height - radius)
                                 for j in range(radius, width - radius)], dtype=torch.long)
        return Plan(window, [PatchGroup(torch.arange(height * width), interior[None, :])])

    def queries(self, x_t: torch.Tensor, size: int) -> torch.Tensor:
        radius = size // 2
        if self.params.boundary == "broken":
            return F.unfold(x_t, size, padding=radius)
        return F.unfold(F.pad(x_t, (radius,) * 4, mode="circular"), size)

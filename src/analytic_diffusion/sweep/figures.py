"""The sweep's figures, drawn from the cells' own outputs (samples.pt, metrics.json).

- comparison: one row of final samples per cell (the same samples, so the same x_T, in every column), each row
  labelled with its method and grid values, images enlarged with `runs.legible`;
- agreement: R² of each method's x0_hat against the backbone's, along their own trajectories, against the
  timestep, every cell on one axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid

from ..compare import R2_PLOT_FLOOR
from ..fileio import atomic_write
from ..runs import legible, to_unit_range
from ..figures import pyplot

MAX_COLUMNS = 12  # the comparison shows at most this many samples per row
PADDING = 2  # pixels between images
DPI = 100
LABEL_CHAR_PX = 7  # rough width of a label character at the label font size (9 pt at DPI)


def save_comparison(rows: Sequence[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    """One PNG: a labelled row per (label, samples [N, C, H, W] in model space), the first MAX_COLUMNS samples,
    drawn pixel for pixel (one image pixel per `legible` block, no interpolation)."""
    plt = pyplot()
    columns = min(MAX_COLUMNS, min(images.shape[0] for _, images in rows))
    strips = [make_grid(legible(to_unit_range(images[:columns])), nrow=columns, padding=PADDING, pad_value=1.0)
              for _, images in rows]
    width = max(strip.shape[2] for strip in strips)  # rows of other image sizes are padded white on the right
    strips = [torch.nn.functional.pad(strip, (0, width - strip.shape[2]), value=1.0) for strip in strips]
    canvas = torch.cat(strips, dim=1).permute(1, 2, 0).numpy()
    height = canvas.shape[0]
    bottoms = torch.tensor([strip.shape[1] for strip in strips]).cumsum(0)
    centres = [float(b - strip.shape[1] / 2) for b, strip in zip(bottoms, strips)]
    margin = LABEL_CHAR_PX * max(len(label) for label, _ in rows) + 20
    top = 30
    figure = plt.figure(figsize=((width + margin) / DPI, (height + top) / DPI), dpi=DPI)
    axes = figure.add_axes((margin / (width + margin), 0, width / (width + margin), height / (height + top)))
    axes.imshow(canvas, interpolation="nearest", aspect="equal")
    axes.set_yticks(centres, [label for label, _ in rows], fontsize=9)
    axes.set_xticks([])
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.suptitle(title, fontsize=10, y=1 - 4 / (height + top), va="top")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    plt.close(figure)


def save_agreement(curves: Sequence[tuple[str, list[int], list[float | None]]], path: Path, title: str) -> None:
    """One PNG: per (label, timesteps, mean R² per step), R² against the timestep (sampling order, left to right)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    lowest = 1.0
    for label, timesteps, r2 in curves:
        values = [float("nan") if v is None else v for v in r2]
        axes.plot(timesteps, values, marker="o", ms=3, label=label)
        lowest = min([lowest, *(v for v in values if v == v)])
    if lowest < R2_PLOT_FLOOR:
        axes.set_ylim(R2_PLOT_FLOOR, 1.05)
        axes.text(0.02, 0.02, f"values below {R2_PLOT_FLOOR} not shown", transform=axes.transAxes, fontsize=8)
    axes.set(xlabel="timestep t", ylabel="R² (1 = the backbone's x0_hat)", title=title)
    axes.invert_xaxis()
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)

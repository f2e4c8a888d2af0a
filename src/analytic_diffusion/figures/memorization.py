"""The figures of `ads memorization`: each sample beside its nearest training images, and distance histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write
from . import pyplot

CELL_INCHES = 1.15  # one image; at DPI 100 a 28 px digit is drawn ~4x larger, a 32 px image ~3.6x
DPI = 100
MEMORIZED_COLOUR = "#d62728"


def _displayable(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """Model-space [C, H, W] to an array imshow draws as is, and its colour map (grey for one channel)."""
    unit = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if unit.shape[0] == 1:
        return unit[0].numpy(), "gray"
    return unit.permute(1, 2, 0).numpy(), None


def save_neighbours(
    samples: torch.Tensor,
    neighbours: torch.Tensor,
    distances: torch.Tensor,
    indices: torch.Tensor,
    ratio: torch.Tensor,
    memorized: torch.Tensor,
    path: Path,
    labels: list[str] | None = None,
) -> None:
    """One row per sample: the sample [B, C, H, W], then its k nearest training images [B, k, C, H, W] with
    their index and distance (indices, distances [B, k]) written under them. Memorized rows (bool [B]) get a red
    frame and title; ratio [B] is d1 / d2. labels: a name per sample (default its position)."""
    plt = pyplot()
    rows, k = neighbours.shape[:2]
    figure, axes = plt.subplots(rows, k + 1, figsize=(CELL_INCHES * (k + 1), (CELL_INCHES + 0.45) * rows),
                                squeeze=False)
    for row in range(rows):
        cells = [samples[row], *neighbours[row]]
        for column, (axis, image) in enumerate(zip(axes[row], cells)):
            array, cmap = _displayable(image)
            axis.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                copy = bool(memorized[row])
                name = labels[row] if labels else f"sample {row}"
                axis.set_title(name if len(name) <= 18 else "…" + name[-17:], fontsize=7)
                axis.set_xlabel(f"d1/d2 {float(ratio[row]):.3f}" + ("\nMEMORIZED" if copy else ""), fontsize=7,
                                color=MEMORIZED_COLOUR if copy else "black")
                for spine in axis.spines.values():
                    spine.set_edgecolor(MEMORIZED_COLOUR if copy else "black")
                    spine.set_linewidth(3 if copy else 0.5)
            else:
                axis.set_xlabel(f"#{int(indices[row, column - 1])}\nd={float(distances[row, column - 1]):.3f}",
                                fontsize=7)
                if row == 0:
                    axis.set_title(f"neighbour {column}", fontsize=7)
    figure.tight_layout(h_pad=0.3, w_pad=0.2)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    plt.close(figure)


def save_distance_histograms(
    samples: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    threshold: float,
    path: Path,
    reference_label: str = "held-out real images",
) -> None:
    """Two panels: histograms of d1 and of d1 / d2 for the samples and for the held-out reference (each as a
    fraction of its own count), the memorization threshold drawn on the ratio panel."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("d1", "d1 (model-space l2)", "distance to the nearest training image"),
              ("ratio", "d1 / d2", "nearest / second-nearest distance (Gu et al.)"))
    for axis, (key, xlabel, title) in zip(axes, panels):
        both = torch.cat([samples[key], reference[key]]).to(torch.float64)
        low, high = float(both.min()), float(both.max())
        bins = np.linspace(low, high if high > low else low + 1e-6, 41)
        for values, label, colour in ((reference[key], f"{reference_label} ({len(reference[key])})", "#7f7f7f"),
                                      (samples[key], f"samples ({len(samples[key])})", "#1f77b4")):
            weights = np.full(len(values), 1 / max(1, len(values)))
            axis.hist(values.double().numpy(), bins=bins, weights=weights, alpha=0.6, label=label, color=colour)
        if key == "ratio":
            axis.axvline(threshold, color=MEMORIZED_COLOUR, linestyle="--", label=f"threshold {threshold:.3g}")
        axis.set(title=title, xlabel=xlabel, ylabel="fraction of images")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)

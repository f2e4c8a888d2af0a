"""The figures of `ads memorization`: each sample beside its nearest training images (PIL, drawn in
milliseconds), and histograms of d1 and d1 / d2 against held-out real images (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_write
from . import pyplot

CELL_PIXELS = 96  # images are upscaled (nearest) by a whole factor to at least this many pixels: 28 px -> 112 px
LABEL_PIXELS = 42  # up to three lines of text under each image
GAP = 6
MEMORIZED_COLOUR = "#d62728"


def _cell(image: torch.Tensor, scale: int) -> Image.Image:
    """Model-space [C, H, W] as an RGB PIL image upscaled `scale` times (nearest: pixels stay visible)."""
    unit = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    pixels = (unit.expand(3, -1, -1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels)).resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)


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
    their index and distance (indices, distances [B, k]) written under them; under the sample its label (default
    its position) and d1/d2 (ratio [B]). Memorized rows (bool [B]) get a red frame and the word MEMORIZED."""
    rows, k = neighbours.shape[:2]
    height, width = samples.shape[-2:]
    scale = max(1, -(-CELL_PIXELS // max(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default(size=11)
    canvas = Image.new("RGB", ((k + 1) * (cell_w + GAP) + 2 * GAP, rows * (cell_h + LABEL_PIXELS + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(rows):
        top = GAP + row * (cell_h + LABEL_PIXELS + GAP)
        copy = bool(memorized[row])
        name = labels[row] if labels else f"sample {row}"
        texts = [(name if len(name) <= 16 else "…" + name[-15:], f"d1/d2 {float(ratio[row]):.3f}",
                  "MEMORIZED" if copy else "")]
        texts += [(f"#{int(indices[row, j])}", f"d={float(distances[row, j]):.3f}") for j in range(k)]
        for column, image in enumerate([samples[row], *neighbours[row]]):
            left = GAP + column * (cell_w + GAP) + (GAP if column else 0)
            canvas.paste(_cell(image, scale), (left, top))
            if column == 0 and copy:
                draw.rectangle((left - 3, top - 3, left + cell_w + 2, top + cell_h + 2), outline=MEMORIZED_COLOUR, width=3)
            colour = MEMORIZED_COLOUR if column == 0 and copy else "black"
            for line, text in enumerate(texts[column]):
                draw.text((left, top + cell_h + 3 + 13 * line), text, fill=colour, font=font)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="png"))


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

"""Pictures of locality masks: for a few output pixels and noise levels, which pixels each one compares.

Works with any fitted denoiser that has `mask(level) -> bool [n, n]` (column q = the pixels output q uses) and
`store` (its dataset), such as pca_locality. One row per noise level, one column per pixel; the mask is white
(per channel for colour images) and the output pixel itself is red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .denoisers.base import NoiseLevel

MARK = (1.0, 0.0, 0.0)  # colour of the output pixel whose mask is shown


def default_mask_pixels(sample_shape: tuple[int, int, int], count: int = 4) -> list[int]:
    """`count` flat pixel indices of channel 0 spread along the image's diagonal, centre included."""
    _, height, width = sample_shape
    fractions = [0.5] + [(k + 1) / (count + 1) for k in range(count)]
    picked = dict.fromkeys(int(f * (height - 1)) * width + int(f * (width - 1)) for f in fractions)
    return list(picked)[:count]


def mask_images(denoiser, levels: Sequence[NoiseLevel], pixels: Sequence[int]) -> torch.Tensor:
    """Mask pictures [len(levels), len(pixels), 3, H, W] in [0, 1]: mask in white, the pixel itself in red."""
    channels, height, width = denoiser.store.sample_shape
    rows = []
    for level in levels:
        mask = denoiser.mask(level)
        row = []
        for pixel in pixels:
            picture = mask[:, pixel].reshape(channels, height, width).float().cpu()
            picture = picture.expand(3, -1, -1).clone() if channels == 1 else picture.clone()
            spot = pixel % (height * width)
            picture[:, spot // width, spot % width] = torch.tensor(MARK)
            row.append(picture)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def save_mask_images(
    denoiser, levels: Sequence[NoiseLevel], pixels: Sequence[int] | None, path: Path, scale: int = 4
) -> Path:
    """Write the mask pictures as one PNG grid (rows: noise levels, columns: pixels; None = a default few),
    enlarged `scale` times."""
    pixels = list(pixels) if pixels is not None else default_mask_pixels(denoiser.store.sample_shape)
    pictures = mask_images(denoiser, levels, pixels)
    flat = pictures.flatten(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(flat, nrow=len(pixels), padding=2, pad_value=0.5), path)
    return path

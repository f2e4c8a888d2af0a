"""The mosaic picture of a local patch method: for a few pixels of final samples, the training patch with the
largest weight at the last step and where it came from (image index, position).

Works with any fitted denoiser that has `top_patches(x_t, level, locations)`, `pixel_location(row, column, size)`,
`patch_size(level)` and `store`, such as local_score, els and pspc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .denoisers.base import NoiseLevel
from .fileio import atomic_write
from .mask_images import default_mask_pixels
from .runs import to_unit_range
from .figures import pyplot

COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:cyan", "tab:purple", "tab:pink")


def _show(axis, image: torch.Tensor) -> None:
    picture = to_unit_range(image).permute(1, 2, 0).cpu().numpy()  # a tensor makes numpy 2 warn inside imshow
    axis.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
    axis.set_xticks([])
    axis.set_yticks([])


def top_patch_images(denoiser, x_t: torch.Tensor, level: NoiseLevel, pixels: list[int],
                     max_samples: int = 3) -> tuple[dict, torch.Tensor]:
    """What the figure draws for the first `max_samples` of x_t [B, C, H, W] and the given pixels (flat indices
    into H x W): `denoiser.top_patches` and the training images they come from [count, pixels, C, H, W]. With a
    sharded store every rank calls this alike (its searches and look-ups are collectives)."""
    count = min(max_samples, x_t.shape[0])
    width = denoiser.store.sample_shape[2]
    size = denoiser.patch_size(level)
    locations = torch.tensor([denoiser.pixel_location(p // width, p % width, size) for p in pixels])
    top = denoiser.top_patches(x_t[:count], level, locations)
    images = denoiser.training_images(top["image"].reshape(-1).cpu())
    return top, images.reshape(*top["image"].shape, *images.shape[1:])


def save_patch_figure(denoiser, x_t: torch.Tensor, samples: torch.Tensor, level: NoiseLevel, path: Path,
                      pixels: list[int] | None = None, max_samples: int = 3) -> dict:
    """`draw_patch_figure` written to `path` (PNG); returns what it drew as a dict (pixel, image index, window
    top-left) for metrics.json."""
    figure, drawn = draw_patch_figure(denoiser, x_t, samples, level, pixels, max_samples)
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    pyplot().close(figure)
    return drawn


def draw_patch_figure(denoiser, x_t: torch.Tensor, samples: torch.Tensor, level: NoiseLevel,
                      pixels: list[int] | None = None, max_samples: int = 3) -> tuple[Any, dict]:
    """One row per sample (up to `max_samples`): the sample with the chosen pixels marked, then per pixel the
    training image whose window had the largest weight, the window outlined. Returns the matplotlib figure and
    what it drew."""
    plt = pyplot()

    count = min(max_samples, samples.shape[0])
    _, height, width = denoiser.store.sample_shape
    pixels = pixels if pixels is not None else default_mask_pixels(denoiser.store.sample_shape, 4)
    size = denoiser.patch_size(level)
    top, images = top_patch_images(denoiser, x_t, level, pixels, max_samples)
    # square panels 2 in wide, each row with room for its titles, the figure title on top; the constrained
    # layout places them (tight_layout let the second row's titles overlap the first row's images)
    figure, axes = plt.subplots(count, 1 + len(pixels), figsize=(2.0 * (1 + len(pixels)), 2.2 * count + 0.3),
                                squeeze=False, layout="constrained")
    records = []
    for n in range(count):
        _show(axes[n, 0], samples[n])
        axes[n, 0].set_title(f"sample {n}", fontsize=8)
        for col, pixel in enumerate(pixels):
            colour = COLOURS[col % len(COLOURS)]
            row, column = divmod(pixel, width)
            axes[n, 0].plot(column, row, "s", color=colour, markersize=4, fillstyle="none")
            image = int(top["image"][n, col])
            top_row, top_col = (int(v) for v in top["top_left"][n, col])
            axis = axes[n, col + 1]
            _show(axis, images[n, col])
            kh, kw = top["window"].shape[-2:]
            axis.add_patch(plt.Rectangle((top_col - 0.5, top_row - 0.5), kw, kh, fill=False, color=colour, lw=1.5))
            axis.set_title(f"px ({row},{column}) <- #{image} @ ({top_row},{top_col})", fontsize=7)
            records.append({"sample": n, "pixel": [row, column], "train_index": image,
                            "window_top_left": [top_row, top_col], "patch_size": size})
    figure.suptitle(f"largest-weight training patch at t={level.timestep} (k={size})", fontsize=9)
    return figure, {"timestep": level.timestep, "patches": records}

"""Run artifacts: grids of small images are enlarged pixel for pixel so that they can be read."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from analytic_diffusion.runs import legible, save_grid


def test_small_images_are_enlarged_by_a_whole_factor_without_blur(tmp_path):
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    save_grid(images, tmp_path / "grid.png", columns=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    assert grid.shape == (2 + 2 * (84 + 2), 2 + 2 * (84 + 2))  # 28 px -> 3 x 28 = 84 >= 64, padding 2
    first = grid[2:86, 2:86]
    blocks = first.reshape(28, 3, 28, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every source pixel is a uniform 3 x 3 block
    expected = ((images[0, 0] + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(blocks[:, 0, :, 0], expected)


def test_images_of_at_least_64_pixels_are_left_alone_and_odd_sizes_round_up():
    large = torch.rand(2, 3, 64, 80)
    assert legible(large) is large
    assert legible(torch.rand(1, 1, 32, 40)).shape == (1, 1, 64, 80)
    assert legible(torch.rand(1, 3, 30, 30)).shape == (1, 3, 90, 90)  # 64 / 30 -> 3

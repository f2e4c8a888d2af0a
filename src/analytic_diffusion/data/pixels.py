"""uint8 pixels to model space [-1, 1], bit-identical on every device.

The value of pixel p is ToTensor() then Normalize(0.5, 0.5) of torchvision, (p / 255 - 0.5) / 0.5 in float32,
computed once on the CPU for the 256 values and looked up. Computing it on a GPU instead differs in the last bit
for some p: PyTorch's CUDA kernel divides by a scalar as a multiplication by its reciprocal, so decoded images,
and every statistic of them, would depend on the device.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_TABLE = torch.arange(256, dtype=torch.float32).div_(255).sub_(0.5).div_(0.5)  # [256] model space of each pixel
_ON_DEVICE: dict[torch.device, torch.Tensor] = {}


def _arithmetic(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32).div_(255).sub_(0.5).mul_(2)


@lru_cache(maxsize=None)
def _cpu_arithmetic_is_exact() -> bool:
    """True if the CPU's vectorised float32 division reproduces the table bit for bit (IEEE division, no
    reciprocal): checked once per process, on every value in a tensor long enough for the vector path."""
    return torch.equal(_arithmetic(torch.arange(256, dtype=torch.uint8).repeat(64)), _TABLE.repeat(64))


def decode_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels of any shape, on any device, to model space in `dtype` (float32 values, then converted).
    On a CPU whose arithmetic reproduces the table, the formula itself (about twice as fast as the lookup)."""
    if pixels.device.type == "cpu" and _cpu_arithmetic_is_exact():
        return _arithmetic(pixels).to(dtype)
    table = _ON_DEVICE.get(pixels.device)
    if table is None:
        table = _ON_DEVICE.setdefault(pixels.device, _TABLE.to(pixels.device))
    return torch.take(table, pixels.long()).to(dtype)

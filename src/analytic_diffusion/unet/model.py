"""A standard DDPM UNet (Ho et al. 2020, arXiv 2006.11239, Appendix B) that predicts the noise eps(x_t, t).

Residual blocks (GroupNorm, SiLU, dropout) conditioned on the sinusoidal embedding of the training timestep t in
[0, 1000); channel widths `base_channels * multiplier` per resolution level; self-attention at the resolutions
listed in `attention_resolutions` and in the middle block. The embedding enters each block either as a scale and
shift after its second GroupNorm (Dhariwal & Nichol 2021, "use_scale_shift_norm"; the default) or, as in the original
DDPM, as a bias before it, which a GroupNorm with one channel per group removes entirely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StudioError


@dataclass
class UNetConfig:
    """Architecture of the UNet; stored inside every checkpoint so that loading rebuilds exactly this network."""

    base_channels: int = 64  # channels of the first level; level i has base_channels * channel_multipliers[i]
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])  # one per level; downsample between
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    dropout: float = 0.15  # inside every residual block, before its second convolution
    attention_resolutions: list[int] = field(default_factory=lambda: [14])  # side lengths (px) with self-attention
    middle_attention: bool = True  # self-attention between the two residual blocks of the bottleneck
    attention_heads: int = 1  # heads of every self-attention block (DDPM uses one)
    norm_groups: int = 32  # GroupNorm groups (reduced to gcd(norm_groups, channels) for narrow layers)
    scale_shift_norm: bool = True  # time embedding as GroupNorm scale/shift (ADM); False: added before it (DDPM)
    network: str = "studio"  # studio: this module's UNet | diffusers: a diffusers UNet2DModel | ddpm_unet: the DDPM
    # UNet of pytorch-ddpm (backbones.ddpm_unet); see unet/networks.py for which fields each one uses


def check_architecture(config: UNetConfig, channels: int, resolution: int) -> None:
    """Raise a StudioError when the architecture cannot be built for images of this size."""
    levels = len(config.channel_multipliers)
    if config.base_channels < 2 or config.base_channels % 2:
        raise StudioError(f"unet base_channels must be an even number >= 2, got {config.base_channels}")
    if levels < 1 or min(config.channel_multipliers) < 1:
        raise StudioError(f"unet channel_multipliers must be positive integers, got {config.channel_multipliers}")
    if config.num_res_blocks < 1:
        raise StudioError(f"unet num_res_blocks must be at least 1, got {config.num_res_blocks}")
    if not 0 <= config.dropout < 1:
        raise StudioError(f"unet dropout must be in [0, 1), got {config.dropout}")
    if config.attention_heads < 1 or config.norm_groups < 1:
        raise StudioError("unet attention_heads and norm_groups must be at least 1")
    if resolution % 2 ** (levels - 1):
        raise StudioError(
            f"a UNet with {levels} levels halves the image {levels - 1} times, so the resolution must be divisible "
            f"by {2 ** (levels - 1)}; {resolution}px is not (use fewer channel_multipliers)"
        )
    if channels < 1:
        raise StudioError(f"images must have at least one channel, got {channels}")


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in DDPM): [B] -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so a residual branch starts as the identity (as in DDPM)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResidualBlock(nn.Module):
    """norm-SiLU-conv, norm conditioned on t, SiLU-dropout-conv, plus a (1x1-projected) skip."""

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, groups: int, scale_shift: bool
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        condition = self.time(F.silu(embedding))[:, :, None, None]
        if self.scale_shift:
            scale, shift = condition.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + condition)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise StudioError(f"unet attention_heads ({heads}) must divide the channels of every attended level ({channels})")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the side length with a strided 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the side length: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): [B, C, H, W] noisy images and [B] integer timesteps -> [B, C, H, W] predicted noise."""

    def __init__(self, config: UNetConfig, channels: int, resolution: int):
        super().__init__()
        check_architecture(config, channels, resolution)
        self.config, self.channels, self.resolution = config, channels, resolution
        base, groups, dropout = config.base_channels, config.norm_groups, config.dropout
        embedding_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)

        def residual(in_width: int, out_width: int) -> ResidualBlock:
            return ResidualBlock(in_width, out_width, embedding_dim, dropout, groups, config.scale_shift_norm)

        def attention(width: int, size: int) -> list[nn.Module]:
            return [SelfAttention(width, config.attention_heads, groups)] if size in config.attention_resolutions else []

        self.down = nn.ModuleList()
        skip_widths, width, size = [base], base, resolution
        for level, multiplier in enumerate(config.channel_multipliers):
            for _ in range(config.num_res_blocks):
                block = [residual(width, base * multiplier)]
                width = base * multiplier
                self.down.append(nn.ModuleList(block + attention(width, size)))
                skip_widths.append(width)
            if level < len(config.channel_multipliers) - 1:
                self.down.append(nn.ModuleList([Downsample(width)]))
                skip_widths.append(width)
                size //= 2

        middle = [residual(width, width)]
        if config.middle_attention:
            middle.append(SelfAttention(width, config.attention_heads, groups))
        middle.append(residual(width, width))
        self.middle = nn.ModuleList(middle)

        self.up = nn.ModuleList()
        for level, multiplier in reversed(list(enumerate(config.channel_multipliers))):
            for _ in range(config.num_res_blocks + 1):
                block = [residual(width + skip_widths.pop(), base * multiplier)]
                width = base * multiplier
                self.up.append(nn.ModuleList(block + attention(width, size)))
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(width)]))
                size *= 2

        self.norm_out = _norm(width, groups)
        self.conv_out = _zero(nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        embedding = self.time_mlp(timestep_embedding(timesteps, self.config.base_channels))
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, embedding)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding)
        for layers in self.up:
            if isinstance(layers[0], ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, embedding)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

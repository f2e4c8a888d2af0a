"""The DDPM UNet of pytorch-ddpm and of the reference framework's baselines, with their parameter names, so that their
state dicts load with strict=True (Ho et al. 2020, arXiv 2006.11239, Appendix B; the layout of w86763777/pytorch-ddpm;
specification in ../shared/formats/ddpm_unet.md). Every hyper-parameter but dropout can be read off a state dict:
`infer_config`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # every GroupNorm of the architecture


@dataclass
class DDPMUNetConfig:
    """Hyper-parameters of the DDPM UNet (names of pytorch-ddpm)."""

    ch: int = 128  # channels after `head`; level i has ch * ch_mult[i]
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    attn: list[int] = field(default_factory=lambda: [1])  # levels with self-attention after each ResBlock
    num_res_blocks: int = 2  # ResBlocks per level going down (one more going up)
    dropout: float = 0.1  # inside every ResBlock; off in eval mode
    in_channels: int = 3
    out_channels: int = 3
    T: int = 1000  # rows of the fixed time-embedding table


def time_embedding_table(T: int, ch: int) -> torch.Tensor:
    """[T, ch]: row t = sin(t f_0), cos(t f_0), sin(t f_1), ... with f_i = exp(-(2i / ch) ln 10000), interleaved."""
    frequencies = torch.exp(-torch.arange(0, ch, 2).float() / ch * math.log(10000))
    angles = torch.arange(T).float()[:, None] * frequencies[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(T, ch)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class TimeEmbedding(nn.Module):
    def __init__(self, T: int, ch: int, dim: int):
        super().__init__()
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(time_embedding_table(T, ch)), nn.Linear(ch, dim), Swish(), nn.Linear(dim, dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class DownSample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpSample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, scale 1/sqrt(C), with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(GROUPS, channels)
        self.proj_q = nn.Conv2d(channels, channels, 1)
        self.proj_k = nn.Conv2d(channels, channels, 1)
        self.proj_v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the operations, layouts and scaling of the published implementation (pytorch-ddpm's model.py), so that
        # its checkpoints give its own eps bit for bit (another order of the same products differs by ~1e-6)
        b, c, h, w = x.shape
        g = self.group_norm(x)
        q = self.proj_q(g).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]
        k = self.proj_k(g).reshape(b, c, h * w)  # [B, C, HW]
        v = self.proj_v(g).permute(0, 2, 3, 1).reshape(b, h * w, c)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=-1)
        out = torch.bmm(weights, v).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj(out)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(GROUPS, in_ch), Swish(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(
            nn.GroupNorm(GROUPS, out_ch), Swish(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class DDPMUNet(nn.Module):
    """eps_theta(x_t, t): x_t [B, in_channels, H, W] and integer timesteps t [B] in [0, T) -> [B, out_channels, H, W].

    H and W must be divisible by 2 ** (len(ch_mult) - 1).
    """

    def __init__(self, config: DDPMUNetConfig):
        super().__init__()
        self.config = config
        ch, tdim = config.ch, 4 * config.ch
        self.time_embedding = TimeEmbedding(config.T, ch, tdim)
        self.head = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.downblocks = nn.ModuleList()
        skips, now = [ch], ch
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                self.downblocks.append(ResBlock(now, ch * mult, tdim, config.dropout, level in config.attn))
                now = ch * mult
                skips.append(now)
            if level != len(config.ch_mult) - 1:
                self.downblocks.append(DownSample(now))
                skips.append(now)
        self.middleblocks = nn.ModuleList(
            [ResBlock(now, now, tdim, config.dropout, attn=True), ResBlock(now, now, tdim, config.dropout, attn=False)]
        )
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.upblocks.append(ResBlock(skips.pop() + now, ch * mult, tdim, config.dropout, level in config.attn))
                now = ch * mult
            if level != 0:
                self.upblocks.append(UpSample(now))
        self.tail = nn.Sequential(nn.GroupNorm(GROUPS, now), Swish(), nn.Conv2d(now, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)


def is_ddpm_state_dict(weights: dict) -> bool:
    """Whether a dict looks like a DDPM UNet state dict (its head and time-embedding table are there)."""
    return isinstance(weights.get("head.weight"), torch.Tensor) and isinstance(
        weights.get("time_embedding.timembedding.0.weight"), torch.Tensor
    )


def infer_config(weights: dict[str, torch.Tensor], dropout: float = 0.0) -> DDPMUNetConfig:
    """The hyper-parameters of a DDPM UNet state dict, read off its tensors (spec: ../shared/formats/ddpm_unet.md).

    ch and in_channels from `head.weight`, T from the embedding table, out_channels from `tail.2.weight`; walking
    `downblocks`: a `main` tensor is a DownSample (ending a level), a ResBlock's width is its `block1.2` output,
    ch_mult the level widths / ch, num_res_blocks the ResBlocks before the first DownSample, attn the levels whose
    ResBlocks own `attn.*` tensors. Raises ValueError when the blocks do not form a DDPM UNet (callers check the
    result by loading with strict=True).
    """
    ch, in_channels = (int(v) for v in weights["head.weight"].shape[:2])
    T = int(weights["time_embedding.timembedding.0.weight"].shape[0])
    out_channels = int(weights["tail.2.weight"].shape[0]) if "tail.2.weight" in weights else in_channels
    indices = sorted({int(m.group(1)) for k in weights if (m := re.match(r"downblocks\.(\d+)\.", k))})
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (width, has attention) of each ResBlock
    for index in indices:
        prefix = f"downblocks.{index}."
        if prefix + "main.weight" in weights:
            levels.append([])
        elif prefix + "block1.2.weight" in weights:
            width = int(weights[prefix + "block1.2.weight"].shape[0])
            levels[-1].append((width, any(k.startswith(prefix + "attn.") for k in weights)))
        else:
            raise ValueError(f"downblocks.{index} is neither a ResBlock nor a DownSample")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"levels with different numbers of ResBlocks ({[len(level) for level in levels]})")
    ch_mult = []
    for level in levels:
        widths = {width for width, _ in level}
        if len(widths) != 1 or next(iter(widths)) % ch:
            raise ValueError(f"a level's ResBlocks have widths {sorted(widths)}, not one multiple of ch={ch}")
        ch_mult.append(next(iter(widths)) // ch)
    attn = [i for i, level in enumerate(levels) if any(has for _, has in level)]
    return DDPMUNetConfig(ch, ch_mult, attn, counts.pop(), dropout, in_channels, out_channels, T)

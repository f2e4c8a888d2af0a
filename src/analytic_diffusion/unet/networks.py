"""The networks `ads train-unet` can train (`training.architecture.network`), built from one UNetConfig.

- `studio`: the hand-written UNet of unet/model.py (every UNetConfig field applies).
- `diffusers`: a diffusers `UNet2DModel` (Ho et al.'s DDPM UNet as diffusers builds it): block_out_channels =
  base_channels * channel_multipliers, layers_per_block = num_res_blocks, Attn blocks at the levels whose side is in
  attention_resolutions, norm_num_groups = norm_groups, dropout, mid-block attention = middle_attention, time
  conditioning scale_shift or default from scale_shift_norm; one attention head. Training exports its EMA weights
  with `save_pretrained` (plus scheduler_config.json), so `UNet2DModel.from_pretrained(<output>)` loads it.
- `ddpm_unet`: the DDPM UNet of pytorch-ddpm / the reference framework's baselines (backbones.ddpm_unet):
  ch = base_channels, ch_mult = channel_multipliers, num_res_blocks, dropout, attn = the levels whose side is in
  attention_resolutions; the rest is fixed by that architecture (32 GroupNorm groups, so base_channels must be a
  multiple of 32, one head, time embedding added before the second norm, attention in the middle). Training exports
  its EMA weights as `ddpm_unet.pt` = {"model_state_dict": ...}, the reference framework's format.
Each is called as network(x_t, t) -> eps and carries `channels` and `resolution`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..backbones.ddpm_unet import GROUPS, DDPMUNet, DDPMUNetConfig
from ..errors import StudioError
from ..fileio import atomic_write, move_into_place
from .model import UNet, UNetConfig, check_architecture
from .schedule import NoiseSchedule

DDPM_FILENAME = "ddpm_unet.pt"  # the ddpm_unet network's export in a training folder

NETWORKS = ("studio", "diffusers", "ddpm_unet")


def _attention_levels(config: UNetConfig, resolution: int) -> list[int]:
    return [i for i in range(len(config.channel_multipliers)) if resolution // 2**i in config.attention_resolutions]


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel (`.unet`) called as network(x_t, t) -> eps."""

    def __init__(self, config: UNetConfig, channels: int, resolution: int):
        super().__init__()
        from diffusers import UNet2DModel

        widths = [config.base_channels * m for m in config.channel_multipliers]
        if any(width % config.norm_groups for width in widths):
            raise StudioError(f"a diffusers UNet needs norm_groups ({config.norm_groups}) to divide every level's "
                              f"width {widths}; change training.architecture.norm_groups")
        if config.attention_heads != 1:
            raise StudioError("training.architecture.network=diffusers trains with one attention head; set "
                              "training.architecture.attention_heads=1")
        attention = _attention_levels(config, resolution)
        self.config, self.channels, self.resolution = config, channels, resolution
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=tuple(widths),
            layers_per_block=config.num_res_blocks, norm_num_groups=config.norm_groups, dropout=config.dropout,
            down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(widths))),
            up_block_types=tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(widths)))),
            add_attention=config.middle_attention, attention_head_dim=None,
            resnet_time_scale_shift="scale_shift" if config.scale_shift_norm else "default",
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t).sample


class TrainableDDPMUNet(DDPMUNet):
    """The DDPM UNet with the `channels` and `resolution` the trainer and the preview need."""

    def __init__(self, config: UNetConfig, channels: int, resolution: int):
        if config.base_channels % GROUPS:
            raise StudioError(f"the DDPM UNet has {GROUPS} GroupNorm groups, so training.architecture.base_channels "
                              f"must be a multiple of {GROUPS}; got {config.base_channels}")
        super().__init__(DDPMUNetConfig(
            ch=config.base_channels, ch_mult=list(config.channel_multipliers), attn=_attention_levels(config, resolution),
            num_res_blocks=config.num_res_blocks, dropout=config.dropout, in_channels=channels, out_channels=channels,
        ))
        self.channels, self.resolution = channels, resolution


def build_unet(config: UNetConfig, channels: int, resolution: int) -> nn.Module:
    """The network `config.network` names, for images of channels x resolution x resolution."""
    if config.network not in NETWORKS:
        raise StudioError(f"training.architecture.network must be one of {', '.join(NETWORKS)}, not '{config.network}'")
    check_architecture(config, channels, resolution)
    if config.network == "diffusers":
        return DiffusersUNet(config, channels, resolution)
    if config.network == "ddpm_unet":
        return TrainableDDPMUNet(config, channels, resolution)
    return UNet(config, channels, resolution)


def export_network(network: nn.Module, folder: Path, schedule: NoiseSchedule) -> None:
    """Write the (EMA) network in its ecosystem's format into a training folder; the studio's own UNet has none.

    diffusers: `save_pretrained` (config.json + weights) and the DDPMScheduler's scheduler_config.json, written into
    a temporary folder and moved into place file by file; ddpm_unet: ddpm_unet.pt = {"model_state_dict": ...}.
    """
    if isinstance(network, DiffusersUNet):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                                  beta_end=schedule.beta_end, beta_schedule="linear", prediction_type="epsilon")
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            network.unet.save_pretrained(staging)
            scheduler.save_pretrained(staging)
            for file in staging.iterdir():
                move_into_place(file, folder / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    elif isinstance(network, TrainableDDPMUNet):
        weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        atomic_write(folder / DDPM_FILENAME, lambda tmp: torch.save({"model_state_dict": weights}, tmp))

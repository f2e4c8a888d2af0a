"""Trained networks as baselines and as a method: checkpoint formats, the DDPM UNet, noise schedules (DESIGN.md §7)."""

from .backbone import Backbone
from .ddpm_unet import DDPMUNet, DDPMUNetConfig, infer_config
from .formats import RECOGNISED, load_backbone
from .schedule import backbone_timestep, linear_alphas_cumprod, timestep_mapping

__all__ = [
    "Backbone",
    "DDPMUNet",
    "DDPMUNetConfig",
    "RECOGNISED",
    "backbone_timestep",
    "infer_config",
    "linear_alphas_cumprod",
    "load_backbone",
    "timestep_mapping",
]

"""A trained DDPM UNet as the baseline every analytic denoiser is compared with: model, checkpoints, schedule.

Training lives in `analytic_diffusion.unet.training` (imported on demand: it depends on the sampler).
"""

from .checkpoint import UNetCheckpoint, checkpoint_path, load_unet, read_checkpoint, save_checkpoint
from .model import UNet, UNetConfig, count_parameters
from .schedule import NoiseSchedule

__all__ = [
    "NoiseSchedule",
    "UNet",
    "UNetCheckpoint",
    "UNetConfig",
    "checkpoint_path",
    "count_parameters",
    "load_unet",
    "read_checkpoint",
    "save_checkpoint",
]

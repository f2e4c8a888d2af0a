"""A tiny UNet (about 5,000 parameters) and toy 8x8 datasets, so that UNet tests run in seconds."""

from __future__ import annotations

import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.unet.model import UNet, UNetConfig
from analytic_diffusion.unet.training import TrainingConfig

TINY = UNetConfig(
    base_channels=4, channel_multipliers=[1, 1], num_res_blocks=1, dropout=0.1, attention_resolutions=[], norm_groups=2
)


def toy_store(count: int = 32, channels: int = 1, size: int = 8, seed: int = 0) -> DatasetStore:
    """`count` random uint8 images: enough structure for a loss to fall, small enough to train in a second."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (4, channels, size, size), generator=generator, dtype=torch.uint8)
    return DatasetStore.from_tensor(base[torch.arange(count) % 4].clone())


def tiny_training(**overrides) -> TrainingConfig:
    values = dict(
        architecture=TINY, epochs=4, batch_size=8, learning_rate=1e-2, warmup_steps=2, ema_decay=0.9,
        checkpoint_every=2, preview_samples=0,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def random_unet(channels: int = 1, size: int = 8, seed: int = 0, config: UNetConfig = TINY) -> UNet:
    """A UNet (tiny by default) whose zero-initialised output layers are randomised, so it predicts non-trivial noise."""
    torch.manual_seed(seed)
    network = UNet(config, channels, size)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if torch.count_nonzero(parameter) == 0 and parameter.ndim > 1:
                parameter.normal_(0, 0.2)
    return network.eval()

"""The UNet, its denoiser adapter and its checkpoints: shapes, the x0 formula, and clear refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from unet_helpers import TINY, random_unet, toy_store

from analytic_diffusion.denoisers import NoiseLevel, denoiser_class
from analytic_diffusion.denoisers.unet import UNetDenoiser, UNetParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.sampling import SchedulerOptions, epsilon_from_x0, make_scheduler
from analytic_diffusion.unet import NoiseSchedule, UNet, UNetCheckpoint, UNetConfig, load_unet, save_checkpoint
from analytic_diffusion.unet.model import timestep_embedding


def _checkpoint(network: UNet, path, architecture=None, **changes) -> None:
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    fields = dict(
        architecture=architecture or network.config,
        image_shape=(network.channels, network.resolution, network.resolution),
        model=weights,
        ema=dict(weights),
    )
    fields.update(changes)
    save_checkpoint(path, UNetCheckpoint(**fields))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("config", "channels", "size"),
    [
        (TINY, 1, 8),
        (UNetConfig(base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=2, attention_resolutions=[14],
                    norm_groups=4, attention_heads=2), 1, 28),
        (UNetConfig(base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=1, attention_resolutions=[8],
                    norm_groups=8, scale_shift_norm=False), 3, 32),
    ],
)
def test_unet_predicts_noise_of_the_input_shape(config, channels, size):
    network = UNet(config, channels, size)
    x = torch.randn(3, channels, size, size)
    assert network(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_fresh_unet_predicts_zero_noise():
    """Output layers start at zero (DDPM), so an untrained network returns exactly eps = 0."""
    network = UNet(TINY, 1, 8)
    assert torch.count_nonzero(network(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))) == 0


@pytest.mark.parametrize("scale_shift_norm", [True, False])
def test_timestep_reaches_the_output_with_one_channel_per_group(scale_shift_norm):
    """A bias added before a one-channel GroupNorm is erased by it: the DDPM form then ignores t, the ADM form does not."""
    config = dataclasses.replace(TINY, norm_groups=64, dropout=0.0, scale_shift_norm=scale_shift_norm)
    network = random_unet(config=config)
    x = torch.randn(1, 1, 8, 8)
    difference = (network(x, torch.tensor([10])) - network(x, torch.tensor([900]))).abs().max()
    assert (difference > 0.01) if scale_shift_norm else (difference < 1e-5)


def test_resolution_must_survive_every_downsampling():
    with pytest.raises(StudioError, match="divisible by 4") as error:
        UNet(UNetConfig(channel_multipliers=[1, 2, 2]), 1, 30)
    _one_line(error)


def test_timestep_embedding_separates_timesteps():
    embedding = timestep_embedding(torch.arange(1000), 64)
    assert embedding.shape == (1000, 64)
    assert torch.cdist(embedding, embedding).add(torch.eye(1000)).min() > 1e-3


def test_training_schedule_is_the_samplers():
    scheduler = make_scheduler(SchedulerOptions())
    assert torch.equal(NoiseSchedule().alphas_cumprod(), scheduler.alphas_cumprod)


def test_denoiser_turns_predicted_noise_into_x0():
    network = random_unet()
    denoiser = UNetDenoiser().use_network(network, NoiseSchedule())
    ab = NoiseSchedule().alphas_cumprod()
    x_t = torch.randn(4, 1, 8, 8)
    for t in (0, 321, 999):
        eps = network(x_t, torch.full((4,), t))
        expected = (x_t - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        x0_hat = denoiser(x_t, NoiseLevel(t, float(ab[t]))).x0_hat
        torch.testing.assert_close(x0_hat, expected)
        # the sampler recovers the network's noise from x0_hat
        torch.testing.assert_close(epsilon_from_x0(x_t, x0_hat, ab[t]), eps, atol=1e-4, rtol=1e-4)


def test_denoiser_hands_another_noise_level_to_the_timestep_with_the_nearest_alpha_bar():
    """A level off the UNet's training schedule is no longer refused: it goes to the timestep of the same ab_t."""
    network = random_unet()
    denoiser = UNetDenoiser().use_network(network, NoiseSchedule())
    ab = NoiseSchedule().alphas_cumprod()
    nearest = int((ab - 0.5).abs().argmin())
    x_t = torch.randn(1, 1, 8, 8)
    expected = (x_t - 0.5**0.5 * network(x_t, torch.tensor([nearest]))) / 0.5**0.5
    torch.testing.assert_close(denoiser(x_t, NoiseLevel(100, 0.5)).x0_hat, expected)


def test_denoiser_is_registered_and_loads_ema_weights(tmp_path):
    raw, ema = random_unet(seed=1), random_unet(seed=2)
    _checkpoint(raw, tmp_path / "checkpoint.pt", ema={k: v.clone() for k, v in ema.state_dict().items()})
    assert denoiser_class("unet") is UNetDenoiser
    store = toy_store()
    x_t = torch.randn(2, 1, 8, 8)
    level = NoiseLevel(500, float(NoiseSchedule().alphas_cumprod()[500]))
    for use_ema, network in ((True, ema), (False, raw)):
        denoiser = UNetDenoiser(UNetParams(checkpoint=str(tmp_path), use_ema=use_ema)).fit(store)  # a folder works too
        expected = UNetDenoiser().use_network(network, NoiseSchedule())(x_t, level).x0_hat
        torch.testing.assert_close(denoiser(x_t, level).x0_hat, expected)


def test_denoiser_without_checkpoint_says_what_to_set():
    with pytest.raises(StudioError, match="model.params.checkpoint"):
        UNetDenoiser().fit(toy_store())


def test_missing_checkpoint_says_how_to_train_one(tmp_path):
    with pytest.raises(StudioError, match="not found.*train-unet") as error:
        load_unet(tmp_path / "nope.pt")
    _one_line(error)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint_gives_one_line_error(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    _checkpoint(random_unet(), path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a checkpoint at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(StudioError, match="corrupt") as error:
        load_unet(path)
    _one_line(error)


def test_foreign_file_is_not_taken_for_a_checkpoint(tmp_path):
    torch.save({"state_dict": random_unet().state_dict()}, tmp_path / "other.pt")
    with pytest.raises(StudioError, match="not a UNet checkpoint"):
        load_unet(tmp_path / "other.pt")


def test_weights_of_another_architecture_are_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    wider = dataclasses.replace(TINY, base_channels=8)
    _checkpoint(random_unet(), path, architecture=wider)
    with pytest.raises(StudioError, match=r"mismatched tensors time_mlp\.0\.weight \(checkpoint \[16, 4\], model \[32, 8\]\).*\(\+\d+ more\)") as error:
        load_unet(path)
    _one_line(error)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    weights = dict(random_unet().state_dict())
    del weights["conv_out.bias"]
    weights["extra.weight"] = torch.zeros(1)
    _checkpoint(random_unet(), path, ema=weights)
    with pytest.raises(StudioError, match=r"missing tensors conv_out\.bias; unexpected tensors extra\.weight") as error:
        load_unet(path)
    _one_line(error)
    load_unet(path, use_ema=False)  # the raw weights are intact


def test_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    weights = {k: v.clone() for k, v in random_unet().state_dict().items()}
    weights["conv_in.weight"][0, 0, 0, 0] = float("nan")
    _checkpoint(random_unet(), path, ema=weights)
    with pytest.raises(StudioError, match=r"non-finite weights in conv_in\.weight"):
        load_unet(path)


def test_checkpoint_of_another_resolution_or_channels_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _checkpoint(random_unet(), path)
    with pytest.raises(StudioError, match="trained on 1x8x8 images .* dataset gives 3x8x8") as error:
        UNetDenoiser(UNetParams(checkpoint=str(path))).fit(toy_store(channels=3))
    _one_line(error)
    with pytest.raises(StudioError, match="dataset gives 1x16x16"):
        load_unet(path, image_shape=(1, 16, 16))

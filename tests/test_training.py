"""UNet training: the loss falls, a killed run resumes with bit-identical losses, files are written, bad resumes are refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from unet_helpers import TINY, tiny_training, toy_store

from analytic_diffusion.errors import StudioError
from analytic_diffusion.unet import NoiseSchedule, load_unet, read_checkpoint
from analytic_diffusion.unet.training import learning_rate, min_snr_loss, train

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = sys.argv[1:3]
    from unet_helpers import tiny_training, toy_store
    from analytic_diffusion.unet.training import learning_rate, train

    def kill(step):
        if step == 11:  # in the third epoch, after the checkpoint of epoch 2 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGKILL)

    train(tiny_training(), toy_store(), sys.argv[3], progress_bar=False, on_step=kill)
    """
)


def test_killed_run_resumes_with_identical_losses(tmp_path):
    uninterrupted = train(tiny_training(), toy_store(), tmp_path / "whole", progress_bar=False)
    assert uninterrupted.steps == 16 and len(uninterrupted.losses) == 16

    killed = tmp_path / "killed"
    tests_dir, src_dir = str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")
    process = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, tests_dir, src_dir, str(killed)],
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # same float reduction order
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == -9, process.stderr
    assert read_checkpoint(killed).training["epoch"] == 2

    resumed = train(tiny_training(), toy_store(), killed, progress_bar=False)
    assert resumed.losses == uninterrupted.losses  # bit for bit, including the 8 steps replayed after the kill
    assert resumed.epoch_losses == uninterrupted.epoch_losses
    for use_ema in (True, False):
        whole = load_unet(tmp_path / "whole", use_ema=use_ema)[0].state_dict()
        again = load_unet(killed, use_ema=use_ema)[0].state_dict()
        assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_loss_falls_and_outputs_are_written(tmp_path):
    result = train(tiny_training(epochs=6, preview_samples=4, preview_steps=3), toy_store(), tmp_path, progress_bar=False)
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    for name in ("checkpoint.pt", "loss.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:4] in (b"\x89PNG", b"PK\x03\x04"), name
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["epochs"] == 6 and summary["steps"] == 24 and summary["parameters"] == result.parameters
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.image_shape == (1, 8, 8) and checkpoint.architecture == TINY
    assert checkpoint.dataset["fingerprint"] == toy_store().fingerprint


def test_cosine_schedule_warms_up_then_anneals_to_zero():
    config = tiny_training(learning_rate=1.0, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(config, 0, 100) == pytest.approx(0.1 * 1.0)
    assert learning_rate(config, 50, 100) == pytest.approx(0.5)
    assert learning_rate(config, 100, 100) == pytest.approx(0.0)
    assert learning_rate(dataclasses.replace(config, lr_schedule="constant"), 100, 100) == 1.0


def test_killed_cosine_run_resumes_with_identical_losses(tmp_path):
    """The schedule is a function of the step, so a resumed annealed run matches an uninterrupted one."""
    config = tiny_training(lr_schedule="cosine")
    whole = train(config, toy_store(), tmp_path / "whole", progress_bar=False)

    def interrupt(step):
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, toy_store(), tmp_path / "cut", progress_bar=False, on_step=interrupt)
    assert train(config, toy_store(), tmp_path / "cut", progress_bar=False).losses == whole.losses


def test_finished_run_trains_further_when_epochs_grow(tmp_path):
    train(tiny_training(epochs=2), toy_store(), tmp_path, progress_bar=False)
    longer = train(tiny_training(epochs=4), toy_store(), tmp_path, progress_bar=False)
    assert longer.losses == train(tiny_training(), toy_store(), tmp_path / "direct", progress_bar=False).losses


def test_resume_refuses_another_architecture_or_dataset(tmp_path):
    train(tiny_training(epochs=2), toy_store(), tmp_path, progress_bar=False)
    wider = tiny_training(architecture=dataclasses.replace(TINY, base_channels=8))
    with pytest.raises(StudioError, match=r"another architecture: base_channels=4 \(config: 8\)"):
        train(wider, toy_store(), tmp_path, progress_bar=False)
    with pytest.raises(StudioError, match="was trained on dataset"):
        train(tiny_training(), toy_store(seed=1), tmp_path, progress_bar=False)
    with pytest.raises(StudioError, match="resume is false"):
        train(tiny_training(resume=False), toy_store(), tmp_path, progress_bar=False)


@pytest.mark.parametrize(("key", "value"), [("epochs", 0), ("learning_rate", 0.0), ("mixed_precision", "fp8"), ("lr_schedule", "linear"), ("loss_weighting", "snr"), ("min_snr_gamma", 0.0)])
def test_bad_training_values_are_refused(tmp_path, key, value):
    with pytest.raises(StudioError, match=key):
        train(tiny_training(**{key: value}), toy_store(), tmp_path, progress_bar=False)


def test_min_snr_loss_weights_each_sample_by_min_snr_over_snr():
    prediction, eps = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    alpha_bar = torch.tensor([0.5, 0.9])  # SNR 1 (kept whole) and 9 (weighted 5 / 9)
    assert min_snr_loss(prediction, eps, alpha_bar, gamma=5.0).item() == pytest.approx((1.0 + 4.0 * 5 / 9) / 2)
    assert min_snr_loss(prediction, eps, alpha_bar, gamma=100.0).item() == pytest.approx(((prediction - eps) ** 2).mean().item())


def test_min_snr_training_records_the_unweighted_loss(tmp_path):
    uniform = train(tiny_training(epochs=1), toy_store(), tmp_path / "uniform", progress_bar=False)
    weighted = train(tiny_training(epochs=1, loss_weighting="min_snr"), toy_store(), tmp_path / "min_snr", progress_bar=False)
    assert weighted.losses[0] == uniform.losses[0]  # same weights and batch at step 1: the same eps MSE is recorded
    assert weighted.losses[1:] != uniform.losses[1:]  # but the weighted objective took a different step


def test_train_unet_command_trains_and_resumes(tmp_path, capsys):
    from analytic_diffusion.cli import main

    tiny = ["experiment.device=cpu", "dataset.subset_size=64", "training.batch_size=32", "training.epochs=1",
            "training.architecture.base_channels=4", "training.architecture.channel_multipliers=[1,1]",
            "training.architecture.num_res_blocks=1", "training.architecture.norm_groups=2",
            "training.architecture.attention_resolutions=[]", "training.preview_samples=4", "training.preview_steps=2",
            f"training.output_dir={tmp_path}"]
    assert main(["train-unet", *tiny]) == 0
    assert "for 1 epoch (2 steps" in capsys.readouterr().out
    assert {"checkpoint.pt", "config.yaml", "loss.png", "samples.png", "training.json"} <= {p.name for p in tmp_path.iterdir()}
    assert main(["train-unet", *tiny, "training.epochs=2"]) == 0  # resumes, trains one more epoch
    assert "for 2 epochs (4 steps" in capsys.readouterr().out
    assert main(["train-unet", *tiny, "training.architecture.base_chanels=8"]) == 2
    assert "did you mean 'training.architecture.base_channels'" in capsys.readouterr().err


ECOSYSTEM = {
    "diffusers": dataclasses.replace(TINY, network="diffusers", middle_attention=False),
    "ddpm_unet": dataclasses.replace(TINY, network="ddpm_unet", base_channels=32),
}


@pytest.mark.parametrize("network", ["diffusers", "ddpm_unet"])
def test_ecosystem_networks_train_resume_exactly_and_export_loadable_models(tmp_path, network):
    """training.architecture.network=diffusers|ddpm_unet: resuming continues bit for bit, and the exported EMA
    network (a diffusers folder that UNet2DModel.from_pretrained reads / a reference-format ddpm_unet.pt) gives the
    same eps as the checkpoint's EMA weights, through the studio's loader too."""
    from analytic_diffusion.backbones import load_backbone

    config = tiny_training(architecture=ECOSYSTEM[network], epochs=2, batch_size=16)
    train(dataclasses.replace(config, epochs=1, checkpoint_every=1), toy_store(), tmp_path / "resumed",
          progress_bar=False)
    resumed = train(config, toy_store(), tmp_path / "resumed", progress_bar=False)
    assert resumed.losses == train(config, toy_store(), tmp_path, progress_bar=False).losses

    ema = load_unet(tmp_path)[0]
    x_t, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    with torch.no_grad():
        expected = ema(x_t, t)
        if network == "diffusers":
            from diffusers import DDPMScheduler, UNet2DModel

            exported = UNet2DModel.from_pretrained(tmp_path)  # a plain diffusers session
            torch.testing.assert_close(exported(x_t, t).sample, expected, atol=1e-6, rtol=0)
            scheduler = DDPMScheduler.from_pretrained(tmp_path)
            assert torch.equal(scheduler.alphas_cumprod, NoiseSchedule().alphas_cumprod())
            # the exported files are as readable as any other new file (safetensors writes its weights 0600)
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.is_file()}
            assert modes["diffusion_pytorch_model.safetensors"] == modes["config.json"] == modes["checkpoint.pt"]
        else:
            backbone = load_backbone(tmp_path / "ddpm_unet.pt")
            assert backbone.format == "ddpm_unet" and backbone.architecture["ch"] == 32
            torch.testing.assert_close(backbone.network(x_t, t), expected, atol=1e-6, rtol=0)
        studio = load_backbone(tmp_path)  # the training folder itself: its checkpoint, EMA weights
        assert studio.format == "studio" and studio.architecture["network"] == network
        torch.testing.assert_close(studio.network(x_t, t), expected, atol=1e-6, rtol=0)


def test_unknown_network_is_refused():
    with pytest.raises(StudioError, match="network must be one of studio, diffusers, ddpm_unet"):
        train(tiny_training(architecture=dataclasses.replace(TINY, network="resnet")), toy_store(), "unused")

"""Every backbone format loads through one loader and gives exactly the network's own eps; hyper-parameters are
read off the tensors; the DDPM UNet has the published parameter names; bad files are one line and no run directory;
a backbone on another noise schedule is sampled through the alpha_bar mapping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unet_helpers import TINY, random_unet, toy_store

from analytic_diffusion.backbones import DDPMUNet, DDPMUNetConfig, RECOGNISED, infer_config, load_backbone
from analytic_diffusion.backbones.schedule import linear_alphas_cumprod, timestep_mapping
from analytic_diffusion.cli import main
from analytic_diffusion.denoisers import NoiseLevel
from analytic_diffusion.denoisers.unet import UNetDenoiser, UNetParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level, sample
from analytic_diffusion.unet import NoiseSchedule, UNetCheckpoint, save_checkpoint

DATA = Path(__file__).parent / "data"
# GroupNorm has 32 groups in this architecture, so ch = 32 is the narrowest DDPM UNet there is.
GREY_28 = DDPMUNetConfig(ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1, in_channels=1, out_channels=1)
RGB_32 = DDPMUNetConfig(ch=32, ch_mult=[1, 1, 2], attn=[], num_res_blocks=2, dropout=0.1, in_channels=3, out_channels=3)


def _ddpm(config: DDPMUNetConfig, seed: int = 0) -> DDPMUNet:
    torch.manual_seed(seed)
    return DDPMUNet(config).eval()


def _weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def _inputs(channels: int, size: int, seed: int = 3) -> tuple[torch.Tensor, int, NoiseLevel]:
    x_t = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = 420
    return x_t, t, NoiseLevel(t, float(linear_alphas_cumprod()[t]))


def _assert_same_eps(path, network, channels, size, use_ema=True, call=None):
    """The studio's eps (and x0_hat) through the loader equal the network's own output for the same input."""
    denoiser = UNetDenoiser(UNetParams(str(path), use_ema)).fit(toy_store(count=4, channels=channels, size=size))
    x_t, t, level = _inputs(channels, size)
    with torch.no_grad():
        own = (call or network)(x_t, torch.full((2,), t))
    assert (denoiser.backbone.eps(x_t, t) - own).abs().max() <= 1e-6
    expected = (x_t - level.noise_variance**0.5 * own) / level.signal_scale
    assert (denoiser(x_t, level).x0_hat - expected).abs().max() <= 1e-6
    assert not denoiser.backbone.network.training
    return denoiser.backbone


@pytest.mark.parametrize("size", ["28px", "32px"])
def test_ddpm_unet_has_the_published_parameter_names_and_shapes(size):
    """The key lists of ../shared/formats/ (copied to tests/data/): names, order and shapes, strict."""
    lines = [line.split("\t") for line in (DATA / f"ddpm_unet_keys_{size}.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    config = (DDPMUNetConfig(64, [1, 2, 2], [], 2, 0.15, 1, 1) if size == "28px"
              else DDPMUNetConfig(128, [1, 2, 3, 4], [], 2, 0.15, 3, 3))
    with torch.device("meta"):
        weights = DDPMUNet(config).state_dict()
    assert [(k, list(v.shape)) for k, v in weights.items()] == [(k, eval(shape)) for k, shape in lines]
    inferred = infer_config(weights)
    assert (inferred.ch, inferred.ch_mult, inferred.attn, inferred.num_res_blocks, inferred.in_channels) == (
        config.ch, config.ch_mult, config.attn, config.num_res_blocks, config.in_channels)


GOLDEN_CONFIG = {"T": 1000, "ch": 32, "ch_mult": [1, 2], "attn": [0, 1], "num_res_blocks": 1}  # attention at 16 and 8 px


def seeded_ddpm_weights(template: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for a DDPM UNet state dict drawn from one seeded generator in sorted key order (the fixed sinusoidal
    table kept): the same numbers for pytorch-ddpm's model and the studio's, whoever builds them."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(template):
        tensor = template[key]
        if key.endswith("timembedding.0.weight"):
            weights[key] = tensor.clone()
        elif tensor.dim() > 1:
            weights[key] = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
        else:
            weights[key] = 0.1 * torch.randn(tensor.shape, generator=generator) + key.endswith("norm.weight")
    return weights


def test_ddpm_unet_gives_pytorch_ddpms_own_eps():
    """An independent oracle: tests/data/pytorch_ddpm_eps.pt holds the eps that pytorch-ddpm's own model.py
    (w86763777/pytorch-ddpm at f804ccb, run outside this project) computed for these seeded weights; the studio's
    network must reproduce them (bit for bit on the machine that wrote them; 1e-5 allows other CPUs' kernels)."""
    golden = torch.load(DATA / "pytorch_ddpm_eps.pt")
    network = DDPMUNet(DDPMUNetConfig(**GOLDEN_CONFIG, dropout=0.0)).eval()
    network.load_state_dict(seeded_ddpm_weights(network.state_dict()))
    with torch.no_grad():
        eps = network(golden["x"], golden["t"])
    assert eps.abs().max() > 0.1  # not a degenerate network
    torch.testing.assert_close(eps, golden["eps"], rtol=0, atol=1e-5)


def test_time_embedding_rows_interleave_sine_and_cosine():
    table = _ddpm(GREY_28).state_dict()["time_embedding.timembedding.0.weight"]
    f1 = torch.exp(torch.tensor(-(2 / 32) * 9.210340371976184))  # ln 10000
    seven = torch.tensor(7.0)
    torch.testing.assert_close(table[7, :4], torch.stack([seven.sin(), seven.cos(), (7 * f1).sin(), (7 * f1).cos()]))


@pytest.mark.parametrize(("config", "size", "wrapped"), [(GREY_28, 28, False), (RGB_32, 32, True)])
def test_reference_state_dict_loads_with_every_hyper_parameter_inferred(tmp_path, config, size, wrapped):
    network = _ddpm(config)
    path = tmp_path / "baseline.pt"
    torch.save({"model_state_dict": _weights(network)} if wrapped else _weights(network), path)
    backbone = _assert_same_eps(path, network, config.in_channels, size)
    assert backbone.format == "ddpm_unet" and backbone.resolution is None
    assert backbone.architecture == {**vars(config), "dropout": 0.0}  # dropout is not in the tensors (and is off)
    assert torch.equal(backbone.alphas_cumprod, NoiseSchedule().alphas_cumprod())


def test_pytorch_ddpm_checkpoint_uses_ema_weights_unless_told(tmp_path):
    raw, ema = _ddpm(GREY_28, seed=1), _ddpm(GREY_28, seed=2)
    parallel = {f"module.{k}": v for k, v in _weights(ema).items()}  # saved from nn.DataParallel
    for name, ema_weights in (("plain.pt", _weights(ema)), ("parallel.pt", parallel)):
        torch.save({"net_model": _weights(raw), "ema_model": ema_weights, "optim": {"state": {}, "param_groups": []},
                    "step": 10, "x_T": torch.randn(2, 1, 28, 28)}, tmp_path / name)
        backbone = _assert_same_eps(tmp_path / name, ema, 1, 28)
        assert backbone.format == "pytorch_ddpm" and backbone.weights == "ema"
    backbone = _assert_same_eps(tmp_path / "plain.pt", raw, 1, 28, use_ema=False)
    assert backbone.weights == "raw" and backbone.architecture["attn"] == [1]


def _diffusers_unet(channels: int = 1, size: int = 28):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def test_diffusers_model_folder_loads_with_diffusers_itself(tmp_path):
    unet = _diffusers_unet()
    unet.save_pretrained(tmp_path / "flat")
    backbone = _assert_same_eps(tmp_path / "flat", unet, 1, 28, call=lambda x, t: unet(x, t).sample)
    assert backbone.format == "diffusers" and backbone.resolution == 28
    assert backbone.architecture["block_out_channels"] == [16, 32] and "assumed" in backbone.schedule_source


def test_loading_a_diffusers_folder_prints_nothing_in_a_fresh_process(tmp_path):
    """diffusers' default low_cpu_mem_usage=True prints a multi-line 'pip install accelerate' notice when accelerate
    is missing (once per process, so only a fresh process shows it)."""
    _diffusers_unet().save_pretrained(tmp_path / "flat")
    code = f"from analytic_diffusion.backbones import load_backbone; load_backbone({str(tmp_path / 'flat')!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "accelerate" not in done.stderr, done.stderr


def _cosine_pipeline(folder: Path):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = _diffusers_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)
    return unet


def test_diffusers_pipeline_folder_brings_its_scheduler(tmp_path):
    from diffusers import DDPMScheduler

    unet = _cosine_pipeline(tmp_path / "pipeline")
    denoiser = UNetDenoiser(UNetParams(str(tmp_path / "pipeline"))).fit(toy_store(count=4, size=28))
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.equal(denoiser.backbone.alphas_cumprod, cosine)
    x_t, _, _ = _inputs(1, 28)
    with torch.no_grad():
        assert (denoiser.backbone.eps(x_t, 420) - unet(x_t, torch.full((2,), 420)).sample).abs().max() <= 1e-6


def test_the_studios_own_checkpoint_loads(tmp_path):
    raw, ema = random_unet(seed=1), random_unet(seed=2)
    save_checkpoint(tmp_path / "checkpoint.pt", UNetCheckpoint(TINY, (1, 8, 8), _weights(raw), _weights(ema)))
    backbone = _assert_same_eps(tmp_path, ema, 1, 8)
    assert backbone.format == "studio" and backbone.resolution == 8
    _assert_same_eps(tmp_path / "checkpoint.pt", raw, 1, 8, use_ema=False)


def test_cosine_backbone_is_sampled_through_the_alpha_bar_mapping(tmp_path):
    """Each sampler level reaches the backbone at the timestep with the nearest alpha_bar, and the x_t it gets is at
    that alpha_bar: an oracle that knows x_0 and trusts the timestep it is told recovers x_0 closely, and would not
    if it were told the sampler's own timestep."""
    from diffusers import DDPMScheduler

    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    linear = linear_alphas_cumprod()
    x0 = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    told: list[int] = []

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t):
            told.append(int(t[0]))
            ab = cosine[t].view(-1, 1, 1, 1)
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    _cosine_pipeline(tmp_path / "pipeline")
    denoiser = UNetDenoiser(UNetParams(str(tmp_path / "pipeline"))).fit(toy_store(count=4, size=28))
    denoiser.backbone.network = Oracle()
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=10))
    steps = []
    sample(denoiser, scheduler, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)),
           callback=steps.append)
    expected = [int((cosine.double() - float(linear[t])).abs().argmin()) for t in scheduler.timesteps.tolist()]
    assert told == expected and told != scheduler.timesteps.tolist()
    assert told[:2] == [988, 974]  # the cosine schedule keeps more signal: linear's ab at 900, 800 comes later on it
    # the table is Nichol & Dhariwal's closed form ab(t) = f(t + 1) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2
    f = lambda t: torch.cos((torch.tensor(t, dtype=torch.float64) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    torch.testing.assert_close(cosine[told].double(), f([t + 1 for t in told]) / f(0), rtol=1e-5, atol=1e-7)
    for step in steps:
        assert abs(float(cosine[told[step.index]]) - float(linear[step.timestep])) < 2e-3
        assert (step.x0_hat - x0).abs().max() < 0.05
    # told the sampler's own timestep instead, the same oracle is far off: the mapping is what makes x_t fit
    x_t, t = steps[2].x_t, steps[2].timestep
    wrong = (x_t - (1 - linear[t]).sqrt() * Oracle()(x_t, torch.full((3,), t))) / linear[t].sqrt()
    assert (wrong - x0).abs().max() > 0.2
    record = timestep_mapping(cosine, [(t, noise_level(scheduler, t).alpha_bar) for t in scheduler.timesteps.tolist()])
    assert record["backbone_timesteps"] == expected and record["same_as_sampler"] is False
    same = timestep_mapping(linear, [(t, float(linear[t])) for t in (900, 0)])
    assert same["same_as_sampler"] and same["backbone_timesteps"] == [900, 0]


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    good = _weights(_ddpm(GREY_28))
    (folder / "corrupt.pt").write_bytes(b"\x80\x02 this is not a checkpoint" * 20)
    torch.save(good, folder / "whole.pt")
    (folder / "truncated.pt").write_bytes((folder / "whole.pt").read_bytes()[:5000])
    torch.save({"weights": good, "epoch": 3}, folder / "unknown.pt")
    torch.save(torch.nn.Linear(2, 2), folder / "module.pt")
    incomplete = dict(good)
    incomplete.pop("tail.2.weight")
    incomplete.pop("upblocks.0.block1.2.weight")
    torch.save(incomplete, folder / "incomplete.pt")
    (folder / "empty_folder").mkdir()
    (folder / "empty_folder" / "notes.txt").write_text("no model here")
    return {
        "corrupt": (folder / "corrupt.pt", "cannot read"),
        "truncated": (folder / "truncated.pt", "cannot read"),
        "unknown dict": (folder / "unknown.pt", "unknown kind (keys weights, epoch)"),
        "pickled module": (folder / "module.pt", "pickled module"),
        "incomplete": (folder / "incomplete.pt", "not a complete DDPM UNet"),
        "folder without config": (folder / "empty_folder", "holds no model config"),
    }


def test_every_bad_file_is_one_line_naming_the_formats(tmp_path):
    for kind, (path, phrase) in _bad_files(tmp_path).items():
        with pytest.raises(StudioError) as error:
            load_backbone(path)
        message = str(error.value)
        assert "\n" not in message and phrase in message, (kind, message)
        if kind != "incomplete":
            assert RECOGNISED in message, kind


def test_bad_backbones_stop_generate_before_the_run_directory(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "digits.npy", np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    fast = ["experiment.device=cpu", "sampling.num_inference_steps=2", "sampling.num_samples=2",
            "dataset.name=array", f"dataset.path={tmp_path / 'digits.npy'}"]
    cases = list(_bad_files(tmp_path).values())
    rgb = tmp_path / "rgb.pt"
    torch.save(_weights(_ddpm(RGB_32)), rgb)
    cases.append((rgb, "takes 3-channel images but the dataset gives 1x28x28"))
    _diffusers_unet(size=32).save_pretrained(tmp_path / "big")
    cases.append((tmp_path / "big", "trained on 1x32x32 images"))
    runs = tmp_path / "runs"
    # every case as the baseline; the unet method's checkpoint goes through the same check (two cases suffice)
    for key, method, some in (("baseline.checkpoint", "nearest_dataset/mnist5k", cases),
                              ("model.params.checkpoint", "unet/mnist5k", cases[-3:-1])):
        for path, phrase in some:
            assert main(["generate", "-c", method, *fast, f"paths.runs={runs}", f"{key}={path}"]) == 2
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error:")]  # warnings may precede it
            assert len(errors) == 1 and phrase in errors[0] and "Traceback" not in err, (key, path, err)
            assert not runs.exists()


def test_generate_against_a_reference_file_and_a_diffusers_folder_end_to_end(tmp_path, capsys):
    """`ads generate -c optimal/mnist5k baseline.checkpoint=...` with a DDPM-UNet file and a diffusers pipeline on
    the cosine schedule: all five metrics per step and sample, and the timestep mapping, in metrics.json."""
    import json

    from analytic_diffusion.compare import METRICS

    torch.save({"model_state_dict": _weights(_ddpm(GREY_28))}, tmp_path / "ddpm.pt")
    _cosine_pipeline(tmp_path / "pipeline")
    fast = ["experiment.device=cpu", "sampling.num_inference_steps=3", "dataset.subset_size=300",
            "sampling.num_samples=3", "sampling.batch_size=2", f"paths.runs={tmp_path / 'runs'}"]
    for path, kind in ((tmp_path / "ddpm.pt", "ddpm_unet"), (tmp_path / "pipeline", "diffusers")):
        assert main(["generate", "-c", "optimal/mnist5k", *fast, f"baseline.checkpoint={path}"]) == 0
        out = capsys.readouterr().out
        [metrics_file] = sorted((tmp_path / "runs").glob("*/*/metrics.json"), key=lambda p: p.stat().st_mtime)[-1:]
        baseline = json.loads(metrics_file.read_text())["baseline"]
        # the summary says the baseline's time is apart from the method's sampling time, and how much it was
        assert "pearson_r" in out and f"the baseline took {baseline['seconds']:.2f} s more (not in the sampling" in out
        assert baseline["backbone"]["format"] == kind and baseline["timesteps"] == [666, 333, 0]
        for name in METRICS:
            per_step = baseline["per_step"][name]
            assert len(per_step["mean"]) == len(per_step["median"]) == 3 and len(per_step["per_sample"][2]) == 3
            assert all(v is not None for row in per_step["per_sample"] for v in row), name
        schedule = baseline["schedule"]
        if kind == "ddpm_unet":
            assert schedule["same_as_sampler"] and schedule["backbone_timesteps"] == [666, 333, 0]
        else:
            assert not schedule["same_as_sampler"] and schedule["backbone_timesteps"][0] > 666
        assert (metrics_file.parent / "comparison.png").is_file()

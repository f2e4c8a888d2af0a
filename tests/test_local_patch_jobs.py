"""The local patch methods inside the jobs: generate's diagnostics and mosaic figure, and `ads calibrate` (the
patch size per step fitted along the network's own trajectory at exactly the sampling timesteps)."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from unet_helpers import TINY, random_unet

from analytic_diffusion.calibrate import calibrate, choose_sizes
from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config
from analytic_diffusion.metrics.agreement import eps_cosine
from analytic_diffusion.data.store import DatasetStore, StoreRequest, load_or_build_store
from analytic_diffusion.denoisers import denoiser_class
from analytic_diffusion.denoisers.unet import UNetDenoiser, UNetParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.figures import pyplot
from analytic_diffusion.generate import generate
from analytic_diffusion.noise import batch_noise_sources
from analytic_diffusion.patch_images import draw_patch_figure
from analytic_diffusion.sampling import SchedulerOptions, epsilon_from_x0, make_scheduler, noise_level, sample
from analytic_diffusion.unet import UNetCheckpoint, save_checkpoint

FAST = ["experiment.device=cpu", "dataset.subset_size=12", "dataset.resolution=8", "sampling.num_inference_steps=2",
        "sampling.num_samples=3", "sampling.batch_size=2"]


def _checkpoint(folder) -> str:
    weights = {k: v.clone() for k, v in random_unet(size=8).state_dict().items()}
    save_checkpoint(folder / "checkpoint.pt", UNetCheckpoint(TINY, (1, 8, 8), weights, dict(weights)))
    return str(folder)


def test_generate_records_patch_sizes_per_step_and_draws_the_mosaic():
    result = generate(load_config("els/mnist5k", [*FAST, "model.params.patch_size=[7,3]"]))
    metrics = result.metrics
    assert [step["diagnostics"]["patch_size"] for step in metrics["steps"]] == [[7] * 3, [3] * 3]
    for step in metrics["steps"]:
        effective = step["diagnostics"]["effective_patches"]
        assert len(effective) == 3 and all(1 <= e <= 12 * 6 * 6 for e in effective)
    assert (result.run_dir / "patches.png").read_bytes()[:4] == b"\x89PNG"
    drawn = metrics["top_patches"]
    assert drawn["timestep"] == 0 and all(0 <= p["train_index"] < 12 for p in drawn["patches"])


def test_the_mosaic_draws_without_warnings_and_each_rows_titles_clear_the_row_above(tmp_path):
    """Two rows of 16 x 16 RGB images: tight_layout let the second row's titles overlap the first row's images,
    and imshow of a tensor made numpy 2 warn about copy=False."""
    g = torch.Generator().manual_seed(0)
    store = DatasetStore.from_tensor(torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8))
    cls = denoiser_class("local_score")
    denoiser = cls(cls.Params(patch_size=5)).fit(store)
    level = noise_level(make_scheduler(SchedulerOptions()), 0)
    x_t = torch.randn(2, 3, 16, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure, drawn = draw_patch_figure(denoiser, x_t, denoiser(x_t, level).x0_hat, level)
        figure.savefig(tmp_path / "patches.png", format="png", dpi=110)
    renderer = figure.canvas.get_renderer()
    columns = len(figure.axes) // 2  # two rows: the sample, then one panel per pixel
    first, second = figure.axes[:columns], figure.axes[columns : 2 * columns]
    lowest = min(axis.get_window_extent(renderer).y0 for axis in first)
    assert all(axis.title.get_window_extent(renderer).y1 <= lowest for axis in second)
    pyplot().close(figure)


def test_a_list_of_the_wrong_length_stops_generate_before_the_store_and_the_run_directory(fresh_root, capsys):
    assert main(["generate", "-c", "els/mnist5k", *FAST, "model.params.patch_size=[3,5,7]"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "one size per step" in error
    assert not (fresh_root / "runs").exists() and not (fresh_root / "cache").exists()  # no store built either


def test_the_configs_list_of_sizes_with_another_step_count_says_what_to_give(fresh_root, capsys):
    """els/mnist5k lists 10 sizes, one per step: another sampling.num_inference_steps is refused with the three
    ways out, as overrides."""
    small = ["experiment.device=cpu", "dataset.subset_size=12", "dataset.resolution=8"]
    assert main(["generate", "-c", "els/mnist5k", *small, "sampling.num_inference_steps=5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: model.params.patch_size lists 10 sizes but sampling has 5 steps")
    for way in ("model.params.patch_size=[...] with 5 odd sizes", "model.params.patch_size=<odd int>",
                "model.params.patch_size=<run>/calibration.json from `ads calibrate`"):
        assert way in error
    assert not (fresh_root / "runs").exists()
    with pytest.raises(StudioError, match=r"=\[\.\.\.\] with 3 sizes\), a single size \(model.params.patch_size=<int>\)"):
        denoiser_class("pspc").Params(patch_size=[2, 4]).sizes_for([900, 500, 0])


def test_calibration_scores_every_candidate_at_the_networks_own_x_t(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    overrides = [*FAST, f"baseline.checkpoint={checkpoint}", "calibration.num_seeds=3", "calibration.candidates=[3,5,7]"]
    cfg = load_config("els/mnist5k", overrides)
    result = calibrate(cfg)
    saved = json.loads((result.run_dir / "calibration.json").read_text())
    assert saved["timesteps"] == [500, 0] == make_scheduler(cfg.sampling).timesteps.tolist()
    assert saved["candidates"] == [3, 5, 7] and all(k in (3, 5, 7) for k in saved["patch_size"])
    assert (result.run_dir / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    # recompute the table: the network's own trajectory, the method answering the network's x_t
    method_cls = denoiser_class("els")
    store, _ = load_or_build_store(StoreRequest(**asdict(cfg.dataset)), Path(cfg.paths.datasets), Path(cfg.paths.cache))
    method = method_cls(cfg.model.params).fit(store)  # boundary as configured; sizes set per call
    network = UNetDenoiser(UNetParams(checkpoint)).fit(store)
    scheduler = make_scheduler(cfg.sampling)
    expected = []
    for noise in batch_noise_sources(0, 3, 2, (1, 8, 8), torch.device("cpu"), False):
        steps = []
        sample(network, scheduler, noise.randn(), noise, 0.0, steps.append)
        rows = []
        for step in steps:
            level = noise_level(scheduler, step.timestep)
            ab = torch.tensor(level.alpha_bar)
            target = epsilon_from_x0(step.x_t, step.x0_hat, ab)
            rows.append(torch.stack([eps_cosine(epsilon_from_x0(step.x_t, method.denoise_at_size(step.x_t, level, k).x0_hat, ab), target)
                                     for k in (3, 5, 7)]))
        expected.append(torch.stack(rows))
    torch.testing.assert_close(torch.tensor(saved["eps_cosine"], dtype=torch.float64), torch.cat(expected, 2).double())
    # and a run that uses the file samples with the chosen sizes
    used = generate(load_config("els/mnist5k", [*FAST, f"model.params.patch_size={result.run_dir / 'calibration.json'}"]))
    assert [s["diagnostics"]["patch_size"][0] for s in used.metrics["steps"]] == saved["patch_size"]


def test_choose_sizes_takes_the_per_step_median_of_the_per_sample_best():
    cosine = torch.tensor([[[0.1, 0.9, 0.2], [0.5, 0.1, 0.3], [0.2, 0.0, 0.9]]])  # [1 step, 3 sizes, 3 samples]
    best, chosen = choose_sizes(cosine, [3, 5, 7])
    assert best.tolist() == [[5, 3, 7]] and chosen == [5]


@pytest.mark.parametrize("config,extra,message", [
    ("els/mnist5k", [], "baseline.checkpoint"),
    ("optimal/mnist5k", ["baseline.checkpoint=x"], "local_score, els or pspc"),
    ("els/mnist5k", ["baseline.checkpoint=x", "calibration.candidates=[3,4]"],
     "calibration.candidates must be odd positive integers (patch sizes of els); got 4 in [3, 4]"),
    ("els/mnist5k", ["baseline.checkpoint=x", "calibration.candidates=[]"], "calibration.candidates is empty"),
])
def test_calibrate_refuses_what_it_cannot_do(fresh_root, capsys, config, extra, message):
    assert main(["calibrate", "-c", config, *FAST, *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error
    assert not (fresh_root / "runs").exists()


def test_a_patch_larger_than_the_image_stops_generate_before_the_run_directory(fresh_root, capsys):
    assert main(["generate", "-c", "els/mnist5k", *FAST, "model.params.patch_size=9",
                 "model.params.boundary=circular"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "boundary=broken" in error
    assert not (fresh_root / "runs").exists()

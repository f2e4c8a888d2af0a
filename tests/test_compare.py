"""Comparison with a baseline: R^2 and MSE against hand-computed values, the baseline against itself, and the files."""

from __future__ import annotations

import json

import pytest
import torch
from unet_helpers import TINY, random_unet, toy_store

from analytic_diffusion.cli import main
from analytic_diffusion.compare import (
    BaselineComparison,
    mse_per_sample,
    plot_comparison,
    r2_per_sample,
    save_side_by_side,
)
from analytic_diffusion.config import load_config
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset
from analytic_diffusion.denoisers.unet import UNetDenoiser
from analytic_diffusion.noise import batch_noise_sources
from analytic_diffusion.generate import generate
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level, sample
from analytic_diffusion.unet import NoiseSchedule, UNetCheckpoint, save_checkpoint


def test_r2_and_mse_match_hand_computed_values():
    reference = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 0.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    prediction = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 4.0, 4.0]])
    # sample 0: mean 2.75, SS_tot = 1.75^2 + 0.75^2 + 0.25^2 + 2.25^2 = 8.75, SS_res = 1 -> R^2 = 1 - 1/8.75
    # sample 1: predicting the reference's own mean gives R^2 = 0; SS_res = 4
    # sample 2: shifted by 1: SS_res = 4, SS_tot = 4 -> R^2 = 0
    expected_r2 = torch.tensor([1 - 1 / 8.75, 0.0, 0.0])
    expected_mse = torch.tensor([0.25, 1.0, 1.0])
    torch.testing.assert_close(r2_per_sample(prediction, reference), expected_r2)
    torch.testing.assert_close(mse_per_sample(prediction, reference), expected_mse)
    # images: the metrics flatten C, H, W
    images = (prediction.reshape(3, 1, 2, 2), reference.reshape(3, 1, 2, 2))
    torch.testing.assert_close(r2_per_sample(*images), expected_r2)


def test_r2_uses_the_population_variance_of_the_baseline():
    """R^2 = 1 - SS_res / (n var(y)) with var over the n values (ddof = 0), i.e. the textbook 1 - SS_res / SS_tot."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(5, 3, 4, 4, generator=generator)
    x = y + 0.3 * torch.randn(5, 3, 4, 4, generator=generator)
    n = 48
    expected = 1 - (x - y).flatten(1).square().sum(1) / (n * y.flatten(1).var(1, correction=0))
    torch.testing.assert_close(r2_per_sample(x, y), expected)


def test_r2_of_a_constant_baseline_is_nan():
    assert r2_per_sample(torch.zeros(1, 4), torch.ones(1, 4)).isnan().all()


def _unet(seed: int = 0) -> UNetDenoiser:
    return UNetDenoiser().use_network(random_unet(seed=seed), NoiseSchedule())


def _run(method, baseline, num_samples=6, batch_size=4, steps=5, seed=0):
    """The generate loop in miniature: batches in order, the comparison riding along."""
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=steps))
    comparison = BaselineComparison(baseline, scheduler) if baseline is not None else None
    finals = []
    for noise in batch_noise_sources(seed, num_samples, batch_size, (1, 8, 8), torch.device("cpu"), per_sample=False):
        x_T = noise.randn()
        callback = comparison.start_batch(x_T) if comparison else None
        final = sample(method, scheduler, x_T, noise, callback=callback).x0_hat
        if comparison:
            comparison.finish_batch(final)
        finals.append(final)
    return torch.cat(finals), (comparison.result() if comparison else None)


def test_baseline_against_itself_gives_r2_one_and_mse_zero():
    images, result = _run(_unet(), _unet())
    assert result.trajectory_r2.shape == (5, 6) and result.timesteps == [800, 600, 400, 200, 0]
    for name, values in result.metrics().items():
        assert torch.all(values == (1.0 if name.endswith("r2") else 0.0)), name
    assert torch.equal(result.method_images, images) and torch.equal(result.baseline_images, images)


def test_comparison_does_not_change_the_methods_samples():
    store = toy_store()
    method = NearestDataset(device="cpu").fit(store)
    alone, _ = _run(method, None)
    compared, result = _run(method, _unet())
    assert torch.equal(alone, compared)
    assert torch.equal(result.method_images, alone)


def test_trajectory_and_single_step_metrics_follow_their_definitions():
    """Recompute both comparisons by hand for one batch of a method that differs from the baseline."""
    method, baseline = _unet(seed=1), _unet(seed=2)
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=4))
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    method_steps, baseline_steps = [], []
    sample(method, scheduler, x_T, callback=method_steps.append)
    sample(baseline, scheduler, x_T, callback=baseline_steps.append)

    comparison = BaselineComparison(baseline, scheduler)
    comparison.finish_batch(sample(method, scheduler, x_T, callback=comparison.start_batch(x_T)).x0_hat)
    result = comparison.result()
    for i, (mine, theirs) in enumerate(zip(method_steps, baseline_steps)):
        answer = baseline(mine.x_t, noise_level(scheduler, mine.timestep)).x0_hat
        torch.testing.assert_close(result.trajectory_r2[i], r2_per_sample(mine.x0_hat, theirs.x0_hat))
        torch.testing.assert_close(result.trajectory_mse[i], mse_per_sample(mine.x0_hat, theirs.x0_hat))
        torch.testing.assert_close(result.single_step_r2[i], r2_per_sample(mine.x0_hat, answer))
        torch.testing.assert_close(result.single_step_mse[i], mse_per_sample(mine.x0_hat, answer))
    assert not torch.equal(result.trajectory_mse[1:], result.single_step_mse[1:])  # they differ after the first step
    torch.testing.assert_close(result.trajectory_mse[0], result.single_step_mse[0])  # same x_T at the first step


def test_summary_plot_and_side_by_side_grid(tmp_path):
    _, result = _run(NearestDataset(device="cpu").fit(toy_store()), _unet())
    summary = json.loads(json.dumps(result.summary()))
    assert summary["timesteps"] == [800, 600, 400, 200, 0]
    assert set(summary["final"]) == {"trajectory_r2", "trajectory_mse", "single_step_r2", "single_step_mse"}
    per_step = summary["per_step"]["trajectory_mse"]
    assert len(per_step["mean"]) == 5 and len(per_step["per_sample"]) == 5 and len(per_step["per_sample"][0]) == 6
    assert summary["final"]["trajectory_mse"] == pytest.approx(float(result.trajectory_mse[-1].mean()), rel=1e-5)
    assert "n * var(y)" in summary["r2_definition"]
    plot_comparison(result, tmp_path / "comparison.png", method="nearest_dataset")
    save_side_by_side(result, tmp_path / "side_by_side.png", method="nearest_dataset")
    for name in ("comparison.png", "side_by_side.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _baseline_checkpoint(folder, size: int = 28) -> str:
    weights = {k: v.clone() for k, v in random_unet(size=size).state_dict().items()}
    save_checkpoint(folder / "checkpoint.pt", UNetCheckpoint(TINY, (1, size, size), weights, dict(weights)))
    return str(folder)


FAST = ["experiment.device=cpu", "sampling.num_inference_steps=4", "dataset.subset_size=500",
        "sampling.num_samples=5", "sampling.batch_size=2"]


def test_generate_with_a_baseline_writes_metrics_plot_and_grid(tmp_path):
    checkpoint = _baseline_checkpoint(tmp_path)
    compared = generate(load_config("nearest_dataset/mnist5k", [*FAST, f"baseline.checkpoint={checkpoint}"]))
    plain = generate(load_config("nearest_dataset/mnist5k", FAST))
    assert torch.equal(compared.samples, plain.samples)  # the comparison does not disturb the method
    names = {p.name for p in compared.run_dir.iterdir()}
    assert {"comparison.png", "side_by_side.png", "metrics.json"} <= names and "INCOMPLETE" not in names
    baseline = json.loads((compared.run_dir / "metrics.json").read_text())["baseline"]
    assert baseline["checkpoint"] == checkpoint and baseline["timesteps"] == [750, 500, 250, 0]
    for name in ("trajectory_r2", "trajectory_mse", "single_step_r2", "single_step_mse"):
        assert len(baseline["per_step"][name]["mean"]) == 4
        assert len(baseline["per_step"][name]["per_sample"][3]) == 5
        assert baseline["final"][name] == baseline["per_step"][name]["mean"][3]


def test_generate_unet_against_itself_end_to_end(tmp_path):
    checkpoint = _baseline_checkpoint(tmp_path)
    result = generate(load_config("unet/mnist5k", [*FAST, f"model.params.checkpoint={checkpoint}",
                                                   f"baseline.checkpoint={checkpoint}"]))
    final = result.metrics["baseline"]["final"]
    assert final == {"trajectory_r2": 1.0, "trajectory_mse": 0.0, "single_step_r2": 1.0, "single_step_mse": 0.0}


@pytest.mark.parametrize("key", ["baseline.checkpoint", "model.params.checkpoint"])
def test_a_missing_checkpoint_stops_generate_before_the_run_directory(fresh_root, tmp_path, capsys, key):
    method = "unet/mnist5k" if key.startswith("model") else "nearest_dataset/mnist5k"
    assert main(["generate", "-c", method, *FAST, f"{key}={tmp_path / 'nowhere.pt'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "nowhere.pt not found" in error
    assert not (fresh_root / "runs").exists()


def test_baseline_of_another_resolution_stops_generate_with_one_line(tmp_path, capsys):
    checkpoint = _baseline_checkpoint(tmp_path, size=8)
    assert main(["generate", *FAST, f"baseline.checkpoint={checkpoint}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "trained on 1x8x8 images" in error and "dataset gives 1x28x28" in error

"""Comparison with a baseline: every step and sample scored by the five agreement metrics, the baseline against
itself, the comparison leaving the method alone, and the files (the metrics themselves: test_agreement.py)."""

from __future__ import annotations

import json

import pytest
import torch
from unet_helpers import TINY, random_unet, toy_store

from analytic_diffusion.cli import main
from analytic_diffusion.compare import METRICS, BaselineComparison, plot_comparison, save_side_by_side
from analytic_diffusion.config import load_config
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset
from analytic_diffusion.denoisers.unet import UNetDenoiser
from analytic_diffusion.noise import batch_noise_sources
from analytic_diffusion.generate import generate, summary
from analytic_diffusion.metrics import agreement
from analytic_diffusion.sampling import SchedulerOptions, epsilon_from_x0, make_scheduler, noise_level, sample
from analytic_diffusion.unet import NoiseSchedule, UNetCheckpoint, save_checkpoint


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
    assert result.tables["trajectory_r2"].shape == (5, 6) and result.timesteps == [800, 600, 400, 200, 0]
    assert tuple(result.metrics()) == METRICS and len(METRICS) == 10
    for name, values in result.metrics().items():
        torch.testing.assert_close(values, torch.full((5, 6), 0.0 if name.endswith("mse") else 1.0), msg=name)
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
    tables = result.tables
    for i, (mine, theirs) in enumerate(zip(method_steps, baseline_steps)):
        ab = scheduler.alphas_cumprod[mine.timestep]
        answer = baseline(mine.x_t, noise_level(scheduler, mine.timestep)).x0_hat
        my_eps = epsilon_from_x0(mine.x_t, mine.x0_hat, ab)
        expected = {
            "trajectory": agreement.agreement(mine.x0_hat, theirs.x0_hat, my_eps,
                                              epsilon_from_x0(theirs.x_t, theirs.x0_hat, ab)),
            "single_step": agreement.agreement(mine.x0_hat, answer, my_eps, epsilon_from_x0(mine.x_t, answer, ab)),
        }
        for kind, scores in expected.items():
            for name, values in scores.items():
                torch.testing.assert_close(tables[f"{kind}_{name}"][i], values, msg=f"{kind}_{name}")
    for name in agreement.NAMES:
        assert not torch.equal(tables[f"trajectory_{name}"][1:], tables[f"single_step_{name}"][1:])  # differ later
        torch.testing.assert_close(tables[f"trajectory_{name}"][0], tables[f"single_step_{name}"][0])  # same x_T


def test_summary_plot_and_side_by_side_grid(tmp_path):
    _, result = _run(NearestDataset(device="cpu").fit(toy_store()), _unet())
    summary = json.loads(json.dumps(result.summary()))
    assert summary["timesteps"] == [800, 600, 400, 200, 0]
    assert set(summary["final"]) == set(summary["final_median"]) == set(METRICS)
    per_step = summary["per_step"]["trajectory_mse"]
    assert len(per_step["mean"]) == len(per_step["median"]) == 5
    assert len(per_step["per_sample"]) == 5 and len(per_step["per_sample"][0]) == 6
    last = result.tables["trajectory_pearson_r"][-1]
    assert summary["final"]["trajectory_pearson_r"] == pytest.approx(float(last.mean()), rel=1e-5)
    assert summary["final_median"]["trajectory_pearson_r"] == pytest.approx(float(last.median()), rel=1e-5)
    assert set(summary["definitions"]) == set(agreement.NAMES) and "unbiased" in summary["definitions"]["r2"]
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
    assert baseline["eta"] == 0.0  # baseline.eta defaults to the run's sampling.eta
    printed = summary(compared)
    assert f"r2 {baseline['final']['trajectory_r2']:.4g} (mean)" in printed
    assert f"pearson_r {baseline['final_median']['single_step_pearson_r']:.4g} (median)" in printed
    assert set(baseline["final"]) == set(METRICS)
    for name in METRICS:
        assert len(baseline["per_step"][name]["mean"]) == 4
        assert len(baseline["per_step"][name]["per_sample"][3]) == 5
        assert baseline["final"][name] == baseline["per_step"][name]["mean"][3]


def test_generate_unet_against_itself_end_to_end(tmp_path):
    checkpoint = _baseline_checkpoint(tmp_path)
    result = generate(load_config("unet/mnist5k", [*FAST, f"model.params.checkpoint={checkpoint}",
                                                   f"baseline.checkpoint={checkpoint}"]))
    assert result.metrics["backbone"]["format"] == "studio" and result.metrics["backbone"]["schedule"]["same_as_sampler"]
    for final in (result.metrics["baseline"]["final"], result.metrics["baseline"]["final_median"]):
        assert final == pytest.approx({name: 0.0 if name.endswith("mse") else 1.0 for name in METRICS}, abs=1e-6)


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

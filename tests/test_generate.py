"""End to end: `ads generate` writes a complete run directory, deterministically, and marks failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from analytic_diffusion import generate as generate_module
from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config
from analytic_diffusion.generate import generate

FAST = ["experiment.device=cpu", "sampling.num_inference_steps=4", "dataset.subset_size=500"]


def _run(*overrides: str):
    return generate(load_config("nearest_dataset/mnist5k", [*FAST, *overrides]))


def test_cli_writes_every_artifact(capsys):
    assert main(["generate", *FAST, "sampling.num_samples=5", "sampling.batch_size=2", "output.intermediates=true"]) == 0
    summary = capsys.readouterr().out
    run_dir = Path(summary.split("Outputs in ")[1].split(":")[0])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "grid.png", "images", "intermediates", "metrics.json", "run.log", "samples.pt"} <= names
    assert "INCOMPLETE" not in names
    assert len(list((run_dir / "images").glob("sample_*.png"))) == 5
    assert len(list((run_dir / "intermediates").glob("sample_*.png"))) == 5
    trajectory = torch.load(run_dir / "intermediates" / "trajectory.pt")
    assert trajectory["x0_hat"].shape == (5, 4, 1, 28, 28) and trajectory["timesteps"] == [750, 500, 250, 0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset_size"] == 500 and len(metrics["steps"]) == 4
    assert len(metrics["samples"]) == 5 and len(metrics["steps"][0]["diagnostics"]["nearest_index"]) == 5
    # The final sample is a training image, so its provenance is itself at distance zero.
    for record in metrics["samples"]:
        assert record["nearest_train_index"] == record["nearest_index"] and record["nearest_train_distance"] == 0
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.sampling.num_samples == 5 and resolved.model.params.timestep_aware is False


def test_same_seed_is_bit_identical_and_another_seed_is_not():
    first, second = _run("sampling.num_samples=4"), _run("sampling.num_samples=4")
    other = _run("sampling.num_samples=4", "experiment.seed=1")
    assert torch.equal(first.samples, second.samples)
    assert not torch.equal(first.samples, other.samples)
    saved = torch.load(first.run_dir / "samples.pt")
    assert torch.equal(saved, first.samples)


def test_batch_size_invariance():
    """Per-sample seeds: identical for any batch size, by construction (sample i always draws from its own generator).
    Shared generator on the CPU: also identical here, because torch's CPU normal sampler consumes its stream in
    blocks of 16 values and one 28x28 image is 784 = 49 x 16 values, so two draws of 4 images equal one draw of 8.
    (With images whose size is not a multiple of 16, or on CUDA, the shared convention depends on the batch size.)"""
    for convention in ("sampling.per_sample_seeds=true", "sampling.per_sample_seeds=false"):
        by4 = _run("sampling.num_samples=8", "sampling.batch_size=4", convention)
        by8 = _run("sampling.num_samples=8", "sampling.batch_size=8", convention)
        by3 = _run("sampling.num_samples=8", "sampling.batch_size=3", convention)
        assert torch.equal(by4.samples, by8.samples) and torch.equal(by3.samples, by8.samples)


def test_shared_convention_depends_on_batch_size_when_images_break_the_16_value_blocks(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 5, 5, 3), dtype=np.uint8)  # 75 values per image
    np.save(tmp_path / "tiny.npy", images)
    common = [*FAST[:2], "dataset.name=array", f"dataset.path={tmp_path / 'tiny.npy'}", "sampling.num_samples=4"]
    results = {}
    for convention in ("true", "false"):
        for batch in (2, 4):
            cfg = load_config("nearest_dataset/mnist5k", [*common, f"sampling.batch_size={batch}",
                                                          f"sampling.per_sample_seeds={convention}"])
            results[convention, batch] = generate(cfg).samples
    assert torch.equal(results["true", 2], results["true", 4])
    assert not torch.equal(results["false", 2], results["false", 4])


def test_failure_leaves_run_marked_incomplete(monkeypatch, fresh_root):
    def broken(*args, **kwargs):
        raise RuntimeError("denoiser exploded")

    monkeypatch.setattr(generate_module, "sample", broken)
    with pytest.raises(RuntimeError):
        _run("sampling.num_samples=2")
    (run_dir,) = (fresh_root / "runs" / "nearest_dataset").iterdir()
    assert "denoiser exploded" in (run_dir / "INCOMPLETE").read_text()
    assert not (run_dir / "metrics.json").exists()


def test_non_finite_denoiser_output_stops_the_run_with_a_clear_error(monkeypatch, fresh_root):
    from analytic_diffusion.denoisers.nearest_dataset import NearestDataset
    from analytic_diffusion.errors import StudioError

    original = NearestDataset.denoise

    def poisoned(self, x_t, level, noise=None):
        out = original(self, x_t, level, noise)
        out.x0_hat[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(NearestDataset, "denoise", poisoned)
    with pytest.raises(StudioError, match="NaN or inf at timestep 750"):
        _run("sampling.num_samples=2")
    (run_dir,) = (fresh_root / "runs" / "nearest_dataset").iterdir()
    assert (run_dir / "INCOMPLETE").exists()


def test_locality_masks_are_drawn_next_to_the_samples():
    small = [*FAST, "sampling.num_samples=2", "sampling.num_inference_steps=2", "dataset.subset_size=200"]
    result = generate(load_config("pca_locality/mnist5k", small))
    assert (result.run_dir / "masks.png").is_file()
    no_masks = generate(load_config("pca_locality/mnist5k", [*small, "output.masks=false"]))
    assert not (no_masks.run_dir / "masks.png").exists()


@pytest.mark.parametrize(
    ("command", "key", "message"),
    [
        ("generate", "paths.runs", "set paths.runs to a writable folder"),
        ("generate", "paths.cache", "set paths.cache to a writable folder"),
        ("train-unet", "training.output_dir", "set training.output_dir to a writable folder"),
    ],
)
def test_a_file_in_the_way_of_an_output_folder_is_a_one_line_error(tmp_path, capsys, command, key, message):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    assert main([command, *FAST, "sampling.num_samples=1", "training.epochs=1", f"{key}={in_the_way / 'sub'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_run_log_keeps_what_was_logged_before_the_run_directory_existed(fresh_root, capsys):
    """The store and the fit run before the run directory exists (bad input leaves nothing behind); their log lines
    still open run.log, in order."""
    assert main(["generate", "-c", "wiener/mnist5k", *FAST, "sampling.num_samples=2", "logging.level=info"]) == 0
    run_dir = Path(capsys.readouterr().out.split("Outputs in ")[1].split(":")[0])
    lines = (run_dir / "run.log").read_text().splitlines()
    fitted = next(i for i, line in enumerate(lines) if "INFO statistics of mnist5k written to" in line)
    opened = next(i for i, line in enumerate(lines) if f"INFO run {run_dir}" in line)
    assert fitted < opened

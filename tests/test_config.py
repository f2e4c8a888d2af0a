"""Config loading: inheritance through `defaults:`, dot-list overrides, and one-line errors on bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config, loader
from analytic_diffusion.config.loader import INSTALLED_CONFIGS, configs_dir, resolve_config_path
from analytic_diffusion.errors import StudioError


def test_method_config_inherits_defaults_and_dataset_section():
    cfg = load_config("nearest_dataset/cifar10")
    assert cfg.model.name == "nearest_dataset"
    assert cfg.dataset.name == "cifar10" and cfg.dataset.resolution == 32  # from datasets/cifar10.yaml
    assert cfg.sampling.num_inference_steps == 10 and cfg.sampling.clip_sample  # from defaults.yaml
    assert cfg.model.params.timestep_aware is False


def test_overrides_win_and_are_typed():
    cfg = load_config("nearest_dataset/mnist5k.yaml", ["sampling.num_samples=16", "experiment.device=cpu",
                                                       "model.params.timestep_aware=true"])
    assert cfg.sampling.num_samples == 16 and cfg.experiment.device == "cpu"
    assert cfg.model.params.timestep_aware is True


def test_absolute_path_and_user_defaults_chain(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("defaults:\n  - nearest_dataset/mnist5k\nsampling:\n  num_samples: 3\n")
    top = tmp_path / "top.yaml"
    top.write_text(f"defaults:\n  - {base}\nsampling:\n  batch_size: 2\n")
    cfg = load_config(str(top))
    assert (cfg.sampling.num_samples, cfg.sampling.batch_size, cfg.model.name) == (3, 2, "nearest_dataset")


def test_a_local_configs_folder_does_not_replace_the_installed_configs(tmp_path: Path, monkeypatch, caplog):
    """A name is looked up in the installed configs (or $ADS_CONFIGS), never silently in ./configs; a local copy
    that differs is named in a warning and is used when passed by path."""
    monkeypatch.delenv("ADS_CONFIGS")
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "configs"
    (local / "optimal").mkdir(parents=True)
    (local / "defaults.yaml").write_text("experiment:\n  seed: 7\n")
    (local / "optimal" / "mnist5k.yaml").write_text("defaults:\n  - defaults\n  - datasets/mnist5k\n"
                                                    "model:\n  name: optimal\nexperiment:\n  name: local_copy\n")
    caplog.set_level(logging.WARNING, logger="analytic_diffusion")
    cfg = load_config("optimal/mnist5k")
    assert (cfg.experiment.name, cfg.experiment.seed) == ("optimal", 0)
    (record,) = caplog.records
    assert record.message.startswith(f"warning: config optimal/mnist5k is {INSTALLED_CONFIGS / 'optimal/mnist5k.yaml'}")
    assert "not ./configs/optimal/mnist5k.yaml; pass -c ./configs/optimal/mnist5k.yaml for the local file" in record.message
    caplog.clear()
    cfg = load_config("./configs/optimal/mnist5k.yaml")  # by path: the local file, its defaults by name
    assert (cfg.experiment.name, cfg.experiment.seed) == ("local_copy", 0) and caplog.records == []
    monkeypatch.setenv("ADS_CONFIGS", str(local))  # asked for: the whole local folder
    assert resolve_config_path("optimal/mnist5k") == local / "optimal" / "mnist5k.yaml"
    monkeypatch.delenv("ADS_CONFIGS")
    monkeypatch.setattr(loader, "INSTALLED_CONFIGS", tmp_path / "absent")  # an install without its configs
    assert configs_dir() == local


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sampling.num_sample=4"], "did you mean 'sampling.num_samples'"),
        (["model.name=nearest_datset"], "did you mean 'nearest_dataset'"),
        (["dataset.name=mnist5"], "did you mean 'mnist5k'"),
        (["model.params.timestep_awar=true"], "did you mean 'timestep_aware'"),
        (["experiment.seed=abc"], "experiment.seed"),
        (["experiment.seed=-1", "sampling.per_sample_seeds=true"], "experiment.seed must be in"),
        (["experiment.seed=18446744073709551616"], "experiment.seed must be in"),
        (["sampling.num_samples=0"], "at least 1"),
        (["experiment.device=gpu"], "experiment.device"),
        (["sampling.timestep_spacing=leadin"], "did you mean 'leading'"),
        (["sampling.num_inference_steps=5000"], "cannot exceed"),
        (["oops"], "key=value"),
        (["experiment.name=../../elsewhere"], "experiment.name names one folder"),
        (["experiment.run_name=.."], "experiment.run_name names one folder"),
        (["output.grid_columns=-1"], "output.grid_columns must be a positive number"),
        (["output.grid_columns=0"], "output.grid_columns must be a positive number"),
        (["sampling=3"], "a section holds keys"),
        (["model=3"], "a section holds keys"),
        (["model.params=3"], "model.params must be a mapping"),
        (["model.params=[1,2]"], "not a list"),
    ],
)
def test_bad_input_is_one_line_error_naming_the_fix(overrides, expected):
    with pytest.raises(StudioError) as info:
        load_config("nearest_dataset/mnist5k", overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("defaults", ["5", "nearest_dataset/mnist5k"])
def test_defaults_that_are_not_a_list_are_a_one_line_error(tmp_path: Path, defaults):
    config = tmp_path / "user.yaml"
    config.write_text(f"defaults: {defaults}\n")
    with pytest.raises(StudioError, match="must be a list of config names") as info:
        load_config(str(config))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.params.temperature=0", "temperature must be a finite number > 0"),
        ("model.params.temperature=-1", "temperature must be a finite number > 0"),
        ("model.params.temperature=inf", "temperature must be a finite number > 0"),
        ("sampling.eta=nan", "sampling.eta must be a finite number >= 0"),
        ("sampling.eta=inf", "sampling.eta must be a finite number >= 0"),
        ("sampling.beta_start=nan", "0 < beta_start <= beta_end < 1"),
        ("sampling.beta_end=2", "0 < beta_start <= beta_end < 1"),
        ("sampling.beta_start=0.05", "0 < beta_start <= beta_end < 1"),
        ("model.params.mask_threshold=-0.5", "mask_threshold must be in [0, 1]"),
        ("model.params.mask_threshold=2", "mask_threshold must be in [0, 1]"),
        ("model.params.flat_fraction=-1", "flat_fraction must be in [0, 1]"),
        ("model.params.chunk_size=-1", "chunk_size must be at least 1"),
    ],
)
def test_pca_locality_parameters_are_checked_with_the_config(override, expected):
    with pytest.raises(StudioError) as info:
        load_config("pca_locality/mnist5k", [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_config_file_suggests_closest():
    with pytest.raises(StudioError, match="did you mean 'nearest_dataset/mnist5k'"):
        load_config("nearest_dataset/mnist5")


@pytest.mark.parametrize("overrides", [["sampling.num_sample=4"], ["model.name=nearest_datset"],
                                       ["model.params.backend=exactt"], ["model.params.chunk_size=0"],
                                       ["model.params.faiss_nprobe=0"]])
def test_cli_rejects_before_creating_anything(fresh_root: Path, capsys, overrides):
    status = main(["generate", *overrides])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not fresh_root.exists()

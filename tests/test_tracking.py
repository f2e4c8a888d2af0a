"""Weights & Biases stays optional: off by default, a clear error when asked for but missing, logs when present."""

from __future__ import annotations

import sys
import types

import pytest

from analytic_diffusion.config import load_config
from analytic_diffusion.errors import StudioError
from analytic_diffusion.generate import generate

FAST = ["experiment.device=cpu", "sampling.num_inference_steps=2", "sampling.num_samples=2", "dataset.subset_size=50"]


def test_missing_wandb_is_a_clear_error_before_any_run(monkeypatch, fresh_root):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(StudioError, match="pip install wandb"):
        generate(load_config("nearest_dataset/mnist5k", [*FAST, "logging.wandb=true"]))
    assert not (fresh_root / "runs").exists()


def test_offline_run_logs_config_steps_and_grid(monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, data, step=None):
            calls.setdefault("log", []).append(data)

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or FakeRun(), Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    generate(load_config("nearest_dataset/mnist5k", [*FAST, "logging.wandb=true"]))
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"]["model"]["name"] == "nearest_dataset"
    assert len(calls["log"]) == 3 and calls["log"][-1]["grid"][0] == "image" and calls["finished"]

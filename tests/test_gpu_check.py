"""benchmarks/gpu_check.py: its CPU mode runs here as CI runs it, and a broken comparison fails it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import DENOISERS, Denoiser, load_all
from analytic_diffusion.errors import StudioError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (its import-time TQDM_DISABLE kept inside this test)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_passes_every_check(tmp_path):
    """The command CI runs: exit 0, and the JSON holds every group, every registered method, all passed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # one thread: the inputs are tiny, and a shared CPU punishes oversubscription
    report_path = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(report_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["quick"] and report["passed"] and report["failed"] == []
    checks = report["checks"]
    known = ("nearest_dataset", "optimal", "scfdm", "wiener", "pca_locality", "unet")
    measured = [c for c in checks if not c["skipped"]]
    assert all(c["passed"] and c["failure"] is None and c["error"] is not None for c in measured)
    # only a later method that needs a file (a checkpoint) may be skipped, never one of the studio's own
    assert not [c for c in checks if c["skipped"] and c["name"].split()[-1] in known]
    names = [c["name"] for c in checks]
    load_all()
    expected = ["knn mnist5k", "knn cifar-shaped", "nearest_dataset mnist5k", "nearest_dataset cifar-shaped",
                "optimal exact mnist5k", "optimal exact cifar-shaped", "optimal topk mnist5k", "optimal topk cifar-shaped",
                "scfdm", "statistics mnist5k", "statistics cifar-shaped", "wiener mnist5k", "wiener cifar-shaped",
                "pca_locality mask", "pca_locality mnist5k", "pca_locality cifar-shaped", "unet eps", "unet training"]
    expected += [f"generate {method}" for method in DENOISERS]  # every method end to end, later ones included
    expected += [method for method in DENOISERS if method not in known]
    missing = [prefix for prefix in expected if not any(name.startswith(prefix) for name in names)]
    assert not missing, f"no check starts with {missing}"
    # the kernels were compared with the float64 formulas, and agree with them within the stated tolerances
    for c in checks:
        if c["name"].split()[0] in ("knn", "nearest_dataset", "optimal", "scfdm", "statistics", "wiener"):
            assert c["reference_error"] is not None and c["reference_error"] <= c["tolerance"], c
            assert c["baseline_ms"] is not None, c
    assert {c["tolerance"] for c in checks if c["name"].startswith("knn")} == {0}
    assert {c["tolerance"] for c in checks if c["name"].startswith("pca_locality mnist5k")} == {1e-4}
    assert {c["tolerance"] for c in checks if c["name"].startswith("optimal")} == {1e-5}


def test_a_comparison_beyond_its_tolerance_fails_the_check(gpu_check):
    runner = gpu_check.Runner(torch.device("cpu"), gpu_check.QUICK)
    values = torch.linspace(-1, 1, 5)
    within = runner.check("within", 1e-5, lambda where: values if where == "cpu" else values + 1e-6)
    beyond = runner.check("beyond", 1e-5, lambda where: values if where == "cpu" else values + 1e-3)
    off_reference = runner.check("off the float64 formula", 1e-5, lambda where: values, reference=lambda: values + 1e-3)
    not_a_number = runner.check("nan", 1e-5, lambda where: values if where == "cpu" else values * math.nan)
    indices = runner.check("indices", 0, lambda where: torch.tensor([3, 1] if where == "cpu" else [3, 2]),
                           gpu_check.mismatches)
    broken = runner.check("raises", 1e-5, lambda where: 1 / 0)
    assert within.passed and within.error == pytest.approx(1e-6, rel=0.05)
    assert not beyond.passed and beyond.error == pytest.approx(1e-3, rel=0.05)
    assert off_reference.error == 0 and not off_reference.passed
    assert not not_a_number.passed
    assert indices.error == 1 and not indices.passed and indices.metric == "mismatches"
    assert not broken.passed and broken.failure.startswith("ZeroDivisionError")
    table = gpu_check.table(runner.checks)
    assert table.count("**FAIL**") == 5 and "| within |" in table


def test_main_exits_non_zero_when_a_kernel_disagrees(gpu_check, monkeypatch, tmp_path):
    """A broken float64 formula (standing in for a broken kernel) fails the wiener rows, the JSON and the exit status."""
    formula = gpu_check.wiener_from_covariance
    monkeypatch.setattr(gpu_check, "wiener_from_covariance", lambda *args: formula(*args) + 1e-3)
    digits = torch.randint(0, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    monkeypatch.setattr(gpu_check, "load_or_build_store", lambda *args: (DatasetStore.from_tensor(digits), {}))
    report_path = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "wiener", "--json", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert not report["passed"] and report["failed"] and all(name.startswith("wiener") for name in report["failed"])
    assert all(c["error"] == 0 and c["reference_error"] > 1e-5 for c in report["checks"])


def test_a_run_stopped_part_way_keeps_its_finished_rows_and_their_numbers(gpu_check, monkeypatch, tmp_path, capsys):
    """A time limit (the GPU lease) can stop the check: the JSON written after every row and the progress lines on
    stderr keep what was measured, marked incomplete."""
    digits = torch.randint(0, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    monkeypatch.setattr(gpu_check, "load_or_build_store", lambda *args: (DatasetStore.from_tensor(digits), {}))

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "check_pca_locality", stopped)
    report_path = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--device", "cpu", "--quick", "--only", "wiener", "pca_locality", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["complete"] is False and report["passed"] is False and report["quick"] is True
    wiener = [c for c in report["checks"] if c["name"].startswith("wiener")]
    assert len(wiener) == len(report["checks"]) == 2 * len(gpu_check.QUICK.timesteps)
    assert all(c["passed"] and c["reference_error"] is not None for c in wiener)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("ok")]
    assert len(lines) == len(wiener) and all("vs float64" in line and "ms " in line for line in lines)


def test_unknown_group_and_missing_cuda_are_refused(gpu_check, capsys):
    assert gpu_check.main(["--only", "wienr"]) == 2
    assert "unknown group(s) wienr" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


class _NeedsCheckpoint(Denoiser):
    """A registry method that cannot run without a file the check cannot provide."""

    def fit(self, store):
        raise StudioError("this method needs model.params.checkpoint")


class _Broken(Denoiser):
    def fit(self, store):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_registry_methods_that_need_a_file_are_skipped_and_broken_ones_fail(gpu_check, monkeypatch, tmp_path):
    """Methods added later are checked automatically: a StudioError from their config or fit (a missing checkpoint)
    skips them with the reason, in the registry check and in `generate`; any other exception fails the row."""
    runner = gpu_check.Runner(torch.device("cpu"), gpu_check.QUICK)
    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    inputs = gpu_check.Inputs("mnist5k", DatasetStore.from_tensor(images), 2, torch.linspace(0.9999, 1e-4, 1000))
    monkeypatch.setitem(DENOISERS, "needs_checkpoint", _NeedsCheckpoint)
    monkeypatch.setitem(DENOISERS, "broken_on_device", _Broken)
    skipped: dict[str, str] = {}
    gpu_check.check_registry_method(runner, "needs_checkpoint", inputs, skipped)
    gpu_check.check_registry_method(runner, "broken_on_device", inputs, skipped)
    gpu_check.check_generate(runner, ["needs_checkpoint"], tmp_path, None, skipped)
    needs, broken, generate = runner.checks
    assert needs.passed and needs.skipped == "this method needs model.params.checkpoint" and generate.skipped
    assert skipped == {"needs_checkpoint": needs.skipped} and generate.passed
    assert not broken.passed and broken.failure.startswith("RuntimeError: CUDA error")
    assert "skipped: this method needs" in gpu_check.table(runner.checks)


def test_cuda_branches_of_the_runner_with_faked_memory_counters(gpu_check, monkeypatch):
    """What CI cannot run for real: on CUDA a check reruns the method and the straightforward formulation with TF32
    on (judging the method's TF32 result at its tolerance) and adds the GPU memory held to the peak of one call."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 6 << 20)
    runner = gpu_check.Runner(torch.device("cpu"), gpu_check.QUICK)
    runner.cuda = True
    values = torch.linspace(-1, 1, 5)
    row = runner.check("guarded", 1e-5, lambda where: values, baseline=("dense", lambda: values, 3.0), held_mib=2.0)
    assert row.passed and row.tf32_error == 0 and row.tf32_ms is not None and row.tf32_baseline_ms is not None
    assert row.mib == 2.0 + 5.0 and row.baseline_mib == 3.0 + 5.0

    def moves_under_tf32(where: str) -> torch.Tensor:  # what an unguarded float32 product does
        matmul = torch.backends.cuda.matmul
        on = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
        return values + (1e-3 if on else 0.0)

    judged = runner.check("judged under TF32", 1e-5, moves_under_tf32)
    reported = runner.check("reported under TF32", 1e-5, moves_under_tf32, tf32_tolerance=None)
    assert judged.error == 0 and judged.tf32_error == pytest.approx(1e-3, rel=0.05) and not judged.passed
    assert reported.tf32_error == judged.tf32_error and reported.passed

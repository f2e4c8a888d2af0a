"""`ads sweep`: every cell from the same x_T, resumable by config, one-line errors before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from unet_helpers import TINY, random_unet

from analytic_diffusion import generate as generate_module
from analytic_diffusion.cli import main
from analytic_diffusion.denoisers.wiener import Wiener
from analytic_diffusion.noise import sample_seed
from analytic_diffusion.sweep import load_spec, plan_sweep, run_sweep
from analytic_diffusion.unet import UNetCheckpoint, save_checkpoint

TINY_RUN = ["experiment.device=cpu", "dataset.subset_size=200", "sampling.num_samples=3", "sampling.batch_size=2",
            "sampling.num_inference_steps=2", "output.images=false"]
ANALYTIC = "nearest_dataset,optimal,scfdm,wiener,pca_locality"


def _sweep(tmp_path: Path, methods: str, grid=(), overrides=(), name="t", force=False):
    spec = load_spec(None, methods, None, list(grid), [*TINY_RUN, f"paths.runs={tmp_path}/runs", *overrides], name)
    return run_sweep(plan_sweep(spec), force=force)


def _summary(result) -> list[dict]:
    with open(result.plan.folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


class CountingGenerate:
    """Wraps generate.generate: counts the runs and can stop the sweep (Ctrl-C) in the n-th one."""

    def __init__(self, monkeypatch, interrupt_at: int | None = None):
        self.calls: list[str] = []
        self.original = generate_module.generate
        self.interrupt_at = interrupt_at
        monkeypatch.setattr(generate_module, "generate", self)

    def __call__(self, cfg):
        self.calls.append(cfg.experiment.run_name)
        if len(self.calls) == self.interrupt_at:
            original_sample = generate_module.sample

            def interrupted(*args, **kwargs):  # killed while sampling: the run directory exists, unfinished
                raise KeyboardInterrupt

            generate_module.sample = interrupted
            try:
                return self.original(cfg)
            finally:
                generate_module.sample = original_sample
        return self.original(cfg)


def test_every_cell_of_a_dataset_starts_from_the_same_noise_and_the_table_has_a_row_each(tmp_path):
    result = _sweep(tmp_path, ANALYTIC, overrides=["output.intermediates=true"])
    assert [o.cell.name for o in result.outcomes] == [f"{m}_mnist5k" for m in ANALYTIC.split(",")]
    # x_T of sample i is the first draw of its own generator, seeded from (seed, i), in every cell (scfdm too:
    # its perturbations come later from the same per-sample generators and shift nothing before them)
    expected = torch.stack([torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(sample_seed(0, i)))
                            for i in range(3)])
    for outcome in result.outcomes:
        trajectory = torch.load(outcome.cell.run_dir / "intermediates" / "trajectory.pt")
        assert torch.equal(trajectory["x_t"][:, 0], expected), outcome.cell.name
    rows = _summary(result)
    assert [r["method"] for r in rows] == ANALYTIC.split(",")
    assert list(rows[0]) == ["method", "dataset", "status", "seconds_per_step", "fit_seconds", "memorized_fraction",
                             "d1_median", "run", "error"]
    assert all(r["status"] == "ran" and float(r["seconds_per_step"]) > 0 and float(r["fit_seconds"]) >= 0 for r in rows)
    figure = Image.open(result.plan.folder / "comparison_mnist5k.png")
    assert figure.height > 5 * (84 + 4) and figure.width > 3 * (84 + 2)  # 5 rows of 3 samples, 28 px shown at 84
    assert "| scfdm | mnist5k | ran |" in (result.plan.folder / "summary.md").read_text()


def test_a_sweep_killed_in_its_third_cell_reruns_only_the_unfinished_cells(tmp_path, monkeypatch, caplog):
    methods, grid = "nearest_dataset,optimal,wiener", ["model.params.temperature=0.5,1"]
    counter = CountingGenerate(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, methods, grid)
    # the key two methods lack is skipped for them (one cell each), said once
    assert [r.message for r in caplog.records if "grid key" in r.message] == [
        "grid key model.params.temperature is not a parameter of nearest_dataset, wiener: skipped for them"]
    folder = tmp_path / "runs" / "sweeps" / "t"
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.params.temperature"], r["status"]) for r in rows] == [
        ("", "ran"), ("0.5", "ran"), ("1", "interrupted"), ("", "not run")]
    assert (folder / "optimal_mnist5k_temperature=1" / "INCOMPLETE").exists()
    finished = (folder / "optimal_mnist5k_temperature=0.5" / "samples.pt").stat().st_mtime_ns

    counter = CountingGenerate(monkeypatch)
    result = _sweep(tmp_path, methods, grid)
    assert counter.calls == ["optimal_mnist5k_temperature=1", "wiener_mnist5k"]
    assert [o.status for o in result.outcomes] == ["reused", "reused", "ran", "ran"]
    assert (folder / "optimal_mnist5k_temperature=0.5" / "samples.pt").stat().st_mtime_ns == finished

    counter = CountingGenerate(monkeypatch)  # one more grid value: only its cell is new
    _sweep(tmp_path, methods, ["model.params.temperature=0.5,1,2"])
    assert counter.calls == ["optimal_mnist5k_temperature=2"]

    counter = CountingGenerate(monkeypatch)  # a changed override changes every cell's config: all rerun
    result = _sweep(tmp_path, methods, grid, overrides=["sampling.num_samples=2"])
    assert len(counter.calls) == 4 and all(o.metrics["num_samples"] == 2 for o in result.outcomes)

    cell = folder / "wiener_mnist5k" / "config.yaml"  # one cell's config differs (an older version of the studio)
    cell.write_text(cell.read_text().replace("seed: 0", "seed: 5"))
    counter = CountingGenerate(monkeypatch)
    result = _sweep(tmp_path, methods, grid, overrides=["sampling.num_samples=2"])
    assert counter.calls == ["wiener_mnist5k"] and [o.status for o in result.outcomes] == ["reused"] * 3 + ["ran"]


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def broken(self, store):
        raise RuntimeError("eigendecomposition exploded")

    monkeypatch.setattr(Wiener, "fit", broken)
    result = _sweep(tmp_path, "wiener,nearest_dataset")
    rows = _summary(result)
    assert [(r["method"], r["status"]) for r in rows] == [("wiener", "failed"), ("nearest_dataset", "ran")]
    assert rows[0]["error"] == "RuntimeError: eigendecomposition exploded" and rows[0]["seconds_per_step"] == ""
    # the fit failed before the run directory was made: no folder to point to
    assert not (result.plan.folder / "wiener_mnist5k").exists()
    assert [r["run"] for r in rows] == ["", "nearest_dataset_mnist5k"]
    table = (result.plan.folder / "summary.md").read_text()
    assert "| failed | n/a | n/a | n/a | n/a | n/a | RuntimeError: eigendecomposition exploded |" in table
    assert (result.plan.folder / "comparison_mnist5k.png").is_file()


def test_a_sweep_with_a_failed_cell_exits_1_and_says_so(fresh_root, monkeypatch, capsys):
    def broken(self, store):
        raise RuntimeError("eigendecomposition exploded")

    monkeypatch.setattr(Wiener, "fit", broken)
    assert main(["sweep", "--methods", "wiener,nearest_dataset", "--name", "f", *TINY_RUN]) == 1
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert error == [f"error: 1 of 2 cells failed (wiener_mnist5k); their errors are in "
                     f"{fresh_root / 'runs' / 'sweeps' / 'f' / 'summary.md'}; rerun the same command to run only the "
                     "unfinished cells"]
    assert "sweep.yaml, summary.csv, summary.md" in captured.out


def test_a_subset_larger_than_the_dataset_fails_its_cell_instead_of_running_on_fewer_images(fresh_root, capsys):
    assert main(["sweep", "--methods", "optimal", "--name", "big", *TINY_RUN, "dataset.subset_size=6000"]) == 1
    table = (fresh_root / "runs" / "sweeps" / "big" / "summary.md").read_text()
    assert "dataset.subset_size=6000 but mnist5k (train) has 5000 images" in table
    assert not (fresh_root / "runs" / "sweeps" / "big" / "optimal_mnist5k" / "metrics.json").exists()


def test_memorization_of_a_sweep_folder_skips_cells_its_last_run_no_longer_has(tmp_path, caplog):
    from analytic_diffusion.memorization import memorization

    _sweep(tmp_path, "nearest_dataset,wiener")
    result = _sweep(tmp_path, "nearest_dataset")  # the grid changed: wiener's folder stays on disk
    assert (result.plan.folder / "wiener_mnist5k" / "samples.pt").is_file()
    with caplog.at_level("INFO", logger="analytic_diffusion"):
        analysis = memorization(result.plan.folder, None, ["experiment.device=cpu", f"paths.runs={tmp_path}/runs"])
    assert [a.name for a in analysis.analyses] == ["nearest_dataset_mnist5k"]
    assert analysis.out_dir.parent == tmp_path / "runs" / "memorization"  # beside other analyses, not in sweeps/
    assert "left out 1 run directories that are not cells of the sweep's last run (wiener_mnist5k)" in caplog.text


def test_with_a_backbone_the_sweep_adds_its_row_agreement_columns_and_curves(tmp_path):
    weights = {k: v.clone() for k, v in random_unet(size=28).state_dict().items()}
    save_checkpoint(tmp_path / "unet" / "checkpoint.pt", UNetCheckpoint(TINY, (1, 28, 28), weights, dict(weights)))
    result = _sweep(tmp_path, "nearest_dataset", overrides=[f"baseline.checkpoint={tmp_path / 'unet'}"])
    assert [o.cell.name for o in result.outcomes] == ["backbone_mnist5k", "nearest_dataset_mnist5k"]
    rows = _summary(result)
    assert [r["method"] for r in rows] == ["backbone", "nearest_dataset"]
    assert {"r2", "pearson_r", "mse"} <= set(rows[0]) and rows[0]["r2"] == ""  # the backbone is the reference
    backbone = torch.load(result.outcomes[0].cell.run_dir / "samples.pt")
    for outcome, row in zip(result.outcomes[1:], rows[1:]):
        metrics = json.loads((outcome.cell.run_dir / "metrics.json").read_text())
        assert float(row["r2"]) == pytest.approx(metrics["baseline"]["final"]["trajectory_r2"], rel=1e-6)
        assert float(row["mse"]) == pytest.approx(metrics["baseline"]["final"]["trajectory_mse"], rel=1e-6)
    backbone_metrics = result.outcomes[0].metrics
    assert backbone_metrics["method"] == "unet" and "baseline" not in backbone_metrics and backbone.shape == (3, 1, 28, 28)
    assert (result.plan.folder / "agreement_mnist5k.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "optimal,optimall"], "unknown model 'optimall' (did you mean 'optimal'?)"),
        (["--datasets", "mnist6k"], "unknown dataset 'mnist6k'"),
        (["--grid", "sampling.num_sample=1,2"], "unknown config key 'sampling.num_sample'"),
        (["--grid", "model.params.temperature=0.5,abc"], "bad value for 'model.params.temperature'"),
        (["--grid", "model.params.temperature=1,0"], "temperature"),
        (["--grid", "model.params.nope=1,2"], "grid key 'model.params.nope' is a parameter of none of the methods"),
        (["--grid", "model.params.temperature"], "is not of the form key=value1,value2"),
        (["experiment.run_name=mine"], "a sweep sets 'experiment.run_name' itself"),
        (["sampling.per_sample_seeds=false"], "a sweep always uses per-sample seeds"),
        (["--grid", "paths.runs=a,b"], "every cell of a sweep uses the same paths"),
        (["--grid", "sampling.num_samples=2,3", "sampling.num_samples=4"], "both a grid key and an override"),
        (["--datasets", "array"], "no config optimal/array.yaml"),
        (["--datasets", "cifar10"], "cifar10 not found or unreadable under"),
        (["-c", "sweeps/nope"], "config 'sweeps/nope' not found"),
        (["baseline.checkpoint=/nowhere"], "not found"),
        (["--methods", "els", "sampling.num_inference_steps=5"], "lists 10 sizes but sampling has 5 steps"),
    ],
)
def test_bad_sweeps_are_one_line_and_write_nothing(fresh_root, capsys, args, message):
    methods = [] if "--methods" in args else ["--methods", "optimal"]
    assert main(["sweep", *methods, *args, "experiment.device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and message in err, err
    assert not (fresh_root / "runs").exists()


def test_a_sweep_file_with_an_unknown_key_is_one_line(tmp_path, fresh_root, capsys):
    (tmp_path / "s.yaml").write_text("method: [optimal]\n")
    assert main(["sweep", "-c", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: unknown key 'method' in sweep file {tmp_path / 's.yaml'} (did you mean 'methods'?); " \
                  "a sweep file has name, methods, datasets, grid, overrides"
    assert not (fresh_root / "runs").exists()


def test_force_reruns_complete_cells(tmp_path, monkeypatch, caplog):
    _sweep(tmp_path, "nearest_dataset")
    counter = CountingGenerate(monkeypatch)
    caplog.set_level("INFO", "analytic_diffusion")
    assert [o.status for o in _sweep(tmp_path, "nearest_dataset").outcomes] == ["reused"] and not counter.calls
    assert "cell nearest_dataset_mnist5k reused (the same config), computed in one process" in caplog.messages
    assert [o.status for o in _sweep(tmp_path, "nearest_dataset", force=True).outcomes] == ["ran"]
    assert counter.calls == ["nearest_dataset_mnist5k"]


def test_a_different_sweep_in_the_same_folder_is_announced(tmp_path, caplog):
    """A second, different sweep under the same name replaces the folder's summary: one warning says so and points
    to --name; rerunning the same sweep says nothing."""
    _sweep(tmp_path, "nearest_dataset")
    caplog.set_level("INFO", "analytic_diffusion")
    _sweep(tmp_path, "nearest_dataset")
    assert not [m for m in caplog.messages if "held a different sweep" in m]
    _sweep(tmp_path, "wiener")
    [warning] = [m for m in caplog.messages if "held a different sweep" in m]
    assert "its other cells stay in the folder unlisted; give each sweep its own folder with --name NAME" in warning


def test_the_sweep_files_shipped_in_configs_plan_cleanly():
    assert load_spec().methods == ANALYTIC.split(",")
    sizes = plan_sweep(load_spec("sweeps/subset_size"))
    assert [(c.method, c.config.dataset.subset_size) for c in sizes.cells] == [
        ("optimal", 100), ("optimal", 1000), ("optimal", 5000),
        ("pca_locality", 100), ("pca_locality", 1000), ("pca_locality", 5000)]


def test_the_command_line_wins_over_the_sweep_file():
    """A --grid key replaces the file's fixed override of that key (the default sweep sets num_inference_steps),
    and a command-line override replaces the file's grid over its key."""
    from analytic_diffusion.sweep.spec import load_spec

    spec = load_spec(grid=["sampling.num_inference_steps=3,5"])
    assert spec.grid == {"sampling.num_inference_steps": ["3", "5"]}
    assert not any(o.startswith("sampling.num_inference_steps=") for o in spec.overrides)
    assert "sampling.num_samples=8" in spec.overrides
    spec = load_spec("sweeps/subset_size", overrides=["dataset.subset_size=100"])
    assert "dataset.subset_size" not in spec.grid and spec.overrides[-1] == "dataset.subset_size=100"


def test_a_path_in_the_grid_names_cells_and_labels_by_its_last_two_parts(tmp_path):
    files = []
    for run in ("calibrate_a", "calibrate_b"):
        (tmp_path / "deep" / "runs" / run).mkdir(parents=True)
        files.append(tmp_path / "deep" / "runs" / run / "calibration.json")
        files[-1].write_text(json.dumps({"timesteps": list(range(900, -1, -100)), "patch_size": [3] * 10}))
    spec = load_spec(None, "els,optimal", None, [f"model.params.patch_size={files[0]},{files[1]}"],
                     ["sampling.num_inference_steps=10"], "paths")
    cells = [c for c in plan_sweep(spec).cells if c.method == "els"]
    assert [c.name for c in cells] == ["els_mnist5k_patch_size=calibrate_a-calibration.json",
                                       "els_mnist5k_patch_size=calibrate_b-calibration.json"]
    assert [c.label for c in cells] == ["els  patch_size=calibrate_a/calibration.json",
                                        "els  patch_size=calibrate_b/calibration.json"]
    assert [c.config.model.params.patch_size for c in cells] == [str(f) for f in files]  # the run uses the full path


def test_sweep_yaml_lists_each_override_once_and_reads_back_as_the_same_sweep(tmp_path):
    """A command-line override of a key the sweep file sets replaces it (sweep.yaml listed both), and sweep.yaml
    read back as a sweep file gives the same cells."""
    from analytic_diffusion.config import to_yaml
    from analytic_diffusion.sweep.job import _spec_yaml
    from analytic_diffusion.sweep.spec import load_spec, plan_sweep

    spec = load_spec(methods="nearest_dataset", overrides=["sampling.num_samples=2", "dataset.subset_size=60",
                                                           "sampling.num_samples=3"])
    assert spec.overrides == ["sampling.batch_size=8", "sampling.num_inference_steps=10", "dataset.subset_size=60",
                              "sampling.num_samples=3"]
    plan = plan_sweep(spec)
    (tmp_path / "sweep.yaml").write_text(_spec_yaml(plan))
    again = plan_sweep(load_spec(str(tmp_path / "sweep.yaml")))
    assert again.spec == spec
    assert [to_yaml(c.config) for c in again.cells] == [to_yaml(c.config) for c in plan.cells]

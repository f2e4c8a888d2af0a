"""ads generate on two gloo processes (the torchrun environment, spawned here) against the one-process run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config
from analytic_diffusion.distributed.group import Ranks
from analytic_diffusion.distributed.samples import check_samples_strategy, idle_ranks_warning
from analytic_diffusion.errors import StudioError
from analytic_diffusion.runs import INCOMPLETE
from analytic_diffusion.sampling import make_scheduler

SMALL = ["sampling.num_samples=2", "sampling.batch_size=1", "sampling.num_inference_steps=2",
         "sampling.per_sample_seeds=true", "output.images=false", "output.grid=false", "output.masks=false",
         "output.patches=false", "experiment.append_timestamp=false"]
TIMINGS = ("fit_seconds", "sampling_seconds", "seconds_per_step", "store")
DISTRIBUTED = {"world_size": 2, "backend": "gloo"}  # metrics.json's "distributed", with the strategy


def _array(folder: Path, name: str, shape: tuple[int, ...], seed: int) -> list[str]:
    """The dataset overrides of a small uint8 store: smooth random images (coarse blocks plus noise), [N, H, W] or
    [N, H, W, 3], saved as .npy."""
    generator = np.random.default_rng(seed)
    count, height, width, *channels = shape
    coarse = generator.integers(0, 256, size=(count, height // 4, width // 4, *channels)).astype(np.float64)
    block = np.ones((4, 4, *[1 for _ in channels]))
    images = np.stack([np.kron(image, block) for image in coarse]) + generator.normal(0, 20, size=shape)
    path = folder / f"{name}.npy"
    np.save(path, images.clip(0, 255).astype(np.uint8))
    return ["dataset.name=array", f"dataset.path={path}", "dataset.subset_size=null"]


def _sparse(folder: Path) -> list[str]:
    """60 black 12 x 12 images with a random 4 x 4 centre: most 3 x 3 windows are black, so ELS deduplicates its
    dictionary (on each shard separately under the dataset strategy)."""
    images = np.zeros((60, 12, 12), dtype=np.uint8)
    images[:, 4:8, 4:8] = np.random.default_rng(2).integers(1, 256, size=(60, 4, 4))
    np.save(folder / "sparse.npy", images)
    return ["dataset.name=array", f"dataset.path={folder / 'sparse.npy'}", "dataset.subset_size=null"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Tiny stores: 60 grey 8 x 8 images, 60 colour ones (3 x 8 x 8) for the colour paths of the patch methods, 60
    sparse 12 x 12 ones for ELS's deduplicated dictionary; and a random tiny UNet for the grey ones."""
    from unet_helpers import TINY, random_unet

    from analytic_diffusion.unet import UNetCheckpoint, save_checkpoint

    folder = tmp_path_factory.mktemp("stores")
    weights = {k: v.clone() for k, v in random_unet(size=8).state_dict().items()}
    save_checkpoint(folder / "unet" / "checkpoint.pt", UNetCheckpoint(TINY, (1, 8, 8), weights, dict(weights)))
    return {"grey": _array(folder, "grey", (60, 8, 8), 0), "colour": _array(folder, "colour", (60, 8, 8, 3), 1),
            "sparse": _sparse(folder), "unet": [f"model.params.checkpoint={folder / 'unet'}"],
            "baseline": [f"baseline.checkpoint={folder / 'unet'}"]}


# Every method, each form the dataset strategy merges differently: (run name, config, store, overrides)
METHODS = [
    ("nearest_dataset", "nearest_dataset", "grey", []),
    ("nearest_cdist", "nearest_dataset", "grey", ["model.params.backend=cdist"]),
    ("nearest_faiss", "nearest_dataset", "grey", ["model.params.backend=faiss"]),
    ("optimal", "optimal", "grey", []),
    ("optimal_topk", "optimal", "grey", ["model.params.mode=topk", "model.params.num_neighbors=7"]),
    ("scfdm", "scfdm", "grey", ["model.params.num_noise=3"]),
    ("wiener", "wiener", "grey", []),
    ("pca_locality", "pca_locality", "grey", []),
    ("local_score", "local_score", "colour", ["model.params.patch_size=3"]),
    ("els_circular", "els", "sparse", ["model.params.patch_size=3", "model.params.boundary=circular"]),
    ("els_broken", "els", "colour", ["model.params.patch_size=3", "model.params.boundary=broken"]),
    ("pspc", "pspc", "colour", ["model.params.patch_size=4"]),
    ("unet", "unet", "grey", []),
]
BIT_IDENTICAL = {"nearest_dataset", "nearest_cdist", "nearest_faiss", "unet"}



def _overrides(stores: dict[str, list[str]], name: str, store: str, extra: list[str]) -> list[str]:
    return [*stores[store], *(stores["unet"] if name == "unet" else []), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail_in_sweeps(rank: int, kill: bool = False) -> None:
    """Wiener's fit raises on every rank; rank 1's optimal posterior mean (one process's, or its shard's) raises
    (or its process dies) at every second call."""
    from analytic_diffusion.denoisers.optimal import OptimalDenoiser
    from analytic_diffusion.denoisers.wiener import Wiener

    def broken(self, store):
        raise RuntimeError("eigendecomposition exploded")

    Wiener.fit = broken
    if rank == 1:
        original, calls = OptimalDenoiser.posterior_mean, []

        def posterior_mean(self, *args, **kwargs):
            calls.append(1)
            if len(calls) % 2 == 0:
                if kill:
                    os._exit(9)
                raise ValueError("injected failure")
            return original(self, *args, **kwargs)

        OptimalDenoiser.posterior_mean = posterior_mean


def _fail_on_rank_one(fault: str) -> None:
    """Rank 1's optimal denoiser raises (or its process dies) at its second call."""
    from analytic_diffusion.denoisers.optimal import OptimalDenoiser

    original, calls = OptimalDenoiser.denoise, []

    def denoise(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if fault == "kill":
                os._exit(9)
            raise ValueError("injected failure")
        return original(self, *args, **kwargs)

    OptimalDenoiser.denoise = denoise


def _bug_on_every_rank() -> None:
    """optimal's first denoising step raises a plain RuntimeError on every rank (after the ranks' last wait for
    each other: under `samples` each rank fits and samples alone)."""
    from analytic_diffusion.denoisers.optimal import OptimalDenoiser

    def denoise(self, *args, **kwargs):
        raise RuntimeError("posterior exploded")

    OptimalDenoiser.denoise = denoise


def _slow_rank_zero(seconds: float) -> None:
    """Each of rank 0's optimal steps takes `seconds` longer (at scale: one more sampling batch than its peer, or
    a rank that hangs)."""
    from analytic_diffusion.denoisers.optimal import OptimalDenoiser

    original = OptimalDenoiser.denoise

    def denoise(self, *args, **kwargs):
        time.sleep(seconds)
        return original(self, *args, **kwargs)

    OptimalDenoiser.denoise = denoise


def _time_sources(rank: int, out: str) -> None:
    """Each rank writes when its sweep's source check (where a dataset is downloaded) began and ended; rank 0's
    takes 1 s, as a download would."""
    from analytic_diffusion.sweep import spec

    original = spec.dataset_source

    def dataset_source(request):
        began = time.time()
        if rank == 0:
            time.sleep(1.0)
        source = original(request)
        with open(Path(out, f"sources{rank}.txt"), "a") as f:
            f.write(f"{began} {time.time()}\n")
        return source

    spec.dataset_source = dataset_source


def _rank(rank: int, runs: list[tuple[str, list[str]]], ports: list[int], out: str, fault: str | None) -> None:
    """One rank: the torchrun environment (with torchrun's error file of the rank), then `ads generate` for each
    (config, overrides) (or the command line itself where the config is None); results as JSON."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      TORCHELASTIC_ERROR_FILE=str(Path(out, f"error{rank}.json")))
    if fault in ("sweeps", "sweeps_kill"):
        _fail_in_sweeps(rank, kill=fault == "sweeps_kill")
    elif fault == "sources":
        _time_sources(rank, out)
    elif fault == "bug":
        _bug_on_every_rank()
    elif fault in ("slow", "hung"):
        if rank == 0:
            _slow_rank_zero(0.8 if fault == "slow" else 6.0)
    elif fault and rank == 1:
        _fail_on_rank_one(fault)
    results = []
    for (config, overrides), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        stderr, started = io.StringIO(), time.monotonic()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["generate", "-c", config, *overrides] if config else overrides)
            except Exception as exc:  # main re-raises no error under torchrun: a failure of the test itself
                code = f"{type(exc).__name__}: {exc}"
        results.append({"code": code, "stderr": stderr.getvalue(), "seconds": time.monotonic() - started})
        if fault == "bug" and rank == 0:  # rank 0 holds the group's store here (torchrun's agent does): keep it
            time.sleep(2.0)  # up while rank 1 reaches its own failure instead of finding the store gone
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _launch(tmp_path: Path, runs: list[tuple[str, list[str]]], fault: str | None = None) -> list[list[dict]]:
    """Run the ranks as two forked processes (no second import of torch); each rank's results, per run."""
    ports = [_free_port() for _ in runs]
    context = mp.start_processes(_rank, (runs, ports, str(tmp_path), fault), nprocs=2, join=False, start_method="fork")
    for process in context.processes:
        process.join(120)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) if (tmp_path / f"rank{r}.json").exists() else None
            for r in range(2)]


def _one_process(config: str, overrides: list[str]) -> None:
    """The reference run, with one thread as each rank has (a network's convolutions round differently with more)."""
    _one_process_main(["generate", "-c", config, *overrides])


def _one_process_main(argv: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _run_dir(name: str, method: str) -> Path:
    return Path(os.environ["ADS_ROOT"]) / "runs" / method / name


def _without_timings(metrics: dict) -> dict:
    kept = {k: v for k, v in metrics.items() if k not in (*TIMINGS, "distributed")}
    if "baseline" in kept:
        kept["baseline"] = {k: v for k, v in kept["baseline"].items() if k != "seconds"}
    kept["steps"] = [{k: v for k, v in step.items() if k != "seconds"} for step in metrics["steps"]]
    return kept


def test_samples_strategy_equals_one_process_bit_for_bit(tmp_path: Path, stores: dict[str, list[str]]) -> None:
    """For every method, rank 0 writes one run directory whose samples and metrics (timings aside) are the
    one-process run's, bit for bit."""
    runs = [(name, f"{config}/mnist5k", [*SMALL, *_overrides(stores, name, store, extra)])
            for name, config, store, extra in METHODS if name not in ("nearest_cdist", "nearest_faiss", "optimal_topk")]
    runs.append(("optimal_baseline", "optimal/mnist5k", [*SMALL, *stores["grey"], *stores["baseline"]]))
    runs.append(("optimal_one_batch", "optimal/mnist5k", [*SMALL, *stores["grey"], "sampling.batch_size=2"]))
    for name, config, overrides in runs:
        _one_process(config, [*overrides, f"experiment.run_name={name}_s1"])
    ranks = _launch(tmp_path, [(config, [*overrides, f"experiment.run_name={name}_s2"])
                               for name, config, overrides in runs])
    assert [[run["code"] for run in rank] for rank in ranks] == [[0] * len(runs)] * 2, ranks
    assert [run["stderr"] for run in ranks[1]] == [""] * len(runs)  # rank 0 says each line once (e.g. warnings)
    for name, config, _ in runs:
        method = config.split("/")[0]
        one, two = _run_dir(f"{name}_s1", method), _run_dir(f"{name}_s2", method)
        assert not (two / INCOMPLETE).exists()
        assert torch.equal(torch.load(one / "samples.pt"), torch.load(two / "samples.pt")), name
        metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
        if name == "optimal_one_batch":  # one batch for two ranks: rank 1 idles, and the run says so
            assert metrics[1]["warnings"] == [*metrics[0]["warnings"],
                "1 sampling batch for 2 ranks: 1 rank idle (lower sampling.batch_size to give every rank a batch)"]
            metrics[1]["warnings"] = metrics[0]["warnings"]
        assert _without_timings(metrics[0]) == _without_timings(metrics[1]), name
        assert metrics[0]["distributed"] is None and metrics[1]["distributed"] == {**DISTRIBUTED, "strategy": "samples"}
        assert ("baseline" in metrics[1]) == (name == "optimal_baseline")  # each rank compared its own batches


def test_dataset_strategy_equals_one_process(tmp_path: Path, stores: dict[str, list[str]]) -> None:
    """Each rank holds half the store; every method's samples match the one-process run's (nearest_dataset with
    each backend, unet and every k-NN index bit for bit, the others within 1e-6), and the sample records, the
    diagnostics of every step and the patch figure's largest-weight windows too."""
    common = [*SMALL, "sampling.timestep_spacing=trailing", "sampling.batch_size=2"]
    figure = {"els_broken": ["output.patches=true"], "pspc": ["output.patches=true"]}
    runs = [(name, f"{config}/mnist5k", [*common, *_overrides(stores, name, store, extra), *figure.get(name, [])])
            for name, config, store, extra in METHODS]
    runs.append(("optimal_baseline", "optimal/mnist5k", [*common, *stores["grey"], *stores["baseline"]]))
    # 34 perturbed queries per batch: above the integer kernel's 32, the shards agree on the probe's path
    runs.append(("scfdm_probe", "scfdm/mnist5k", [*common, *stores["grey"], "model.params.num_noise=17",
                                                 "sampling.timestep_spacing=leading"]))
    # 34 queries on 600 digits: at t = 0 every shard's probe finds the weight concentrated, they agree, and the
    # integer kernel runs with the smallest-distance exchange (at t = 500 they agree on the float path)
    runs.append(("optimal_probe", "optimal/mnist5k", [*common, "dataset.subset_size=600", "sampling.num_samples=34",
                                                     "sampling.batch_size=34", "sampling.timestep_spacing=leading"]))
    # one step at t = 0, a float64 step (the aligned path of broken ELS's edges keeps float32 sums there)
    runs.append(("els_broken_t0", "els/mnist5k", [*common, *stores["sparse"], "model.params.patch_size=3",
                                                  "model.params.boundary=broken", "sampling.num_inference_steps=1",
                                                  "sampling.timestep_spacing=leading"]))
    # a calibration fitted for another method and dataset: its warning once, from rank 0
    timesteps = make_scheduler(load_config("els/mnist5k", common).sampling).timesteps.tolist()
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"timesteps": timesteps, "patch_size": [3] * len(timesteps),
                                       "method": "local_score", "dataset": "cifar10"}))
    runs.append(("els_calibrated", "els/mnist5k", [*common, *stores["colour"],
                                                   f"model.params.patch_size={calibration}"]))
    for name, config, overrides in runs:  # the one-process runs, with a cache of their own (statistics computed apart)
        _one_process(config, [*overrides, f"experiment.run_name={name}_one"])
    ranks = _launch(tmp_path, [(config, [*overrides, f"experiment.run_name={name}_dataset",
                                         "distributed.strategy=dataset", f"paths.cache={tmp_path / 'sharded_cache'}"])
                               for name, config, overrides in runs])
    assert [[run["code"] for run in rank] for rank in ranks] == [[0] * len(runs)] * 2, ranks
    assert [run["stderr"] for run in ranks[1]] == [""] * len(runs)  # rank 0 says each line once
    assert ranks[0][-1]["stderr"].count("was calibrated for local_score on cifar10") == 1, ranks[0][-1]["stderr"]
    for name, config, _ in runs:
        method = config.split("/")[0]
        one, two = _run_dir(f"{name}_one", method), _run_dir(f"{name}_dataset", method)
        expected, actual = torch.load(one / "samples.pt"), torch.load(two / "samples.pt")
        if name in BIT_IDENTICAL:
            assert torch.equal(expected, actual), name
        else:
            # the patch methods sum in float32: circular ELS on the sparse store is 8.3e-7 off (other sparse stores
            # up to 1.1e-6: the last steps amplify the per-step rounding, docs/distributed.md)
            assert (expected - actual).abs().max() <= 1e-6, (name, (expected - actual).abs().max())
        metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
        records = [m["samples"] for m in metrics]
        for key in ("nearest_train_index", "second_train_index", "nearest_index", "top_index", "patch_size"):
            assert [r.get(key) for r in records[0]] == [r.get(key) for r in records[1]], (name, key)
        for key in ("nearest_train_distance", "effective_count", "top_weight", "mask_mean_size", "effective_patches"):
            for a, b in zip(records[0], records[1]):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (name, key)
        assert metrics[0].get("top_patches") == metrics[1].get("top_patches"), name
        assert (name in figure) == (two / "patches.png").exists(), name
        if name == "optimal_baseline":  # rank 0 compared its x0_hat with the baseline's (all ranks hold the same)
            for key in ("final", "final_median"):
                assert metrics[1]["baseline"][key] == pytest.approx(metrics[0]["baseline"][key], rel=1e-5), key
            assert (two / "comparison.png").exists() and (two / "side_by_side.png").exists()
        for a, b in zip(metrics[0]["steps"], metrics[1]["steps"]):  # every step's diagnostics, not only the last
            for key, values in a["diagnostics"].items():
                assert b["diagnostics"][key] == pytest.approx(values, rel=1e-5, abs=1e-9), (name, key)


def test_dataset_strategy_refuses_a_method_without_a_sharded_form() -> None:
    from types import SimpleNamespace

    from analytic_diffusion.distributed.dataset import SUPPORTED, build_sharded_denoiser
    from analytic_diffusion.denoisers import DENOISERS, load_all

    load_all()
    assert set(SUPPORTED) == set(DENOISERS)  # every method has one today
    cfg = SimpleNamespace(model=SimpleNamespace(name="new_method", params=None))
    with pytest.raises(StudioError, match="supports els, local_score, nearest_dataset, optimal, pca_locality, pspc"):
        build_sharded_denoiser(cfg, None, torch.device("cpu"), Ranks(0, 2, 0, "dataset", "gloo"))


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failed_rank_stops_the_other_with_one_line(tmp_path: Path, fault: str, stores: dict[str, list[str]]) -> None:
    """Rank 1 raises (or dies) at its second step: rank 0 stops with one line naming rank 1, well within the
    timeout when rank 1 raised, right after it when rank 1 died without a word (rank 0 waits at the final gather
    while rank 1 makes progress; under torchrun its agent stops rank 0 at once), and the run directory stays
    INCOMPLETE."""
    name = f"failed_{fault}"
    timeout = 30 if fault == "raise" else 4
    overrides = [*SMALL, *stores["grey"], f"experiment.run_name={name}", f"distributed.timeout_seconds={timeout}"]
    rank0, rank1 = _launch(tmp_path, [("optimal/mnist5k", overrides)], fault)
    result = rank0[0]
    assert result["code"] == 2
    lines = [line for line in result["stderr"].splitlines() if "error" in line.lower()]  # log lines aside
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    if fault == "raise":  # rank 1's own error is a bug's: status 1, its traceback in torchrun's error file
        assert "rank 1 of 2 failed: ValueError: injected failure; rank 0 stopped" in lines[0]
        assert rank1[0]["code"] == 1 and rank1[0]["stderr"] == ""
        recorded = json.loads((tmp_path / "error1.json").read_text())["message"]
        assert recorded["message"] == "ValueError: injected failure"
        assert "Traceback" in recorded["extraInfo"]["py_callstack"]
    else:
        assert "rank 1 of 2 made no progress (killed, or hung) within distributed.timeout_seconds=4" in lines[0]
        assert rank1 is None
    assert result["seconds"] < 30
    assert (_run_dir(name, "optimal") / INCOMPLETE).exists()
    assert not (_run_dir(name, "optimal") / "samples.pt").exists()


def test_a_rank_waits_for_a_slower_one_while_it_progresses_and_stops_when_it_hangs(
        tmp_path: Path, stores: dict[str, list[str]]) -> None:
    """Under `samples` with a 2 s timeout, rank 0's steps take 0.8 s longer: rank 1 finishes its share about 3 s
    first (as with one batch fewer) and waits at the gather while rank 0 makes progress; the run completes with
    the one-process samples. When one step of rank 0 takes 6 s (it hangs), rank 1 stops after the timeout without
    waiting for it, and rank 0 (which speaks) says why in one line when it wakes."""
    overrides = [*SMALL, *stores["grey"], "sampling.num_inference_steps=4", "distributed.timeout_seconds=2"]
    _one_process("optimal/mnist5k", [*overrides, "experiment.run_name=slow_s1"])
    rank0, rank1 = _launch(tmp_path, [("optimal/mnist5k", [*overrides, "experiment.run_name=slow_s2"])], "slow")
    assert rank0[0]["code"] == 0 and rank1[0]["code"] == 0, (rank0, rank1)
    one, two = _run_dir("slow_s1", "optimal"), _run_dir("slow_s2", "optimal")
    assert torch.equal(torch.load(one / "samples.pt"), torch.load(two / "samples.pt"))
    hung = tmp_path / "hung"
    hung.mkdir()
    rank0, rank1 = _launch(hung, [("optimal/mnist5k", [*overrides, "experiment.run_name=hung_s2"])], "hung")
    assert rank1[0]["code"] == 2 and rank1[0]["seconds"] < 6, rank1
    lines = [line for line in rank0[0]["stderr"].splitlines() if line.startswith("error: ")]
    assert lines == ["error: rank 0 of 2 made no progress (killed, or hung) within distributed.timeout_seconds=2 "
                     "while rank 1 waited for it (gather_batches); rank 0 stopped"], rank0


def test_samples_strategy_requires_per_sample_seeds_and_warns_of_idle_ranks() -> None:
    with pytest.raises(StudioError) as refused:  # the default strategy: both ways out, as overrides
        check_samples_strategy(False)
    assert "distributed.strategy=samples (the default)" in str(refused.value)
    assert "add sampling.per_sample_seeds=true" in str(refused.value)
    assert "or distributed.strategy=dataset (the samples of this command in one process" in str(refused.value)
    check_samples_strategy(True)
    assert idle_ranks_warning(2, Ranks(0, 2, 0, "samples", "gloo")) is None
    assert idle_ranks_warning(1, Ranks(0, 3, 0, "samples", "gloo")) == (
        "1 sampling batch for 3 ranks: 2 ranks idle (lower sampling.batch_size to give every rank a batch)")


def test_bad_distributed_options_are_one_line_errors_even_in_one_process(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "-c", "optimal/mnist5k", "distributed.strategy=sample"]) == 2
    assert "unknown distributed.strategy 'sample' (did you mean 'samples'?)" in capsys.readouterr().err
    for bad in ("0", "inf", "nan"):
        assert main(["generate", "-c", "optimal/mnist5k", f"distributed.timeout_seconds={bad}"]) == 2
        assert "distributed.timeout_seconds must be a finite number of seconds > 0" in capsys.readouterr().err


def test_share_splits_contiguously() -> None:
    shares = [list(Ranks(r, 3, r, "samples", "gloo").share(8)) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_too_few_images_for_the_ranks_stop_every_rank_alike() -> None:
    """Every rank (not only the one whose shard is empty) refuses, so rank 0 never creates a run directory."""
    from analytic_diffusion.data.store import DatasetStore
    from analytic_diffusion.distributed.dataset import shard_of

    store = DatasetStore.from_tensor(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    for rank in range(2):
        with pytest.raises(StudioError, match="1 images cannot be split over 2 ranks"):
            shard_of(store, Ranks(rank, 2, rank, "dataset", "gloo"))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_only_rank_0_prints_the_error_line(monkeypatch, capsys, rank) -> None:
    """Every rank refuses the same bad input; one line in all, from rank 0 (rank 0 also reports another rank's
    failure, through the failure it publishes)."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["calibrate"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: ads calibrate does not run under torchrun; only ads generate, ads sweep and ads "
                   "memorization do (docs/distributed.md): launch it as one process\n" if rank == "0" else "")


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_an_interrupt_is_said_once(monkeypatch, capsys, rank) -> None:
    """Ctrl-C reaches every rank of a launch: only rank 0 (or the one process) says so; every rank exits 130."""
    import analytic_diffusion.cli as cli

    if rank is not None:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert main(["generate", "-c", "optimal/mnist5k"]) == 130
    err = capsys.readouterr().err
    assert err == ("" if rank == "1" else
                   "interrupted; a run directory, if one was created, stays marked INCOMPLETE\n")


def test_memorization_under_both_strategies_equals_one_process(tmp_path: Path, stores: dict[str, list[str]],
                                                               fresh_root: Path) -> None:
    """ads memorization of a run on two ranks (the queries split, or the store's shards): rank 0 writes the one
    analysis folder, whose table and summary (timings aside) are the one-process analysis's."""
    _one_process("nearest_dataset/mnist5k", [*SMALL, *stores["grey"], "sampling.num_samples=5",
                                              "experiment.run_name=memorized"])
    run = _run_dir("memorized", "nearest_dataset")
    analyses = fresh_root / "runs" / "memorization"
    settings = ["memorization.reference_size=7", "memorization.num_neighbors=3"]

    assert main(["memorization", str(run), *settings]) == 0
    (one,) = analyses.iterdir()
    too_small = ["distributed.strategy=dataset", "dataset.subset_size=1"]  # 1 image cannot be split over 2 ranks
    ranks = _launch(tmp_path, [(None, ["memorization", str(run), *settings, f"distributed.strategy={strategy}"])
                               for strategy in ("samples", "dataset")]
                    + [(None, ["memorization", str(run), *settings, *too_small])])
    assert [[run["code"] for run in rank] for rank in ranks] == [[0, 0, 2]] * 2, ranks
    distributed = [folder for folder in analyses.iterdir() if folder != one]
    assert len(distributed) == 2  # rank 0 wrote one folder per run, the other rank none; none for the refused one
    for folder in distributed:
        assert not (folder / INCOMPLETE).exists()
        assert (folder / "memorization.csv").read_text() == (one / "memorization.csv").read_text()
        summaries = [json.loads((f / "memorization.json").read_text()) for f in (one, folder)]
        for summary in summaries:
            del summary["search_seconds"]
        assert summaries[0] == summaries[1]
        assert (folder / "neighbours.png").exists() and (folder / "distances.png").exists()


SWEEP = ["--methods", "optimal,wiener", "dataset.subset_size=60", "sampling.num_samples=4", "sampling.batch_size=2",
         "sampling.num_inference_steps=2", "output.images=false", "output.grid=false"]


def _sweep_rows(name: str) -> list[dict]:
    with open(Path(os.environ["ADS_ROOT"]) / "runs" / "sweeps" / name / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_under_both_strategies_equals_one_process(tmp_path: Path) -> None:
    """ads sweep on two ranks: every cell runs distributed, rank 0 writes the sweep folder, the cells and the table
    of a one-process sweep (samples bit for bit with `samples`, within 1e-6 with `dataset`), and each cell's
    metrics.json says how it ran. A sweep that cannot run on two ranks stops with one line before any folder."""
    sweeps = Path(os.environ["ADS_ROOT"]) / "runs" / "sweeps"
    _one_process_main(["sweep", *SWEEP, "--name", "one"])
    expected = _sweep_rows("one")
    ranks = _launch(tmp_path, [(None, ["sweep", *SWEEP, "--name", strategy, f"distributed.strategy={strategy}"])
                               for strategy in ("samples", "dataset")]
                    + [(None, ["sweep", *SWEEP, "sampling.per_sample_seeds=false", "--name", "seeds"]),
                       (None, ["sweep", *SWEEP, "--name", "one"])])  # the one-process cells: the same configs
    assert [[run["code"] for run in rank] for rank in ranks] == [[0, 0, 2, 0]] * 2, ranks
    for method in ("optimal", "wiener"):  # reused (samples: bit for bit), and rank 0 says how they were computed
        assert f"cell {method}_mnist5k reused (the same config), computed in one process" in ranks[0][3]["stderr"]
    assert [run["stderr"] for run in ranks[1]] == ["", "", "", ""]
    assert ranks[0][2]["stderr"].strip().splitlines()[-1] == (
        "error: a sweep always uses per-sample seeds (every cell of a dataset from the same x_T); remove "
        "sampling.per_sample_seeds")
    assert ranks[1][2]["stderr"] == ""
    assert not (sweeps / "seeds").exists()
    for strategy in ("samples", "dataset"):
        rows = _sweep_rows(strategy)
        assert [{k: v for k, v in row.items() if k not in ("seconds_per_step", "fit_seconds")} for row in rows] == [
            {k: v for k, v in row.items() if k not in ("seconds_per_step", "fit_seconds")} for row in expected]
        assert (sweeps / strategy / "comparison_mnist5k.png").is_file()
        for row in rows:
            one, two = sweeps / "one" / row["run"], sweeps / strategy / row["run"]
            assert not (two / INCOMPLETE).exists()
            expected_samples, samples = torch.load(one / "samples.pt"), torch.load(two / "samples.pt")
            if strategy == "samples":
                assert torch.equal(expected_samples, samples), row["run"]
            else:
                assert (expected_samples - samples).abs().max() <= 1e-6, row["run"]
            metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
            assert metrics[0]["distributed"] is None
            assert metrics[1]["distributed"] == {**DISTRIBUTED, "strategy": strategy}


def test_a_failing_cell_of_a_sweep_on_two_ranks(tmp_path: Path) -> None:
    """Where the ranks can agree (a fit that fails on both, a rank that fails while sampling its own batches), the
    cell is recorded as in one process and the sweep goes on; a rank that fails inside the `dataset` strategy's
    collectives stops both, with one line, the cell INCOMPLETE and the summary written (the rest not run)."""
    settings = ["dataset.subset_size=60", "sampling.num_samples=4", "sampling.batch_size=2",
                "sampling.num_inference_steps=2", "output.images=false", "output.grid=false",
                "distributed.timeout_seconds=30"]
    runs = [(None, ["sweep", "--methods", "wiener,optimal,nearest_dataset", "--name", "agreed", *settings]),
            (None, ["sweep", "--methods", "optimal,nearest_dataset", "--name", "stopped", *settings,
                    "distributed.strategy=dataset"])]
    (agreed0, stopped0), (agreed1, stopped1) = _launch(tmp_path, runs, fault="sweeps")
    sweeps = Path(os.environ["ADS_ROOT"]) / "runs" / "sweeps"
    assert (agreed0["code"], agreed1["code"]) == (1, 0), (agreed0, agreed1)
    assert [(r["method"], r["status"], r["error"]) for r in _sweep_rows("agreed")] == [
        ("wiener", "failed", "RuntimeError: eigendecomposition exploded"),  # the one-process line
        ("optimal", "failed", "rank 1 of 2 failed: ValueError: injected failure"),
        ("nearest_dataset", "ran", "")]
    assert (sweeps / "agreed" / "optimal_mnist5k" / INCOMPLETE).exists()
    assert not (sweeps / "agreed" / "wiener_mnist5k").exists()  # its checks failed: nothing written
    assert stopped0["code"] == 2 and stopped1["code"] == 1 and stopped1["stderr"] == ""
    lines = [line for line in stopped0["stderr"].splitlines() if "error" in line.lower()]
    assert lines == ["error: rank 1 of 2 failed: ValueError: injected failure; rank 0 stopped"], stopped0["stderr"]
    assert stopped0["seconds"] < 30
    assert [(r["method"], r["status"]) for r in _sweep_rows("stopped")] == [("optimal", "failed"),
                                                                           ("nearest_dataset", "not run")]
    assert (sweeps / "stopped" / "optimal_mnist5k" / INCOMPLETE).exists()


def test_a_rank_that_dies_in_a_sweep_stops_the_other_within_the_timeout(tmp_path: Path) -> None:
    """Rank 1 dies while sampling its batches (`samples`): rank 0 waits for it at the end of sampling until it has
    made no progress for distributed.timeout_seconds (torchrun would stop it sooner), then stops with one line,
    the cell INCOMPLETE and the summary written."""
    timeout = 4
    run = ["sweep", "--methods", "optimal,nearest_dataset", "--name", "died", "dataset.subset_size=60",
           "sampling.num_samples=4", "sampling.batch_size=2", "sampling.num_inference_steps=2", "output.images=false",
           "output.grid=false", f"distributed.timeout_seconds={timeout}"]
    (rank0,), rank1 = _launch(tmp_path, [(None, run)], fault="sweeps_kill")
    assert rank1 is None and rank0["code"] == 2
    lines = [line for line in rank0["stderr"].splitlines() if "error" in line.lower()]
    assert lines == [f"error: rank 1 of 2 made no progress (killed, or hung) within distributed.timeout_seconds="
                     f"{timeout} while rank 0 waited for it (the end of a phase of cell optimal_mnist5k); rank 0 stopped"]
    assert rank0["seconds"] < timeout + 10
    assert [(r["method"], r["status"]) for r in _sweep_rows("died")] == [("optimal", "failed"),
                                                                        ("nearest_dataset", "not run")]
    assert (Path(os.environ["ADS_ROOT"]) / "runs" / "sweeps" / "died" / "optimal_mnist5k" / INCOMPLETE).exists()


def test_a_bug_on_every_rank_is_one_line_and_tracebacks_go_to_torchruns_report(
        tmp_path: Path, stores: dict[str, list[str]]) -> None:
    """An error that is not a StudioError (here optimal's first step raising on both ranks): rank 0 prints one
    `error:` line and no traceback, rank 1 nothing, both exit 1, and each rank's traceback is in its torchrun error
    file (torchrun prints it under that rank in its failure report)."""
    overrides = [*SMALL, *stores["grey"], "experiment.run_name=bug"]
    rank0, rank1 = _launch(tmp_path, [("optimal/mnist5k", overrides)], fault="bug")
    assert (rank0[0]["code"], rank1[0]["code"]) == (1, 1), (rank0, rank1)
    assert rank0[0]["stderr"].splitlines()[-1] == "error: RuntimeError: posterior exploded"
    assert "Traceback" not in rank0[0]["stderr"] and rank0[0]["stderr"].count("error") == 1, rank0[0]["stderr"]
    assert rank1[0]["stderr"] == ""
    for rank in range(2):
        recorded = json.loads((tmp_path / f"error{rank}.json").read_text())["message"]
        assert recorded["message"] == "RuntimeError: posterior exploded"
        assert "in denoise" in recorded["extraInfo"]["py_callstack"]


def test_rank_0_checks_a_sweeps_sources_before_the_others(tmp_path: Path) -> None:
    """The sweep's source check (which downloads a missing dataset) runs on rank 0 first and on the other rank only
    after it, so that two ranks never download into the same files; rank 1 says nothing."""
    run = ["sweep", "--methods", "nearest_dataset", "--name", "sources", "dataset.subset_size=60",
           "sampling.num_samples=2", "sampling.batch_size=1", "sampling.num_inference_steps=2", "output.images=false",
           "output.grid=false"]
    (rank0,), (rank1,) = _launch(tmp_path, [(None, run)], fault="sources")
    assert (rank0["code"], rank1["code"]) == (0, 0), (rank0, rank1)
    assert rank1["stderr"] == ""
    (began0, ended0), (began1, ended1) = ([float(v) for v in (tmp_path / f"sources{r}.txt").read_text().split()]
                                          for r in range(2))
    assert began1 >= ended0, (began0, ended0, began1)


def test_distributed_keys_in_one_process_warn_once(capsys: pytest.CaptureFixture, stores: dict[str, list[str]]) -> None:
    """distributed.* set in one process does nothing: one warning line says so (generate and sweep alike)."""
    warning = ("warning: distributed.strategy only matters under torchrun (docs/distributed.md); this run is one "
               "process, which ignores it")
    assert main(["generate", "-c", "nearest_dataset/mnist5k", *SMALL, *stores["grey"], "experiment.run_name=alone",
                 "distributed.strategy=dataset"]) == 0
    assert capsys.readouterr().err.splitlines().count(warning) == 1
    assert main(["sweep", "--methods", "nearest_dataset", "--name", "alone", "dataset.subset_size=60",
                 "sampling.num_samples=2", "sampling.num_inference_steps=2", "output.images=false",
                 "distributed.strategy=samples"]) == 0
    err = capsys.readouterr().err
    assert warning in err and err.count("only matters under torchrun") == 1, err

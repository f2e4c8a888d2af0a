"""The GPU path, checked by one prepared command (issue 18; how to read the table: docs/gpu.md).

    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--json PATH] [--only GROUP ...]

For every kernel and method (groups: knn, nearest_dataset, optimal, scfdm, statistics, wiener, pca_locality, unet,
training, every other method in the registry under its own name, and generate), on fixed inputs (the 5,000
embedded MNIST digits, CIFAR-shaped random uint8 stores), it measures:
- the result on --device against the result on the CPU, at the stated tolerance (TOLERANCES);
- the result against a float64 evaluation of the formula written out densely (where there is one);
- milliseconds per call against the straightforward GPU formulation (torch.cdist + min, a dense softmax, a dense
  einsum; the speed-up is their ratio), and the GPU memory each holds plus the most one call adds;
- on CUDA the same call with TF32 switched on (kernels keep IEEE float32 inside, so their result must not move);
- a few optimizer steps of UNet training under autocast, and one `ads generate` per method end to end.
It prints each row's numbers as it finishes and a table at the end, rewrites the JSON (--json) after every row
("complete": false until the end: a run stopped by a time limit keeps its rows), and exits with status 1 if any
check failed. With --device cpu the CPU is
checked against itself and against the float64 formulas (CI runs `--device cpu --quick`, a few seconds). Offline:
the datasets are the embedded digits and generated arrays; datasets, caches and runs go to a temporary root.
The package is imported from this checkout's src/ when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if (REPO / "src" / "analytic_diffusion").is_dir():
    sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the store build and of generate (read at import)

import torch  # noqa: E402

from analytic_diffusion.data.store import DatasetStore, StoreRequest, load_or_build_store  # noqa: E402
from analytic_diffusion.denoisers import DENOISERS, load_all  # noqa: E402
from analytic_diffusion.denoisers.base import NoiseLevel  # noqa: E402
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level  # noqa: E402

TOLERANCES = {  # the most a result on the device may differ from the CPU's (and from the float64 formula)
    "knn": 0,  # indices: equal
    "nearest_dataset": 0,  # indices: equal
    "optimal": 1e-5,
    "scfdm": 1e-5,
    "wiener": 1e-5,
    "pca_locality": 1e-4,
    "statistics": 1e-9,  # float64 mean and covariance U diag(lam) U^T, model-space units
    "unet": 1e-4,  # eps of a random UNet relative to its largest value, TF32 off; TF32 on is reported, not judged
}
DEFAULT_TOLERANCE = 1e-5  # methods found in the registry that have no entry above (patch methods, ...)
KNOWN_METHODS = ("nearest_dataset", "optimal", "scfdm", "wiener", "pca_locality", "unet")
GROUPS = ("knn", "nearest_dataset", "optimal", "scfdm", "statistics", "wiener", "pca_locality", "unet", "training",
          "generate")  # then every other method in the registry, under its name
MIB = 1 << 20
COUNTS = ("mismatches", "problems", "non-finite")  # metrics that count things (printed as integers)


@dataclass(frozen=True)
class Sizes:
    """Inputs of one mode: full (a GPU, < 5 minutes) or quick (CI on a CPU, seconds)."""

    mnist: int | None  # images of mnist5k (None = all 5,000)
    cifar: int  # random CIFAR-shaped uint8 images for the search kernels and optimal
    cifar_stats: int  # ... for the methods built on the covariance (statistics, wiener, pca_locality)
    cifar_stats_side: int  # their side length (32 = CIFAR; smaller in quick mode: eigh of 3072^2 takes seconds)
    batch: int  # queries per call
    timesteps: tuple[int, ...]
    registry_images: int  # mnist5k images for methods without a dedicated check (patch methods are costly)
    generate: tuple[str, ...]  # overrides of the end-to-end `ads generate` runs
    training_images: int
    repeats: int  # timed calls per measurement (their median), after one warm-up call when > 1


FULL = Sizes(
    mnist=None, cifar=50_000, cifar_stats=5_000, cifar_stats_side=32, batch=16, timesteps=(900, 500, 100, 0),
    registry_images=1_000, training_images=640, repeats=5,
    generate=("dataset.subset_size=1000", "sampling.num_samples=8", "sampling.batch_size=8",
              "sampling.num_inference_steps=5"),
)
QUICK = Sizes(
    mnist=300, cifar=1_000, cifar_stats=200, cifar_stats_side=8, batch=4, timesteps=(900, 0),
    registry_images=100, training_images=32, repeats=1,
    generate=("dataset.subset_size=64", "sampling.num_samples=2", "sampling.batch_size=2",
              "sampling.num_inference_steps=2"),
)


@dataclass
class Check:
    """One row of the table. Errors are max |difference| (metric "max |Δ|") or counts ("mismatches")."""

    name: str
    tolerance: float | None  # None: reported, not judged
    metric: str = "max |Δ|"
    error: float | None = None  # the device's result against the CPU's
    reference_error: float | None = None  # against the float64 formula
    tf32_error: float | None = None  # TF32 on against TF32 off (CUDA)
    tf32_tolerance: float | None = None
    ms: float | None = None  # per call, median
    baseline: str | None = None  # the straightforward formulation timed beside it
    baseline_ms: float | None = None
    tf32_ms: float | None = None
    tf32_baseline_ms: float | None = None
    mib: float | None = None  # GPU memory the method holds + the most one call adds (CUDA)
    baseline_mib: float | None = None
    note: str = ""
    failure: str | None = None  # the exception, when the check could not run
    skipped: str | None = None  # why a method from the registry could not run here (it needs a file: a checkpoint)

    @property
    def passed(self) -> bool:
        if self.skipped is not None and self.failure is None:
            return True
        if self.failure is not None or self.error is None:  # a check that measured nothing has not passed
            return False
        judged = [(self.error, self.tolerance), (self.reference_error, self.tolerance),
                  (self.tf32_error, self.tf32_tolerance)]
        return all(value is None or limit is None or value <= limit for value, limit in judged)  # NaN fails

    @property
    def speedup(self) -> float | None:
        return self.baseline_ms / self.ms if self.ms and self.baseline_ms else None

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed, "speedup": self.speedup}


def max_abs(result: Any, expected: Any) -> float:
    """max |result - expected| over tensors or tuples of tensors, in float64 on the CPU (NaN if any is NaN)."""
    if isinstance(result, (tuple, list)):
        return max(max_abs(r, e) for r, e in zip(result, expected))
    difference = (result.detach().cpu().double() - expected.detach().cpu().double()).abs()
    return float("nan") if difference.isnan().any() else float(difference.max())


def relative(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max |result - expected| / max |expected|: for outputs whose scale is not fixed (a network's eps)."""
    return max_abs(result, expected) / float(expected.detach().abs().max().clamp_min(1e-30))


def mismatches(result: torch.Tensor, expected: torch.Tensor) -> float:
    """How many entries differ (indices)."""
    return float((result.cpu() != expected.cpu()).sum())


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matrix products and cuDNN convolutions on or off inside the block (restored after)."""
    flags = [b for b in (torch.backends.cuda.matmul, torch.backends.cudnn.conv) if hasattr(b, "fp32_precision")]
    if flags:
        saved = [flag.fp32_precision for flag in flags]
        for flag in flags:
            flag.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for flag, value in zip(flags, saved):
                flag.fp32_precision = value
        return
    saved_legacy = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy


class Runner:
    """Runs the checks of the selected groups on one device and keeps their rows."""

    def __init__(self, device: torch.device, sizes: Sizes, groups: list[str] | None = None,
                 report: Path | None = None):
        self.device, self.sizes, self.groups, self.report = device, sizes, groups, report
        self.cuda = device.type == "cuda"
        self.checks: list[Check] = []
        self.started = time.perf_counter()

    def wants(self, group: str) -> bool:
        return self.groups is None or group in self.groups

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def held_mib(self, build: Callable[[], Any]) -> tuple[Any, float | None]:
        """build() and the GPU memory its result holds (None on the CPU)."""
        if not self.cuda:
            return build(), None
        self.synchronize()
        before = torch.cuda.memory_allocated(self.device)
        built = build()
        self.synchronize()
        return built, (torch.cuda.memory_allocated(self.device) - before) / MIB

    def measure(self, call: Callable[[], Any], repeats: int | None = None) -> tuple[Any, float, float | None]:
        """(result, median ms per call, MiB the call adds at its peak on the GPU or None)."""
        repeats = repeats or self.sizes.repeats
        if repeats > 1:
            call()  # warm-up: cuBLAS handles, allocator pools, oneDNN primitives
        peak = None
        times = []
        for _ in range(repeats):
            self.synchronize()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            started = time.perf_counter()
            result = call()
            self.synchronize()
            times.append(1e3 * (time.perf_counter() - started))
            if self.cuda:
                peak = (torch.cuda.max_memory_allocated(self.device) - before) / MIB
        return result, statistics.median(times), peak

    def fit(self, build: Callable[[torch.device], Any]) -> tuple[dict[str, Any], float | None]:
        """build(device) on the CPU and on the checked device: ({"cpu": ..., "device": ...}, MiB held there)."""
        cpu = build(torch.device("cpu"))
        if self.device.type == "cpu":
            return {"cpu": cpu, "device": cpu}, None
        on_device, held = self.held_mib(lambda: build(self.device))
        return {"cpu": cpu, "device": on_device}, held

    def check(
        self,
        name: str,
        tolerance: float | None,
        call: Callable[[str], Any],
        compare: Callable[[Any, Any], float] = max_abs,
        reference: Callable[[], Any] | None = None,
        baseline: tuple[str, Callable[[], Any], float | None] | None = None,
        held_mib: float | None = None,
        tf32_tolerance: Any = "same",
        repeats: int | None = None,
        float64_only: bool = False,
        note: str = "",
    ) -> Check:
        """call("cpu") and call("device") return the result on that device; reference() the float64 formula on the
        device; baseline = (name, call on the device, MiB it holds). repeats: timed calls (default: the mode's);
        float64_only: TF32 cannot change it, so it is not run again with TF32 on. Exceptions become a failed row."""
        metric = {mismatches: "mismatches", relative: "max |Δ| / max |CPU|"}.get(compare, "max |Δ|")
        row = Check(name, tolerance, metric, note=note,
                    tf32_tolerance=tolerance if tf32_tolerance == "same" else tf32_tolerance)
        try:
            expected = call("cpu")
            with tf32(False):
                result, row.ms, peak = self.measure(lambda: call("device"), repeats)
                row.error = compare(result, expected)
                if reference is not None:
                    row.reference_error = compare(result, reference())
                if baseline is not None:
                    row.baseline, baseline_call, baseline_held = baseline
                    _, row.baseline_ms, baseline_peak = self.measure(baseline_call, repeats)
                    row.baseline_mib = _sum(baseline_held, baseline_peak)
            row.mib = _sum(held_mib, peak)
            if self.cuda and not float64_only:
                with tf32(True):
                    fast, row.tf32_ms, _ = self.measure(lambda: call("device"), repeats)
                    if baseline is not None:
                        _, row.tf32_baseline_ms, _ = self.measure(baseline[1], repeats)
                row.tf32_error = compare(fast, result)
        except Exception as exc:  # a check that cannot run is a failed check, and the others still run
            row.failure = _describe(exc)
        return self.record(row)

    def record(self, row: Check) -> Check:
        """Keep the row, print it, and rewrite the JSON report (marked incomplete until the run ends)."""
        self.checks.append(row)
        _progress(row)
        if self.report is not None:
            write_report(self.report, self, complete=False)
        return row


def _sum(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _describe(exc: BaseException) -> str:
    traceback.print_exception(exc, file=sys.stderr)
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _progress(row: Check) -> None:
    """One line per row as it finishes, with its numbers: a run stopped part-way still has them in its log."""
    verdict = "skip" if row.skipped and row.passed else "ok  " if row.passed else "FAIL"
    integer = row.metric in COUNTS
    numbers = [f"vs CPU {_cell(row.error, 2, integer)}", f"vs float64 {_cell(row.reference_error, 2, integer)}",
               f"TF32 Δ {_cell(row.tf32_error, 2, integer)}", f"ms {_cell(row.ms)}",
               f"its ms {_cell(row.baseline_ms)}", f"MiB {_cell(row.mib)}"]
    reason = row.failure or row.skipped
    print(f"  {verdict} {row.name}: " + ", ".join(numbers) + (f" ({reason})" if reason else ""),
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """A store and the fixed queries made from it."""

    name: str
    store: DatasetStore
    batch: int
    alphas_cumprod: torch.Tensor

    def x_t(self, timestep: int, count: int | None = None, seed: int = 0) -> torch.Tensor:
        """sqrt(ab_t) y + sqrt(1 - ab_t) eps for evenly spaced training images y (CPU, float32)."""
        count = count or self.batch
        a = float(self.alphas_cumprod[timestep])
        picks = torch.linspace(0, self.store.num_images - 1, count).round().long()
        eps = torch.randn((count, *self.store.sample_shape), generator=torch.Generator().manual_seed(seed + timestep))
        return math.sqrt(a) * self.store.gather(picks) + math.sqrt(1 - a) * eps

    def mixed(self, timesteps: tuple[int, ...]) -> torch.Tensor:
        """Queries from several noise levels at once (what a search sees over a sampling run)."""
        per = max(1, self.batch // len(timesteps))
        return torch.cat([self.x_t(t, per) for t in timesteps])

    def model_space64(self, device: torch.device) -> torch.Tensor:
        return self.store.model_space(device=device, dtype=torch.float64).reshape(self.store.num_images, -1)

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.store.sample_shape))
        return f"{self.name} {self.store.num_images}x{shape}"


def random_store(count: int, shape: tuple[int, int, int], seed: int, name: str) -> DatasetStore:
    generator = torch.Generator().manual_seed(seed)
    return DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8), name)


class FixedNoise:
    """A NoiseSource giving the same draws on every device, so the CPU and the device see the same perturbations."""

    def __init__(self, batch: int, sample_shape: tuple[int, ...], seed: int = 7):
        self.shape, self.seed = (batch, *sample_shape), seed

    def randn(self, *leading: int) -> torch.Tensor:
        return torch.randn((*leading, *self.shape), generator=torch.Generator().manual_seed(self.seed))


# ----------------------------------------------------------------------------- float64 and straightforward forms


def softmax_mean(data: torch.Tensor, query: torch.Tensor, scale: float, k: int | None = None) -> torch.Tensor:
    """sum_i softmax_i(-scale ||q - y_i||^2) y_i, densely (all N, or the k nearest), in the inputs' dtype."""
    distances = torch.cdist(query, data).square()
    if k is None:
        return torch.softmax(-scale * distances, dim=1) @ data
    nearest, index = distances.topk(min(k, data.shape[0]), dim=1, largest=False)
    return torch.einsum("bk,bkn->bn", torch.softmax(-scale * nearest, dim=1), data[index])


def dense_pca_locality(data: torch.Tensor, x_t: torch.Tensor, mask: torch.Tensor, level: NoiseLevel, tau: float,
                       chunk: int = 256) -> torch.Tensor:
    """x0_hat[q] = sum_i softmax_i(-sum_p mask[p, q] (x[p] - sqrt(a) y_i[p])^2 / (2 (1 - a) tau)) y_i[q], as one
    dense einsum per chunk of images (the reference framework's formulation, softmax over the whole dataset)."""
    scale = -1.0 / (2.0 * level.noise_variance * tau)
    mask = mask.to(data.dtype)
    logits = torch.cat([
        scale * torch.einsum("bkp,pq->bkq", (x_t[:, None, :] - level.signal_scale * data[None, start:start + chunk]).square(), mask)
        for start in range(0, data.shape[0], chunk)
    ], dim=1)  # [B, N, n]
    return torch.einsum("bkq,kq->bq", torch.softmax(logits, dim=1), data)


def wiener_from_covariance(data: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """mu + P (x_t / sqrt(a) - mu) with P = a S (a S + (1 - a) I)^-1 solved from the covariance S (no eigh)."""
    mean = data.mean(0)
    covariance = torch.cov(data.T)
    scaled = level.alpha_bar * covariance
    system = scaled + level.noise_variance * torch.eye(data.shape[1], dtype=data.dtype, device=data.device)
    projection = torch.linalg.solve(system, scaled)  # = P: S and (a S + (1 - a) I)^-1 commute
    return mean + (x_t / level.signal_scale - mean) @ projection.T


def brute_force_knn(data: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k nearest by float64 distance, ties to the lowest index."""
    distances = torch.cdist(queries.double(), data, compute_mode="donot_use_mm_for_euclid_dist")  # sum of squares
    return distances.argsort(dim=1, stable=True)[:, :k]


# -------------------------------------------------------------------------------------------------------- checks


def check_knn(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.search.cdist_index import CdistIndex
    from analytic_diffusion.search.knn import KnnIndex

    if runner.cuda:
        variants = [("device", "float"), ("pinned", "float"), ("mapped", "float")]
    else:  # the CPU reads the store in place; auto = the integer scorer where oneDNN runs it exactly
        variants = [("auto", "auto"), ("auto", "float")]
    for data in inputs:
        queries = data.mixed(runner.sizes.timesteps)
        cpu_index = KnnIndex(data.store)  # the CPU's default scorer (integer for uint8 stores where oneDNN allows)
        ranking = brute_force_knn(data.model_space64(runner.device), queries.to(runner.device).flatten(1), 10)
        cdist, cdist_mib = runner.held_mib(lambda: CdistIndex(data.store, runner.device))
        for placement, scorer in variants:
            try:
                index, held = runner.held_mib(lambda: KnnIndex(data.store, runner.device, placement=placement, scorer=scorer))
            except Exception as exc:
                runner.record(Check(f"knn {data.label} placement={placement} scorer={scorer}", 0, failure=_describe(exc)))
                continue
            chosen = "integer" if type(index.scorer).__name__ == "_IntegerScorer" else "float"
            chosen = f"{scorer} ({chosen})" if scorer == "auto" else chosen
            for k in (1, 10):
                on = {"cpu": (cpu_index, queries), "device": (index, queries.to(runner.device))}
                runner.check(
                    f"knn {data.label} B={len(queries)} k={k} placement={placement} scorer={chosen}", TOLERANCES["knn"],
                    lambda where, k=k, on=on: on[where][0].search(on[where][1], k).indices,
                    mismatches,
                    reference=lambda k=k: ranking[:, :k],
                    baseline=("torch.cdist + min" if k == 1 else "torch.cdist + topk",
                              lambda k=k: cdist.search(queries.to(runner.device), k).indices, cdist_mib),
                    held_mib=held,
                )


def check_nearest_dataset(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.denoisers.nearest_dataset import NearestDataset, NearestDatasetParams

    for data in inputs:
        level = noise_level(make_scheduler(SchedulerOptions()), 500)
        x_t = data.mixed(runner.sizes.timesteps)
        fitted, held = runner.fit(lambda d: NearestDataset(NearestDatasetParams(), d).fit(data.store))
        cdist, cdist_mib = runner.held_mib(
            lambda: NearestDataset(NearestDatasetParams(backend="cdist"), runner.device).fit(data.store))
        on = {"cpu": x_t, "device": x_t.to(runner.device)}
        runner.check(
            f"nearest_dataset {data.label} B={len(x_t)}", TOLERANCES["nearest_dataset"],
            lambda where: fitted[where](on[where], level).diagnostics["nearest_index"], mismatches,
            reference=lambda: brute_force_knn(data.model_space64(runner.device), on["device"].flatten(1), 1)[:, 0],
            baseline=("backend=cdist", lambda: cdist(on["device"], level).diagnostics["nearest_index"], cdist_mib),
            held_mib=held,
        )


def _optimal_checks(runner: Runner, data: Inputs, group: str, params, timesteps, noise: FixedNoise | None = None):
    """optimal (exact / topk) or scfdm on one input at each timestep against the dense softmax."""
    from analytic_diffusion.denoisers.base import denoiser_class
    from analytic_diffusion.denoisers.optimal import logit_scale

    method = denoiser_class(group)
    fitted, held = runner.fit(lambda d: method(params, d).fit(data.store))
    scheduler = make_scheduler(SchedulerOptions())
    data32, data32_mib = runner.held_mib(lambda: data.store.model_space(device=runner.device).flatten(1))
    data64 = data.model_space64(runner.device)
    k = params.num_neighbors if params.mode == "topk" else None
    for t in timesteps:
        level = noise_level(scheduler, t)
        x_t = data.x_t(t)
        on = {"cpu": x_t, "device": x_t.to(runner.device)}
        scale = logit_scale(level, params.temperature)

        def formula(data_in: torch.Tensor, level=level, scale=scale, x=on["device"]) -> torch.Tensor:
            queries = x
            if noise is not None:  # scfdm: the mean over the perturbations x_t + s e_m (formed in x_t's dtype)
                queries = x[None] + params.smoothing_std * noise.randn(params.num_noise).to(x)
            flat = queries.reshape(-1, data_in.shape[1]).to(data_in.dtype) / level.signal_scale
            means = softmax_mean(data_in, flat, scale, k)
            return means.reshape(-1, *x.shape).mean(0) if noise is not None else means.reshape(x.shape)

        mode = f" {params.mode}" if group == "optimal" else f" M={params.num_noise} s={params.smoothing_std}"
        runner.check(
            f"{group}{mode} {data.label} B={len(x_t)} t={t}", TOLERANCES[group],
            lambda where, level=level: fitted[where](on[where], level, noise).x0_hat,
            reference=lambda formula=formula: formula(data64),
            baseline=("dense softmax" + (" over cdist top-k" if k else ""), lambda formula=formula: formula(data32), data32_mib),
            held_mib=held,
        )


def check_optimal(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.denoisers.optimal import OptimalParams

    for data in inputs:
        _optimal_checks(runner, data, "optimal", OptimalParams(mode="exact"), runner.sizes.timesteps)
        _optimal_checks(runner, data, "optimal", OptimalParams(mode="topk"), runner.sizes.timesteps[::2])


def check_scfdm(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.denoisers.scfdm import ScfdmParams

    data = inputs[0]
    params = ScfdmParams(num_noise=4, smoothing_std=1.0)
    _optimal_checks(runner, data, "scfdm", params, runner.sizes.timesteps[:2], FixedNoise(data.batch, data.store.sample_shape))


def check_statistics(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.statistics import compute_statistics

    for data in inputs:
        def call(where: str) -> tuple[torch.Tensor, torch.Tensor]:
            stats = compute_statistics(data.store, runner.device if where == "device" else "cpu")
            vectors = stats.eigenvectors.to(runner.device)
            return stats.mean, (vectors * stats.eigenvalues.to(runner.device)) @ vectors.T

        def reference() -> tuple[torch.Tensor, torch.Tensor]:
            data64 = data.model_space64(runner.device)
            return data64.mean(0), torch.cov(data64.T)

        data32, data32_mib = runner.held_mib(lambda: data.store.model_space(device=runner.device).flatten(1))
        runner.check(
            f"statistics {data.label}", TOLERANCES["statistics"], call, reference=reference,
            baseline=("torch.cov + eigh, float32", lambda: torch.linalg.eigh(torch.cov(data32.T)), data32_mib),
            repeats=1, float64_only=True,
            note="mean and U diag(lam) U^T (eigenvectors are compared through the covariance they rebuild)",
        )


def check_wiener(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.denoisers.wiener import Wiener

    scheduler = make_scheduler(SchedulerOptions())
    for data in inputs:
        fitted, held = runner.fit(lambda d: Wiener(device=d).fit(data.store))
        data64 = data.model_space64(runner.device)
        model = fitted["device"].model
        for t in runner.sizes.timesteps:
            level = noise_level(scheduler, t)
            x_t = data.x_t(t)
            on = {"cpu": x_t, "device": x_t.to(runner.device)}
            flat = on["device"].flatten(1)
            projection, projection_mib = runner.held_mib(lambda: model.projection(level.alpha_bar).float())
            mean32 = model.mean.float()
            runner.check(
                f"wiener {data.label} B={len(x_t)} t={t}", TOLERANCES["wiener"],
                lambda where, level=level: fitted[where](on[where], level).x0_hat,
                reference=lambda level=level, flat=flat: wiener_from_covariance(data64, flat.double(), level).reshape(x_t.shape),
                baseline=("dense P_t matmul", lambda p=projection, level=level, flat=flat:
                          mean32 + (flat / level.signal_scale - mean32) @ p, projection_mib),
                held_mib=held,
            )


def check_pca_locality(runner: Runner, inputs: list[Inputs]) -> None:
    from analytic_diffusion.denoisers.pca_locality import PcaLocality, PcaLocalityParams

    scheduler = make_scheduler(SchedulerOptions())
    for data in inputs:
        # random pixels are uncorrelated: a higher threshold keeps their masks local, as natural images' are
        params = PcaLocalityParams(mask_threshold=0.005 if data.name == "mnist5k" else 0.05)
        fitted, held = runner.fit(lambda d: PcaLocality(params, d).fit(data.store))
        data32, data32_mib = runner.held_mib(lambda: data.store.model_space(device=runner.device).flatten(1))
        data64 = data.model_space64(runner.device)
        batch = max(1, data.batch // 2)
        for t in runner.sizes.timesteps:
            level = noise_level(scheduler, t)
            x_t = data.x_t(t, batch)
            on = {"cpu": x_t, "device": x_t.to(runner.device)}
            runner.check(f"pca_locality mask {data.label} t={t}", 0, lambda where, level=level: fitted[where].mask(level),
                         mismatches, float64_only=True)
            mask = fitted["device"].mask(level)
            flat = on["device"].flatten(1)
            runner.check(
                f"pca_locality {data.label} B={batch} t={t}", TOLERANCES["pca_locality"],
                lambda where, level=level: fitted[where](on[where], level).x0_hat,
                reference=lambda level=level, mask=mask, flat=flat:
                    dense_pca_locality(data64, flat.double(), mask, level, params.temperature).reshape(x_t.shape),
                baseline=("dense einsum", lambda level=level, mask=mask, flat=flat:
                          dense_pca_locality(data32, flat, mask, level, params.temperature), data32_mib),
                held_mib=held,
                note=f"mask_threshold={params.mask_threshold}",
            )


def small_unet_config(side: int):
    from analytic_diffusion.unet.model import UNetConfig

    return UNetConfig(base_channels=16, channel_multipliers=[1, 2, 2], num_res_blocks=1, dropout=0.0,
                      attention_resolutions=[side // 4], norm_groups=8)


def check_unet(runner: Runner, inputs: list[Inputs]) -> None:
    """eps of a randomly initialised UNet (its zero-initialised output layers randomised) on both devices."""
    from analytic_diffusion.denoisers.unet import UNetDenoiser
    from analytic_diffusion.unet.model import UNet
    from analytic_diffusion.unet.schedule import NoiseSchedule

    for data in inputs:
        channels, side, _ = data.store.sample_shape
        torch.manual_seed(0)
        network = UNet(small_unet_config(side), channels, side).eval()
        with torch.no_grad():
            for parameter in network.parameters():
                if parameter.ndim > 1 and not parameter.any():
                    parameter.normal_(0, 0.2)

        def build(device: torch.device, network=network):
            copy = UNet(small_unet_config(side), channels, side)
            copy.load_state_dict(network.state_dict())
            return UNetDenoiser(device=device).use_network(copy.to(device), NoiseSchedule())

        fitted, held = runner.fit(build)
        for t in (500, 100):  # eps, not x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a), which divides by 0.016 at t=900
            x_t = data.x_t(t)
            on = {"cpu": x_t, "device": x_t.to(runner.device)}

            @torch.no_grad()
            def eps(where: str, t=t) -> torch.Tensor:
                x = on[where]
                return fitted[where].backbone.network(x, torch.full((len(x),), t, device=x.device))

            runner.check(f"unet eps {data.label} B={len(x_t)} t={t}", TOLERANCES["unet"], eps, relative, held_mib=held,
                         tf32_tolerance=None, note="random weights; TF32 on is reported, not judged")


def check_training(runner: Runner, mnist: Inputs, root: Path) -> Path | None:
    """A few optimizer steps under each autocast mode of the device; returns a checkpoint for `generate`."""
    from analytic_diffusion.unet.checkpoint import load_unet
    from analytic_diffusion.unet.training import TrainingConfig, autocast_dtype, train

    count = min(runner.sizes.training_images, mnist.store.num_images)
    store = DatasetStore.from_tensor(mnist.store.images[:count], "mnist5k")
    modes = ("bf16", "fp16", "no") if runner.cuda else ("auto",)
    checkpoint = None
    held = torch.cuda.memory_allocated(runner.device) if runner.cuda else 0
    for mode in modes:
        config = TrainingConfig(architecture=small_unet_config(28), epochs=1, batch_size=min(16, count),
                                warmup_steps=1, preview_samples=0, checkpoint_every=1, mixed_precision=mode)
        precision = autocast_dtype(mode, runner.device)
        row = Check(f"unet training {count} images autocast={precision or 'off'}", 0, "non-finite", note=f"mixed_precision={mode}")
        try:
            folder = root / "training" / mode
            if runner.cuda:
                torch.cuda.reset_peak_memory_stats(runner.device)
            result = train(config, store, folder, runner.device, progress_bar=False)
            row.ms = 1e3 * result.seconds / max(1, result.steps)
            if runner.cuda:
                row.mib = (torch.cuda.max_memory_allocated(runner.device) - held) / MIB
            network, schedule = load_unet(folder, runner.device)
            with torch.no_grad():
                eps = network(mnist.x_t(500).to(runner.device), torch.full((mnist.batch,), 500, device=runner.device))
            row.error = float(sum(not math.isfinite(v) for v in result.losses) + (~torch.isfinite(eps)).sum().item())
            row.note += f"; {result.steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
            checkpoint = checkpoint or folder
        except Exception as exc:
            row.failure = _describe(exc)
        runner.record(row)
    return checkpoint


def check_registry_method(runner: Runner, name: str, mnist: Inputs, skipped: dict[str, str]) -> None:
    """A method with no dedicated check (added later: patch methods...): its mnist5k config's parameters (else its
    defaults), device against CPU at TOLERANCES.get(name, DEFAULT_TOLERANCE). A method whose config or fit raises a
    StudioError (it needs something the check cannot provide, such as a trained checkpoint) is skipped, with the
    reason in the row and in `skipped` (its `generate` is skipped too); any other exception fails the row."""
    from analytic_diffusion.config import load_config
    from analytic_diffusion.config.loader import configs_dir
    from analytic_diffusion.denoisers.base import denoiser_class
    from analytic_diffusion.errors import StudioError

    method = denoiser_class(name)
    try:
        config = load_config(f"{name}/mnist5k") if (configs_dir() / name / "mnist5k.yaml").is_file() else None
        params = config.model.params if config is not None else method.Params()
        # no more images than the method's own config uses (els: 100; its CPU reference grows with N x patches)
        subset = config.dataset.subset_size if config is not None else None
        count = min(runner.sizes.registry_images, subset or mnist.store.num_images, mnist.store.num_images)
        data = Inputs("mnist5k", DatasetStore.from_tensor(mnist.store.images[:count], "mnist5k"), max(2, mnist.batch // 2),
                      mnist.alphas_cumprod)
        scheduler = make_scheduler(SchedulerOptions())
        fitted, held = runner.fit(lambda d: method(params, d).fit(data.store))
        for denoiser in fitted.values():  # e.g. a patch size per sampling step
            denoiser.use_schedule(scheduler.timesteps.tolist())
    except StudioError as exc:
        skipped[name] = str(exc)
        runner.record(Check(f"{name} (from the registry)", DEFAULT_TOLERANCE, skipped=str(exc)))
        return
    except Exception as exc:
        runner.record(Check(f"{name} (from the registry)", DEFAULT_TOLERANCE, failure=_describe(exc)))
        return
    noise = FixedNoise(data.batch, data.store.sample_shape)
    for t in runner.sizes.timesteps:
        level = noise_level(scheduler, t)
        x_t = data.x_t(t)
        on = {"cpu": x_t, "device": x_t.to(runner.device)}
        runner.check(f"{name} {data.label} B={data.batch} t={t}", TOLERANCES.get(name, DEFAULT_TOLERANCE),
                     lambda where, level=level: fitted[where](on[where], level, noise).x0_hat, held_mib=held,
                     note="found in the registry")


def check_generate(runner: Runner, methods: list[str], root: Path, checkpoint: Path | None,
                   skipped: dict[str, str]) -> None:
    """`ads generate` of every method on mnist5k with tiny settings, through the command line's main()."""
    from analytic_diffusion.cli import main
    from analytic_diffusion.config import load_config
    from analytic_diffusion.config.loader import configs_dir

    for name in methods:
        if name in skipped:
            runner.record(Check(f"generate {name}", 0, "problems", skipped=skipped[name]))
            continue
        config = f"{name}/mnist5k"
        if not (configs_dir() / name / "mnist5k.yaml").is_file():  # a method without a config of its own
            path = root / f"{name}.yaml"
            path.write_text(f"defaults:\n  - defaults\n  - datasets/mnist5k\nmodel:\n  name: {name}\n")
            config = str(path)
        extra = [f"model.params.checkpoint={checkpoint}"] if name == "unet" and checkpoint else []
        sizes = getattr(load_config(config).model.params, "patch_size", None)
        if isinstance(sizes, list):  # one size per step of the config's schedule, not of these few steps: its last
            extra.append(f"model.params.patch_size={sizes[-1]}")
        overrides = [f"experiment.device={runner.device}", "experiment.name=gpu_check", f"experiment.run_name={name}",
                     "experiment.append_timestamp=false", "logging.level=warning", *runner.sizes.generate, *extra]
        row = Check(f"generate {name}", 0, "problems", note=" ".join(runner.sizes.generate))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the run's summary; errors still go to stderr
                status = main(["generate", "-c", config, *overrides])
            row.error = float(len(_run_problems(status, root / "runs" / "gpu_check" / name, runner.device, row)))
        except Exception as exc:
            row.failure = _describe(exc)
        runner.record(row)


def _run_problems(status: int, run_dir: Path, device: torch.device, row: Check) -> list[str]:
    """What is wrong with a finished `ads generate` (nothing, normally); its time per step goes into `row`."""
    if status != 0:
        problems = [f"exit status {status}"]
    else:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        samples = torch.load(run_dir / "samples.pt")
        row.ms = 1e3 * metrics["seconds_per_step"]
        problems = [
            *(["left INCOMPLETE"] if (run_dir / "INCOMPLETE").exists() else []),
            *([f"ran on {metrics['device']}"] if torch.device(metrics["device"]).type != device.type else []),
            *(["non-finite samples"] if not torch.isfinite(samples).all() else []),
        ]
    row.note = "; ".join(problems) or row.note
    return problems


# ------------------------------------------------------------------------------------------------------ reporting


def _cell(value: float | None, digits: int = 3, integer: bool = False) -> str:
    if value is None:
        return "n/a"
    if integer:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def table(checks: list[Check]) -> str:
    """The Markdown table of docs/gpu.md."""
    header = ("| check | tol | vs CPU | vs float64 | TF32 Δ | ms | straightforward | its ms | speed-up | TF32 ms "
              "| its TF32 ms | MiB | its MiB | ok |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in checks:
        integer = c.metric in COUNTS
        cells = [
            c.name, _cell(c.tolerance, 2, integer), _cell(c.error, 2, integer), _cell(c.reference_error, 2, integer),
            _cell(c.tf32_error, 2, integer), _cell(c.ms), c.baseline or "", _cell(c.baseline_ms),
            f"{c.speedup:.2f}x" if c.speedup else "n/a", _cell(c.tf32_ms), _cell(c.tf32_baseline_ms), _cell(c.mib),
            _cell(c.baseline_mib),
            f"skipped: {c.skipped}" if c.skipped and c.passed else "ok" if c.passed else f"**FAIL** {c.failure or ''}".strip(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN and infinities as strings (JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(path: Path, runner: Runner, complete: bool) -> None:
    """The rows so far as JSON: `complete` is false while the run goes on (a run stopped by a time limit keeps
    every finished row)."""
    failed = [c.name for c in runner.checks if not c.passed]
    report = {**machine(runner.device), "quick": runner.sizes is QUICK,
              "complete": complete, "seconds": time.perf_counter() - runner.started, "passed": complete and not failed,
              "failed": failed, "skipped": [c.name for c in runner.checks if c.skipped],
              "tolerances": TOLERANCES, "default_tolerance": DEFAULT_TOLERANCE,
              "checks": [c.as_json() for c in runner.checks]}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    staging.replace(path)


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"device": str(device), "cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the device checked against the CPU: cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--quick", action="store_true", help="small inputs: seconds on a CPU (CI)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups (see the module docstring)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, root: Path) -> Runner:
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    methods = sorted(DENOISERS)
    runner = Runner(device, sizes, args.only, args.json)
    alphas = make_scheduler(SchedulerOptions()).alphas_cumprod
    started = time.perf_counter()
    mnist_store, _ = load_or_build_store(StoreRequest("mnist5k", subset_size=sizes.mnist), root / "datasets", root / "cache")
    mnist = Inputs("mnist5k", mnist_store, sizes.batch, alphas)
    cifar = Inputs("cifar-shaped", random_store(sizes.cifar, (3, 32, 32), 1, "cifar-shaped"), sizes.batch, alphas)
    side = sizes.cifar_stats_side
    cifar_stats = Inputs("cifar-shaped", random_store(sizes.cifar_stats, (3, side, side), 2, "cifar-shaped"),
                         sizes.batch, alphas)
    print(f"inputs ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("knn", lambda: check_knn(runner, [mnist, cifar])),
        ("nearest_dataset", lambda: check_nearest_dataset(runner, [mnist, cifar])),
        ("optimal", lambda: check_optimal(runner, [mnist, cifar])),
        ("scfdm", lambda: check_scfdm(runner, [mnist])),
        ("statistics", lambda: check_statistics(runner, [mnist, cifar_stats])),
        ("wiener", lambda: check_wiener(runner, [mnist, cifar_stats])),
        ("pca_locality", lambda: check_pca_locality(runner, [mnist, cifar_stats])),
        ("unet", lambda: check_unet(runner, [mnist, cifar_stats])),
    ]
    skipped: dict[str, str] = {}  # registry methods that need what the check cannot give them, and why
    sections += [(name, lambda name=name: check_registry_method(runner, name, mnist, skipped))
                 for name in methods if name not in KNOWN_METHODS]
    checkpoint: list[Path | None] = [None]  # training's checkpoint, which `generate unet` samples with
    sections += [("training", lambda: checkpoint.__setitem__(0, check_training(runner, mnist, root))),
                 ("generate", lambda: check_generate(runner, methods, root, checkpoint[0], skipped))]
    for group, section in sections:
        needed = group == "training" and runner.wants("generate") and "unet" in methods
        if runner.wants(group) or needed:
            print(f"{group}:", file=sys.stderr, flush=True)
            started = time.perf_counter()
            section()
            print(f"  ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return runner


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    load_all()
    groups = [*GROUPS, *(name for name in sorted(DENOISERS) if name not in KNOWN_METHODS)]
    unknown = sorted(set(args.only or []) - set(groups))
    if unknown:
        print(f"error: unknown group(s) {', '.join(unknown)}; the groups are {', '.join(groups)}", file=sys.stderr)
        return 2
    os.environ.setdefault("ADS_CONFIGS", str(REPO / "configs"))
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ads_gpu_check_"))
    saved_root = os.environ.get("ADS_ROOT")
    os.environ["ADS_ROOT"] = str(root)  # configs resolve datasets, caches and runs here
    try:
        runner = run(args, root)
    finally:
        if saved_root is None:
            os.environ.pop("ADS_ROOT", None)
        else:
            os.environ["ADS_ROOT"] = saved_root
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - started
    failed = [c.name for c in runner.checks if not c.passed]
    info = machine(device)
    if args.json is not None:
        write_report(args.json, runner, complete=True)
    print(f"\n{info.get('gpu', info['cpu'])} ({info['device']}), torch {info['torch']}, CPU {info['cpu']} "
          f"({info['cpu_threads']} threads; the host may be shared), {'quick' if args.quick else 'full'} inputs, "
          f"{seconds:.0f} s\n")
    print(table(runner.checks))
    skipped = [c.name for c in runner.checks if c.skipped]
    print(f"\n{len(runner.checks) - len(failed)} of {len(runner.checks)} checks passed" +
          (f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else "") +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not runner.checks else 0


if __name__ == "__main__":
    sys.exit(main())

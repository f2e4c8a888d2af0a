"""Every analytic method from the same initial noise, one row each: the studio's core question in one script.

Run: python examples/same_noise.py [num_samples]  ->  same_noise.png (rows: nearest_dataset, optimal, scfdm,
wiener, pca_locality; columns: samples). Uses the library directly: store -> fit -> sample, no config files; the
dataset store and statistics are cached under $ADS_ROOT (default studio/), like those of `ads generate`.
`ads sweep` is the same experiment as a command: labelled rows, a table of timings and metrics, resumable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from analytic_diffusion.data.store import StoreRequest, load_or_build_store
from analytic_diffusion.denoisers import denoiser_class
from analytic_diffusion.noise import SharedNoise
from analytic_diffusion.runs import save_grid
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, sample

METHODS = ["nearest_dataset", "optimal", "scfdm", "wiener", "pca_locality"]


def main(num_samples: int = 8) -> None:
    root = Path(os.environ.get("ADS_ROOT", "studio"))
    store, _ = load_or_build_store(StoreRequest("mnist5k"), root / "datasets", root / "cache")
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=10))
    x_T = torch.randn((num_samples, *store.sample_shape), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in METHODS:
        method = denoiser_class(name)
        denoiser = method(method.Params())
        denoiser.cache_dir = root / "cache"
        denoiser.fit(store)
        noise = SharedNoise(torch.Generator().manual_seed(1), num_samples, store.sample_shape)  # for scfdm
        rows.append(sample(denoiser, scheduler, x_T, noise).x0_hat)
        print(f"{name}: done")
    save_grid(torch.cat(rows), Path("same_noise.png"), columns=num_samples)
    print("wrote same_noise.png")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))

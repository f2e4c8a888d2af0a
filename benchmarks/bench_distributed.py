"""Benchmark of distributed.strategy=dataset (docs/distributed.md): one step of `optimal` (exact) and
`pca_locality` on a 60,000-image MNIST-shaped random uint8 store, on 1 process against K processes (gloo, one
thread each), with seconds per step (wall clock, the slowest rank; and CPU seconds of each process, which a busy
machine inflates less) and peak memory per process; the 1-process vs K-process x0_hat difference; and, as the
control, one process on N / K images with the same queries (one rank's work without the collectives).

    PYTHONPATH=src python benchmarks/bench_distributed.py [--processes 2] [--repeats 3] [--images 60000]
        [--batch 16] [--pca-batch 2]

Each configuration runs as fresh Python processes (the torchrun environment set by hand: RANK, WORLD_SIZE, ...),
reading the store as a memory-mapped .npy file, so a rank touches only its shard's pages. Step: x_t =
sqrt(ab) y + sqrt(1 - ab) eps at ab = 0.3 for B random queries y from the store; median of `repeats` calls after
one warm-up call; the fit (norms, integer kernel tables, statistics) is not timed. Memory: ru_maxrss of each
process (whole process: Python, torch, the mapped shard pages touched, the method's tables), and in brackets its
growth after the imports (what the store and the method added).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ALPHA_BAR = 0.3


def worker(args: argparse.Namespace) -> None:
    """One process: fit the method on the (sharded) store, time the step, write a JSON line and x0_hat."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from analytic_diffusion.data.store import DatasetStore
    from analytic_diffusion.denoisers import NoiseLevel
    from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams
    from analytic_diffusion.denoisers.pca_locality import PcaLocality, PcaLocalityParams
    from analytic_diffusion.distributed.dataset import (ShardedDataset, ShardedOptimal, ShardedPcaLocality,
                                                        share_statistics)
    from analytic_diffusion.distributed.group import Ranks

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: Python, torch, the studio
    images = torch.from_numpy(np.load(args.store, mmap_mode="c"))
    queried = DatasetStore("random60k", f"random{images.shape[0]}", images)
    store = DatasetStore("random60k", f"random{images.shape[0]}", images[: args.subset])
    device = torch.device("cpu")
    batch = args.batch if args.method == "optimal" else args.pca_batch
    generator = torch.Generator().manual_seed(0)
    # the queries come from the whole store in every configuration, the control's too: a rank's shard holds the
    # images of only some of them, and a query far from every image of a shard costs it more
    clean = queried.gather(torch.randint(0, queried.num_images, (batch,), generator=generator))
    x_t = ALPHA_BAR**0.5 * clean + (1 - ALPHA_BAR) ** 0.5 * torch.randn(clean.shape, generator=generator)
    level = NoiseLevel(500, ALPHA_BAR)
    started = time.perf_counter()
    if world > 1:
        dist.init_process_group("gloo")
        ranks = Ranks(rank, world, rank, "dataset", "gloo")
        dataset = ShardedDataset(store, ranks, device)
        if args.method == "optimal":
            denoiser = ShardedOptimal(OptimalParams(), device, dataset)
        else:
            share_statistics(store, dataset, Path(args.cache), device)
            denoiser = ShardedPcaLocality(PcaLocalityParams(), device)
            denoiser.cache_dir = Path(args.cache)
            denoiser.fit(store).use_shard(dataset)
    elif args.method == "optimal":
        denoiser = OptimalDenoiser(OptimalParams(), device).fit(store)
    else:
        denoiser = PcaLocality(PcaLocalityParams(), device)
        denoiser.cache_dir = Path(args.cache)
        denoiser.fit(store)
    fit_seconds = time.perf_counter() - started
    x0_hat = denoiser(x_t, level).x0_hat  # warm-up (pca_locality: compiles the mask plan)
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        x0_hat = denoiser(x_t, level).x0_hat
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and args.subset is None:
        torch.save(x0_hat, Path(args.out) / f"{args.method}-{world}.pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"method": args.method, "world": world, "rank": rank, "batch": batch,
                      "step_seconds": statistics.median(seconds),
                      "cpu_seconds": statistics.median(cpu_seconds), "fit_seconds": fit_seconds, "peak_mib": peak,
                      "added_mib": peak - imported}))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, world: int, args: argparse.Namespace, store: Path, folder: Path,
           subset: int | None = None) -> list[dict]:
    """`world` worker processes of this script (the torchrun environment set by hand); their JSON lines. `subset`:
    one process on the first `subset` images only (one rank's share of the work, without collectives)."""
    port, processes = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        command = [sys.executable, __file__, "--worker", method, "--store", str(store), "--out", str(folder),
                   "--cache", str(folder / f"cache-{world}"), "--repeats", str(args.repeats),
                   "--batch", str(args.batch), "--pca-batch", str(args.pca_batch)]
        command += ["--subset", str(subset)] if subset else []
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    lines = [process.communicate()[0].strip().splitlines()[-1] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"{method} on {world} processes failed")
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=16, help="queries per optimal step")
    parser.add_argument("--pca-batch", type=int, default=2, help="queries per pca_locality step")
    parser.add_argument("--methods", default="optimal,pca_locality")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--subset", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.method = args.worker
        worker(args)
        return
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start (a shared machine: timings are noisy); torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = folder / "store.npy"
        np.save(store, np.random.default_rng(0).integers(0, 256, (args.images, 1, 28, 28), dtype=np.uint8))
        print(f"store: {args.images} random uint8 images 1x28x28 ({store.stat().st_size / 2**20:.0f} MiB), "
              f"ab = {ALPHA_BAR}, median of {args.repeats} steps, one thread per process")
        print("| method | B | processes | s/step (wall) | speed-up | CPU s/step per process | peak MiB per process "
              "(above the imports) | max \\|x0_hat - 1 process\\| |")
        print("|---|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            rows = {world: launch(method, world, args, store, folder) for world in (1, args.processes)}
            share = args.images // args.processes
            rows["share"] = launch(method, 1, args, store, folder, share)
            single = torch.load(folder / f"{method}-1.pt")
            for world, results in rows.items():
                step = max(r["step_seconds"] for r in results)  # the slowest rank sets the pace
                speedup = rows[1][0]["step_seconds"] / step
                cpu = ", ".join(f"{r['cpu_seconds']:.3f}" for r in sorted(results, key=lambda r: r["rank"]))
                peaks = ", ".join(f"{r['peak_mib']:.0f} ({r['added_mib']:.0f})"
                                  for r in sorted(results, key=lambda r: r["rank"]))
                if world == "share":
                    label, difference = f"1 on {share} images (one rank's work)", "-"
                else:
                    label = str(world)
                    difference = f"{(torch.load(folder / f'{method}-{world}.pt') - single).abs().max().item():.1e}"
                print(f"| {method} | {results[0]['batch']} | {label} | {step:.3f} | {speedup:.2f} | {cpu} | {peaks} | "
                      f"{difference} |")


if __name__ == "__main__":
    main()

"""Memorization search at scale, side by side in one process (issue 12, docs/memorization.md#benchmark).

The search `ads memorization` runs: the k = 2 nearest training images of every sample (d1, d2 and their indices),
for 10,000 CIFAR-shaped samples against a 50,000-image uint8 store. Methods, on the same data:
- ours: `knn_search` (the exact kernel of `analytic_diffusion.search.knn`, store kept uint8), and the same
  kernel with its float32 scorer (what it used on CPUs without VNNI before 7-bit query digits);
- FAISS `IndexFlatL2` over a float32 copy of the store (search only; its build is timed apart);
- `torch.cdist` + `topk` over a float32 copy, in blocks of 256 samples (a [10,000, 50,000] matrix is 2 GB).
Reported: wall and process-CPU seconds of one call each (methods run in turn, one thread each), peak extra
memory of one call (resident peak above the resident size before it, on `--memory-samples` samples), and index
equality with a float64 brute force on the first `--check` samples (both indices, ties to the lowest index).

Samples: half are training images plus Gaussian noise of std 0.05 (copies, d1/d2 small), half are the average
of two training images (novel, d1/d2 near 1), all in model space [-1, 1]; the store is random uint8 images.

    PYTHONPATH=src python benchmarks/bench_memorization.py [--samples 10000] [--store 50000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import torch
from memory_probe import peak_extra_mib

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.search import knn_search
from analytic_diffusion.search.knn import KnnIndex, exact_digit_bits

CDIST_BLOCK = 256


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_data(count: int, shape: tuple[int, ...], samples: int) -> tuple[DatasetStore, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    store = DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=g))
    copies = samples // 2
    picks = torch.randint(0, count, (samples - copies, 2), generator=g)
    copied = store.gather(torch.randint(0, count, (copies,), generator=g))
    copied = (copied + 0.05 * torch.randn(copied.shape, generator=g)).clamp_(-1, 1)
    mixed = store.gather(picks).mean(1)
    return store, torch.cat([copied, mixed])


def float64_reference(store: DatasetStore, queries: torch.Tensor, k: int, shortlist: int = 32) -> torch.Tensor:
    """Indices [B, k] of the k smallest float64 sums of squared differences, ties to the lowest index: the
    `shortlist` best by a float64 expansion (errors ~1e-12, far below any gap it could reorder beyond the
    shortlist), then the reference distance itself, sorted stably by (distance, index)."""
    x = queries.reshape(queries.shape[0], -1).to(torch.float64)
    expanded = []
    for start in range(0, store.num_images, 2000):
        y = store.model_space(start, start + 2000, dtype=torch.float64).reshape(-1, store.dim)
        expanded.append(y.square().sum(1)[None] - 2 * x @ y.t())
    candidates = torch.cat(expanded, 1).topk(shortlist, dim=1, largest=False).indices.sort(dim=1).values
    exact = torch.stack([(store.gather(row, dtype=torch.float64).reshape(shortlist, -1) - x[i]).square().sum(1)
                         for i, row in enumerate(candidates)])
    order = exact.sort(dim=1, stable=True).indices[:, :k]
    return candidates.gather(1, order)


def timed(fn) -> tuple[float, float, torch.Tensor]:
    started, started_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - started, time.process_time() - started_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--store", type=int, default=50_000)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--check", type=int, default=256, help="samples compared with the float64 brute force")
    parser.add_argument("--memory-samples", type=int, default=1000, help="samples of the memory probe calls")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"# cpu={cpu_model()!r} threads={args.threads} load_average={os.getloadavg()}")
    print(f"# torch={torch.__version__} faiss={faiss.__version__} integer digit bits={exact_digit_bits(3072)}")
    store, samples = make_data(args.store, tuple(args.shape), args.samples)
    flat = samples.reshape(args.samples, -1).contiguous()
    print(f"# store {store.num_images} x {store.dim} uint8 ({store.images.numel() / 2**20:.0f} MiB), "
          f"samples {tuple(samples.shape)} float32 ({flat.numel() * 4 / 2**20:.0f} MiB)", flush=True)

    build = {}
    build["ours"], _, _ = timed(lambda: knn_search(samples[:1], store, k=args.k))  # builds and caches the index
    started = time.perf_counter()
    data32 = store.model_space().reshape(store.num_images, -1).contiguous()
    index = faiss.IndexFlatL2(store.dim)
    index.add(data32.numpy())
    build["faiss IndexFlatL2"] = build["torch.cdist+topk"] = time.perf_counter() - started
    started = time.perf_counter()

    def cdist_topk(queries: torch.Tensor) -> torch.Tensor:
        found = [torch.cdist(queries[i : i + CDIST_BLOCK], data32).topk(args.k, largest=False).indices
                 for i in range(0, queries.shape[0], CDIST_BLOCK)]
        return torch.cat(found)

    float_index = KnnIndex(store, scorer="float")  # the scorer CPUs without an exact uint8 x int8 GEMM get
    build["ours, float scorer"] = time.perf_counter() - started
    methods = {
        "ours": lambda q: knn_search(q, store, k=args.k).indices,
        "ours, float scorer": lambda q: float_index.search(q, k=args.k).indices,
        "faiss IndexFlatL2": lambda q: torch.from_numpy(index.search(q.numpy(), args.k)[1]),
        "torch.cdist+topk": cdist_topk,
    }
    check = flat[: args.check]
    reference = float64_reference(store, check, args.k)
    rows = []
    for name, search in methods.items():
        wall, cpu, found = timed(lambda: search(flat))
        rows.append({
            "method": name, "samples": args.samples, "store": args.store, "dim": store.dim, "k": args.k,
            "seconds": wall, "cpu_seconds": cpu, "build_seconds": build[name],
            "peak_extra_mib": peak_extra_mib(lambda: search(flat[: args.memory_samples])),
            "memory_samples": args.memory_samples,
            "index_equality": float((found[: args.check] == reference).all(1).double().mean()),
        })
        print(json.dumps(rows[-1]), flush=True)
    ours = rows[0]
    for row in rows[1:]:
        print(f"# ours vs {row['method']}: {row['seconds'] / ours['seconds']:.2f}x wall, "
              f"{row['cpu_seconds'] / ours['cpu_seconds']:.2f}x cpu")
    print(f"# load_average_after={os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()

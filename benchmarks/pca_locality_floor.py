"""A lower bound on the time of any exact pca_locality step on this CPU, next to the dense einsum and ours.

Every exact evaluation of the formula has to (1) produce one masked distance per (query, output pixel, image),
because the mask columns are (all but a few) distinct, and (2) exponentiate every logit that does not underflow
in float32 (logit > row max - 104). The distances' costly part is the cross term sum_p Mask[p, q] x[p] u_i[p]
(u: the uint8 pixels); the fastest exact product PyTorch offers here is oneDNN's uint8 x int8 (AMX), which takes
the query in 8-bit digits. The script measures, on the MNIST benchmark (mnist5k, `mask_threshold` 0.005, 10 DDIM
steps, B = 16): the distinct mask columns, the fraction of live logits, the output error when the query is
rounded to 16 bits (two digits; float64 formula, first 4 queries), and the rates of `torch.exp` and of the
integer product. The floor of a step is

    live fraction x (exp of all B N n_a logits) + mask density x digits x (one-digit product at full n_a^2),

generous on purpose: a sparse product at dense speed, nothing else counted (no differences, maximum, weighted
sum or memory traffic between the parts). Its total over the steps, against the dense einsum's measured in the
same run, bounds the speed-up of any implementation built from these operations.

    PYTHONPATH=src python benchmarks/pca_locality_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from bench_pca_locality import dense_einsum_step, mnist_store, timed

from analytic_diffusion.denoisers.base import NoiseLevel
from analytic_diffusion.denoisers.pca_locality import PcaLocality, PcaLocalityParams
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level

UNDERFLOW = 104.0  # exp(-104) is below float32's smallest denormal: such weights are exactly 0


def best_of(repeats: int, fn) -> float:
    """Fastest of `repeats` timed calls, after one warm-up."""
    fn()
    return min(timed(fn)[0] for _ in range(repeats))


def logits(
    x_active: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, level: NoiseLevel, chunk: int = 500
) -> torch.Tensor:
    """The [B, N, n_a] logits of the formula, dense, in the dtype of the inputs."""
    out = x_active.new_empty(x_active.shape[0], images.shape[0], mask.shape[1])
    for start in range(0, images.shape[0], chunk):
        squared = (x_active[:, None, :] - level.signal_scale * images[None, start : start + chunk]).square_()
        out[:, start : start + chunk] = torch.matmul(squared, mask).mul_(-1.0 / (2.0 * level.noise_variance))
    return out


def live_fraction(logit: torch.Tensor) -> float:
    """Fraction of the logits within UNDERFLOW of their (query, pixel) maximum over the images."""
    return (logit >= logit.amax(1, keepdim=True) - UNDERFLOW).double().mean().item()


def rounded_query_error(
    x_active: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, level: NoiseLevel, bits: int
) -> float:
    """Max |x0_hat(x rounded to `bits` bits with a power-of-two scale per query) - x0_hat(x)|, float64."""
    x, images, mask = x_active.double(), images.double(), mask.double()
    amax = x.abs().amax(1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / (2 ** (bits - 1) - 1))))
    outputs = [
        torch.einsum("bnq,nq->bq", torch.softmax(logits(query, images, mask, level), 1), images)
        for query in (x, (x / scale).round() * scale)
    ]
    return (outputs[1] - outputs[0]).abs().max().item()


def exp_seconds(rows: int, num_images: int, repeats: int) -> float:
    """torch.exp over one step's [rows, N] float32 logits, in place of a preallocated output."""
    logits, out = torch.randn(rows, num_images) * 10, torch.empty(rows, num_images)
    return best_of(repeats, lambda: torch.exp(logits, out=out))


def int8_product_seconds(num_images: int, dim: int, rows: int, repeats: int) -> dict[str, float]:
    """The exact integer product [N, dim] x [dim, rows] two ways: oneDNN's prepacked uint8 x int8 -> float32,
    and torch._int_mm (int8 x int8 -> int32)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (num_images, dim), dtype=torch.uint8, generator=g)
    digits = torch.randint(-128, 128, (rows, dim), dtype=torch.int8, generator=g)
    seconds = {}
    try:
        packed = torch.ops.onednn.qlinear_prepack(digits, None)
        zero_points, scales = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
        seconds["onednn u8s8"] = best_of(repeats, lambda: torch.ops.onednn.qlinear_pointwise(
            data, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        ))
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    signed, columns = (data.to(torch.int16) - 128).to(torch.int8), digits.t().contiguous()
    seconds["_int_mm s8s8"] = best_of(repeats, lambda: torch._int_mm(signed, columns))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits", type=int, default=3, help="8-bit query digits an exact product needs")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    store = mnist_store(5000)
    denoiser = PcaLocality(PcaLocalityParams(mask_threshold=0.005)).fit(store)
    scheduler = make_scheduler(SchedulerOptions(num_inference_steps=args.steps))
    active, batch, num_images = denoiser.active, args.batch_size, store.num_images
    n_active, rows = active.numel(), args.batch_size * active.numel()
    images = store.model_space(0, num_images, "cpu", torch.float32).flatten(1)[:, active]
    g = torch.Generator().manual_seed(0)
    clean = store.gather(torch.randint(0, num_images, (batch,), generator=g))

    exp_s = exp_seconds(rows, num_images, args.repeats)
    products = int8_product_seconds(num_images, n_active, rows, args.repeats)
    product_name, product_s = min(products.items(), key=lambda item: item[1])
    print(f"mnist: N={num_images}, n_a={n_active}, B={batch}, threads={torch.get_num_threads()}")
    print(f"exp of B N n_a = {rows * num_images / 1e6:.0f} M float32 logits: {exp_s:.3f} s "
          f"({rows * num_images / exp_s / 1e9:.2f} G/s)")
    for name, seconds in products.items():
        print(f"int8 product [N, n_a] x [n_a, B n_a], {name}: {seconds:.3f} s "
              f"({num_images * n_active * rows / seconds / 1e12:.2f} T multiply-adds/s)")
    print("| t | distinct mask columns (of n_a) | mask density (of n_a^2) | live logits | error of a 16-bit query "
          f"| floor s ({args.digits} digits) | ours s | dense einsum s |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"floor": 0.0, "ours": 0.0, "einsum": 0.0}
    for t in scheduler.timesteps.tolist():
        level = noise_level(scheduler, t)
        x_t = level.signal_scale * clean + math.sqrt(level.noise_variance) * torch.randn(clean.shape, generator=g)
        mask = denoiser.mask(level)[active][:, active]
        distinct = torch.unique(mask.t(), dim=0).shape[0]
        density = mask.double().mean().item()
        x_active = x_t.flatten(1)[:, active]
        live = live_fraction(logits(x_active, images, mask.float(), level))
        error = rounded_query_error(x_active[:4], images, mask, level, 16)
        floor = live * exp_s + density * args.digits * product_s
        denoiser.plan(level)
        ours = statistics.median(timed(lambda: denoiser(x_t, level))[0] for _ in range(args.repeats))
        einsum = statistics.median(
            timed(lambda: dense_einsum_step(denoiser, x_t, level, 500))[0] for _ in range(args.repeats)
        )
        for name, seconds in (("floor", floor), ("ours", ours), ("einsum", einsum)):
            totals[name] += seconds
        print(f"| {t} | {distinct} | {density:.3f} | {live:.3f} | {error:.1e} | {floor:.3f} | {ours:.3f} "
              f"| {einsum:.3f} |")
    print(f"| all {args.steps} steps | | | | | {totals['floor']:.2f} | {totals['ours']:.2f} | {totals['einsum']:.2f} |")
    print(f"product: {product_name}; the largest possible speed-up over the dense einsum: "
          f"{totals['einsum'] / totals['floor']:.1f}x (ours: {totals['einsum'] / totals['ours']:.1f}x)")


if __name__ == "__main__":
    main()

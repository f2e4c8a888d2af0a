"""The PCA-locality denoiser (arXiv 2509.09672; DESIGN.md §3): a per-pixel softmax over the whole dataset, where
output pixel q compares x_t with sqrt(a) y_i only on the pixels of its mask.

    R[p, q] = P_t[p, q] / P_t[p, p],   Mask = |R| >= mask_threshold * max|R|    (P_t: the Wiener projection)
    d_iq = sum_p Mask[p, q] (x_t[p] - sqrt(a) y_i[p])^2,   w_iq = softmax_i(-d_iq / (2 (1 - a) tau))
    x0_hat[q] = sum_i w_iq y_i[q]

The softmax runs over all N images with the shared streaming log-sum-exp, so the result does not depend on the
chunk size. Per timestep the mask is built once and compiled into a plan: pixels constant across the dataset are
dropped (they shift every logit equally), the others are ordered by (row, column, channel) so that a local mask
is a band a few image rows high; each group of output pixels sums its squared differences with one matrix product
over the run of rows its masks use densely, and gathers the remaining mask entries (`embedding_bag`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.store import DatasetStore
from ..errors import StudioError
from ..search.softmax import StreamingSoftmax, logit_floor
from ..statistics import dataset_statistics
from .base import Denoised, Denoiser, NoiseLevel, check_chunk_size, check_temperature, register_denoiser
from .wiener import GaussianModel

GATHER_COST = 16  # one gathered addition costs about this many multiply-adds of a dense matrix product
CHUNK_BYTES = 32 << 20  # size of one chunk's [pixels, B, K] squared-difference tensor
MIN_GROUP = 256  # output pixels per band group: at least this many, in whole image rows
PLAN_CACHE_BYTES = 2 << 30  # compiled masks kept across batches up to this size; later ones are rebuilt per call


@dataclass
class PcaLocalityParams:
    temperature: float = 1.0  # tau: logits are -d / (2 (1 - ab_t) tau)
    mask_threshold: float = 0.005  # p joins pixel q's mask when |R[p, q]| >= mask_threshold * max|R|; 0 = all pixels
    robust_mask: bool = True  # flat pixels neither set max|R| nor join other masks; every pixel is in its own mask
    flat_fraction: float = 1e-3  # robust_mask: pixel p is flat when P_t[p, p] <= flat_fraction * max_p P_t[p, p]
    chunk_size: int | None = None  # dataset images per chunk; None = chosen from memory

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if not 0 <= self.mask_threshold <= 1:
            raise StudioError(f"model.params.mask_threshold must be in [0, 1] (a fraction of max|R|), got {self.mask_threshold}")
        if not 0 <= self.flat_fraction <= 1:
            raise StudioError(f"model.params.flat_fraction must be in [0, 1], got {self.flat_fraction}")
        check_chunk_size(self.chunk_size)


def locality_mask(
    projection: torch.Tensor, threshold: float, robust: bool = True, flat_fraction: float = 1e-3
) -> torch.Tensor:
    """The binary mask [n, n] (column q = the pixels output q looks at) from P_t; overwrites `projection`.

    Plain (robust=False): the formula as written, 0/0 counted as 0. Robust: rows of flat pixels (P_t[p, p]
    near 0, where the ratio is round-off over round-off) are set to 0 before taking max|R|, and the diagonal is
    always kept, so no mask is empty (DESIGN.md §3, the degenerate case).
    """
    diagonal = projection.diagonal().clone()
    ratio = projection.div_(diagonal[:, None]).abs_().nan_to_num_(nan=0.0)
    if robust:
        ratio[diagonal <= flat_fraction * diagonal.max()] = 0.0
    mask = ratio >= threshold * ratio.max()
    if robust:
        mask.fill_diagonal_(True)
    return mask


@dataclass
class Band:
    """A group of consecutive output pixels and the run of rows that one matrix product covers for them."""

    first_output: int  # positions in the plan's `active` order: outputs [first_output, first_output + len(mask))
    start: int  # rows [start, stop) of the squared differences
    stop: int
    mask: torch.Tensor  # bool [outputs of the group, stop - start]


@dataclass
class MaskPlan:
    """One timestep's mask compiled for the distance computation; rows and outputs are positions in `active`.

    The masked sum of output j is embedding_bag(bag rows of j) + (band product of j's group, if any).
    """

    active: torch.Tensor  # long [n_a]: pixels that vary across the dataset, ordered by (row, column, channel)
    bag_indices: torch.Tensor  # long [nnz]: per output, the mask rows no band covers, concatenated
    bag_offsets: torch.Tensor  # long [n_a]: where each output starts in bag_indices
    bands: list[Band]
    mask_sizes: torch.Tensor  # long [n]: |mask of q| over all pixels (diagnostics, empty-mask checks)

    @property
    def nbytes(self) -> int:
        tensors = [self.active, self.bag_indices, self.bag_offsets, self.mask_sizes]
        return sum(t.nbytes for t in tensors) + sum(band.mask.nbytes for band in self.bands)


def spatial_order(pixels: torch.Tensor, sample_shape: tuple[int, int, int]) -> torch.Tensor:
    """`pixels` (flat indices into [C, H, W]) sorted by (row, column, channel), so that a local mask covers a
    contiguous band of positions a few image rows high."""
    channels, height, width = sample_shape
    plane = pixels % (height * width)
    return pixels[torch.argsort(plane * channels + pixels // (height * width))]


def best_run(gain: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) maximising gain[lo:hi].sum() (empty when no run has a positive sum): Kadane via prefix sums."""
    prefix = torch.cat([gain.new_zeros(1), gain.cumsum(0)])
    lowest, where = torch.cummin(prefix, 0)
    score = prefix[1:] - lowest[:-1]
    end = int(score.argmax())
    return (int(where[end]), end + 1) if score[end] > 0 else (0, 0)


def compile_mask(mask: torch.Tensor, active: torch.Tensor, group_size: int) -> MaskPlan:
    """Compile `mask` for the `active` pixels. Each group of `group_size` consecutive outputs gets the run of rows
    where a matrix product is cheaper than gathering (a row used by h of the group's g outputs saves
    GATHER_COST * h - g); mask entries outside the run are gathered with embedding_bag."""
    sub = mask[active][:, active]
    n_active = sub.shape[0]
    rest, bands = sub.clone(), []
    for first in range(0, n_active, group_size):
        columns = slice(first, min(first + group_size, n_active))
        users = sub[:, columns].sum(1)
        start, stop = best_run(GATHER_COST * users - (columns.stop - first))
        if stop > start:
            bands.append(Band(first, start, stop, sub[start:stop, columns].T.contiguous()))
            rest[start:stop, columns] = False
    sizes = rest.sum(0)
    return MaskPlan(
        active=active,
        bag_indices=rest.T.nonzero()[:, 1].contiguous(),  # (output, row) pairs sorted by output
        bag_offsets=torch.cumsum(sizes, 0) - sizes,
        bands=bands,
        mask_sizes=mask.sum(0),
    )


class WideSums(StreamingSoftmax):
    """`StreamingSoftmax` with float32 logits and weights but float64 sums: the normaliser and the weighted sum
    come from one float64 product of the weights with [values | 1]. Float32 sums of thousands of weights err by
    about 1e-5 in x0_hat and by different amounts for different chunkings (the shards of a distributed run are
    one); float64 sums err by < 1e-6 whatever the chunks, for the price of copying the weights into a reused
    float64 buffer. Logits must be finite."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = torch.empty(0, dtype=torch.float64)

    def add(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """logits [P, B, K] (overwritten), values [P, K, 2] float64: [y | 1]."""
        chunk_max = logits.amax(-1)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        weights = logits.sub_(new_max[..., None]).clamp_(min=logit_floor(logits.dtype)).exp_()
        if self.buffer.numel() < weights.numel() or self.buffer.device != weights.device:
            self.buffer = torch.empty(weights.numel(), dtype=torch.float64, device=weights.device)
        wide = self.buffer[: weights.numel()].view(weights.shape).copy_(weights)  # no fresh pages per chunk
        sums = torch.bmm(wide, values)  # [P, B, 2]
        numerator, total = sums[..., 0], sums[..., 1]
        if self.max is None:
            self.numerator, self.total = numerator, total
        else:
            rescale = torch.exp(self.max.double() - new_max.double())
            self.numerator = self.numerator * rescale + numerator
            self.total = self.total * rescale + total
        self.max = new_max


@register_denoiser("pca_locality")
class PcaLocality(Denoiser):
    """Per-pixel softmax over the dataset on data-derived local masks (Wiener projection, thresholded)."""

    Params = PcaLocalityParams

    def fit(self, store: DatasetStore) -> PcaLocality:
        self.store = store
        self.model = GaussianModel(dataset_statistics(store, self.cache_dir, self.device), self.device)
        varying = (self.model.stats.pixel_variance > 0).nonzero().squeeze(1).to(self.device)
        self.active = spatial_order(varying, store.sample_shape)
        self._plans: dict[float, MaskPlan] = {}
        return self

    def mask(self, level: NoiseLevel) -> torch.Tensor:
        """Mask[p, q] at this noise level, bool [n, n]: column q holds the pixels output pixel q compares."""
        p = self.params
        return locality_mask(self.model.projection(level.alpha_bar), p.mask_threshold, p.robust_mask, p.flat_fraction)

    def plan(self, level: NoiseLevel) -> MaskPlan:
        """The compiled mask of this noise level, built on first use and kept for later batches (within
        PLAN_CACHE_BYTES)."""
        if level.alpha_bar in self._plans:
            return self._plans[level.alpha_bar]
        channels, _, width = self.store.sample_shape
        group = channels * width * -(-MIN_GROUP // (channels * width))
        plan = compile_mask(self.mask(level), self.active, group)
        if sum(p.nbytes for p in self._plans.values()) + plan.nbytes <= PLAN_CACHE_BYTES:
            self._plans[level.alpha_bar] = plan
        return plan

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        plan, batch, dtype = self.plan(level), x_t.shape[0], x_t.dtype
        flat = x_t.reshape(batch, -1)
        x0_hat = self.model.mean.to(dtype).expand(batch, -1).clone()  # constant pixels: their one value
        if plan.active.numel():
            x_active = flat[:, plan.active].T.contiguous()  # [n_a, B]: pixel-major, like every tensor below
            x0_hat[:, plan.active] = self._softmax_average(x_active, plan, level).T.to(dtype)
        sizes = plan.mask_sizes.to(dtype)
        diagnostics = {
            "mask_mean_size": sizes.mean().expand(batch),
            "mask_empty_pixels": (plan.mask_sizes == 0).sum().expand(batch),
        }
        return Denoised(x0_hat.reshape(x_t.shape), diagnostics)

    def _softmax_average(self, x_active: torch.Tensor, plan: MaskPlan, level: NoiseLevel) -> torch.Tensor:
        """sum_i w_iq y_i[q] for the active pixels, [n_a, B] (float64), streamed over dataset chunks."""
        return self._softmax_state(x_active, plan, level).mean()

    def _softmax_state(self, x_active: torch.Tensor, plan: MaskPlan, level: NoiseLevel) -> StreamingSoftmax:
        """The streamed softmax over the store's images (per active pixel and sample: max, normaliser and weighted
        sum, the sums in float64), before its division: what the shards of a distributed run merge
        (distributed/dataset.py)."""
        n_active, batch = x_active.shape
        dtype, device = x_active.dtype, x_active.device
        # the logit scale -1 / (2 (1 - a) tau) is folded into the mask values, so sums come out as logits
        scale = -1.0 / (2.0 * level.noise_variance * self.params.temperature)
        bands = [band.mask.to(dtype).mul_(scale) for band in plan.bands]
        bag_weights = torch.full(plan.bag_indices.shape, scale, dtype=dtype, device=device)
        chunk = self.params.chunk_size or max(1, CHUNK_BYTES // (x_active.element_size() * n_active * batch))
        softmax = WideSums()
        for start in range(0, self.store.num_images, chunk):
            images = self.store.model_space(start, start + chunk, device, dtype).flatten(1)
            images = images[:, plan.active].T.contiguous()  # [n_a, K]
            size = images.shape[1]
            squared = (x_active[:, :, None] - level.signal_scale * images[:, None, :]).square_()
            squared = squared.view(n_active, batch * size)
            logits = F.embedding_bag(
                plan.bag_indices, squared, plan.bag_offsets, mode="sum", per_sample_weights=bag_weights
            )
            for band, band_weights in zip(plan.bands, bands):
                rows = logits[band.first_output : band.first_output + band_weights.shape[0]]
                rows.addmm_(band_weights, squared[band.start : band.stop])
            values = torch.stack([images.double(), torch.ones_like(images, dtype=torch.float64)], -1)  # [n_a, K, 2]
            softmax.add(logits.view(n_active, batch, size), values)
        return softmax

"""The PCA-locality denoiser (arXiv 2509.09672; DESIGN.md §3): a per-pixel softmax over the whole dataset, where
output pixel q compares x_t with sqrt(a) y_i only on the pixels of its mask.

    R[p, q] = P_t[p, q] / P_t[p, p],   Mask = |R| >= mask_threshold * max|R|    (P_t: the Wiener projection)
    d_iq = sum_p Mask[p, q] (x_t[p] - sqrt(a) y_i[p])^2,   w_iq = softmax_i(-d_iq / (2 (1 - a) tau))
    x0_hat[q] = sum_i w_iq y_i[q]

The softmax runs over all N images with the shared streaming log-sum-exp, so the result does not depend on the
chunk size. Per timestep the mask is built once and compiled into a plan: pixels constant across the dataset are
dropped (they shift every logit equally), the others are ordered by (row, column, channel) so that a local mask
is a band a few image rows high, and each image row of output pixels sums its squared differences either with a
gather (`embedding_bag`, for small masks) or with one matrix product over the band of rows its masks span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.store import DatasetStore
from ..search.softmax import StreamingSoftmax
from ..statistics import dataset_statistics
from .base import Denoised, Denoiser, NoiseLevel, register_denoiser
from .wiener import GaussianModel

GATHER_COST = 16  # one gathered addition costs about this many multiply-adds of a dense matrix product
CHUNK_BYTES = 32 << 20  # size of one chunk's [pixels, B, K] squared-difference tensor
PLAN_CACHE_BYTES = 2 << 30  # compiled masks kept across batches up to this size; later ones are rebuilt per call


@dataclass
class PcaLocalityParams:
    temperature: float = 1.0  # tau: logits are -d / (2 (1 - ab_t) tau)
    mask_threshold: float = 0.005  # p joins pixel q's mask when |R[p, q]| >= mask_threshold * max|R|; 0 = all pixels
    robust_mask: bool = True  # flat pixels neither set max|R| nor join other masks; every pixel is in its own mask
    flat_fraction: float = 1e-3  # robust_mask: pixel p is flat when P_t[p, p] <= flat_fraction * max_p P_t[p, p]
    chunk_size: int | None = None  # dataset images per chunk; None = chosen from memory


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
    """Output pixels whose masks lie within one contiguous run of rows: one matrix product over that run."""

    start: int  # first row (position in the plan's `active` order) any of these masks uses
    stop: int  # one past the last
    mask: torch.Tensor  # bool [pixels of the band, stop - start]


@dataclass
class MaskPlan:
    """One timestep's mask compiled for the distance computation; rows and columns are positions in `active`."""

    active: torch.Tensor  # long [n_a]: pixels that vary across the dataset, ordered by (row, column, channel)
    outputs: torch.Tensor  # long [n_out]: the pixel each row of the logits belongs to (gathered groups first)
    bag_indices: torch.Tensor  # long [nnz]: mask rows of the gathered pixels, concatenated
    bag_offsets: torch.Tensor  # long [n_bag]: where each gathered pixel starts in bag_indices
    bands: list[Band]  # the other pixels, in `outputs` order after the gathered ones
    mask_sizes: torch.Tensor  # long [n]: |mask of q| over all pixels (diagnostics, empty-mask checks)

    @property
    def nbytes(self) -> int:
        tensors = [self.active, self.outputs, self.bag_indices, self.bag_offsets, self.mask_sizes]
        return sum(t.nbytes for t in tensors) + sum(band.mask.nbytes for band in self.bands)


def spatial_order(pixels: torch.Tensor, sample_shape: tuple[int, int, int]) -> torch.Tensor:
    """`pixels` (flat indices into [C, H, W]) sorted by (row, column, channel), so that a local mask covers a
    contiguous band of positions a few image rows high."""
    channels, height, width = sample_shape
    plane = pixels % (height * width)
    return pixels[torch.argsort(plane * channels + pixels // (height * width))]


def compile_mask(mask: torch.Tensor, active: torch.Tensor, group_size: int) -> MaskPlan:
    """Compile `mask` for the `active` pixels: consecutive groups of `group_size` output pixels are summed either by
    gathering (embedding_bag) or by one matrix product over the band of rows their masks span, whichever is
    cheaper (GATHER_COST gathered additions per multiply-add)."""
    sub = mask[active][:, active]
    n_active = sub.shape[0]
    sizes = sub.sum(0)
    first, last = sizes, sizes  # first / last row in each mask (argmax returns the first maximum)
    if n_active:
        as_bytes = sub.to(torch.uint8)
        first = torch.where(sizes > 0, as_bytes.argmax(0), n_active)
        last = torch.where(sizes > 0, n_active - 1 - as_bytes.flip(0).argmax(0), -1)
    gathered, bands, band_cols = [], [], []
    for start in range(0, n_active, group_size):
        cols = torch.arange(start, min(start + group_size, n_active), device=sub.device)
        lo, hi = int(first[cols].min()), int(last[cols].max()) + 1
        if GATHER_COST * int(sizes[cols].sum()) <= cols.numel() * max(hi - lo, 0):
            gathered.append(cols)
        else:
            bands.append(Band(lo, hi, sub[lo:hi, cols].T.contiguous()))
            band_cols.append(cols)
    bag_cols = torch.cat(gathered) if gathered else torch.zeros(0, dtype=torch.long, device=sub.device)
    bag_rows = sub[:, bag_cols].T.nonzero()  # (column, row) pairs, sorted by column
    offsets = torch.cumsum(sizes[bag_cols], 0) - sizes[bag_cols]
    return MaskPlan(
        active=active,
        outputs=active[torch.cat([bag_cols, *band_cols])],
        bag_indices=bag_rows[:, 1].contiguous(),
        bag_offsets=offsets,
        bands=bands,
        mask_sizes=mask.sum(0),
    )


@register_denoiser("pca_locality")
class PcaLocality(Denoiser):
    """Per-pixel softmax over the dataset on data-derived local masks (Wiener projection, thresholded)."""

    Params = PcaLocalityParams

    def fit(self, store: DatasetStore) -> PcaLocality:
        if self.params.temperature <= 0:
            raise ValueError(f"pca_locality temperature must be positive, got {self.params.temperature}")
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
        plan = compile_mask(self.mask(level), self.active, channels * width)
        if sum(p.nbytes for p in self._plans.values()) + plan.nbytes <= PLAN_CACHE_BYTES:
            self._plans[level.alpha_bar] = plan
        return plan

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        plan, batch, dtype = self.plan(level), x_t.shape[0], x_t.dtype
        flat = x_t.reshape(batch, -1)
        x0_hat = self.model.mean.to(dtype).expand(batch, -1).clone()  # constant pixels: their one value
        if plan.outputs.numel():
            x_active = flat[:, plan.active].T.contiguous()  # [n_a, B]: pixel-major, like every tensor below
            x0_hat[:, plan.outputs] = self._softmax_average(x_active, plan, level).T
        sizes = plan.mask_sizes.to(dtype)
        diagnostics = {
            "mask_mean_size": sizes.mean().expand(batch),
            "mask_empty_pixels": (plan.mask_sizes == 0).sum().expand(batch),
        }
        return Denoised(x0_hat.reshape(x_t.shape), diagnostics)

    def _softmax_average(self, x_active: torch.Tensor, plan: MaskPlan, level: NoiseLevel) -> torch.Tensor:
        """sum_i w_iq y_i[q] for the plan's output pixels, [n_out, B], streamed over dataset chunks."""
        n_active, batch = x_active.shape
        n_bag, dtype, device = plan.bag_offsets.numel(), x_active.dtype, x_active.device
        # the logit scale -1 / (2 (1 - a) tau) is folded into the mask values, so sums come out as logits
        scale = -1.0 / (2.0 * level.noise_variance * self.params.temperature)
        bands = [band.mask.to(dtype).mul_(scale) for band in plan.bands]
        bag_weights = torch.full(plan.bag_indices.shape, scale, dtype=dtype, device=device)
        chunk = self.params.chunk_size or max(1, CHUNK_BYTES // (x_active.element_size() * n_active * batch))
        softmax = StreamingSoftmax()
        for start in range(0, self.store.num_images, chunk):
            images = self.store.model_space(start, start + chunk, x_active.device, dtype).flatten(1)
            size = images.shape[0]
            scaled = (level.signal_scale * images[:, plan.active]).T.contiguous()  # [n_a, K]
            squared = (x_active[:, :, None] - scaled[:, None, :]).square_().view(n_active, batch * size)
            logits = torch.empty(plan.outputs.numel(), batch * size, dtype=dtype, device=device)
            if n_bag:
                logits[:n_bag] = F.embedding_bag(
                    plan.bag_indices, squared, plan.bag_offsets, mode="sum", per_sample_weights=bag_weights
                )
            row = n_bag
            for band, weights in zip(plan.bands, bands):
                torch.mm(weights, squared[band.start : band.stop], out=logits[row : row + weights.shape[0]])
                row += weights.shape[0]
            values = images[:, plan.outputs].T.unsqueeze(-1)  # [n_out, K, 1]
            softmax.update(logits.view(-1, batch, size), lambda weights: torch.bmm(weights, values).squeeze(-1))
        return softmax.mean()

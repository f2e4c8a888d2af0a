"""One streaming patch softmax for every local patch denoiser (DESIGN.md §6): LS, ELS and PSPC.

Each query window q (a C x kh x kw window of x_t, flattened to D values) is compared with a dictionary of training
windows phi cut from every image of the store at a set of positions:

    logit(q, phi) = -||q - s phi||^2 / (2 (1 - ab_t) tau) + const(q) = c (2 s q.phi - s^2 ||phi||^2)

with s = sqrt(ab_t) and c = 1 / (2 (1 - ab_t) tau) (||q||^2 is the same for every phi and cancels). The answer
per query is the softmax-weighted average of a value of each window: its centre pixel (LS, ELS) or the whole
window (PSPC).

Streaming: the store stays in its compact dtype and is decoded chunk by chunk (the windows a group uses copied
from strided views of the padded chunk, `gather_windows`); the cross terms q.phi of a chunk are one batched
matrix product per group of queries; every (sample, query) row keeps its own running maximum, normaliser and
weighted sum (`StreamingSoftmax`), so the result does not depend on the chunking and no maximum is shared across
a batch. Samples are processed one by one against each chunk in the matrix products
(aligned groups batch them through elementwise operations and halving sums only) and chunk sizes never depend on
the batch, so a sample's result is bit-identical whatever batch it is in. Temporaries stay under
BUDGET_BYTES (chunk windows) and LOGIT_BLOCK (logits of one block) whatever N. Logits are float32 while their
rounding error stays below FLOAT32_LOGIT_NOISE and float64 beyond (the late steps, where c is large), the same
discipline as `optimal`; the streams work in base 2 (log2 e folded into c, exp2 for exp). A shared dictionary
whose windows repeat (backgrounds) can be given as its distinct windows with their counts (`unique_windows`, built
once per patch size, at most DISTINCT_BYTES): exact, and proportionally fewer logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..data.store import DatasetStore
from .softmax import StreamingSoftmax, logit_floor

DISTINCT_BYTES = 256 << 20  # a shared dictionary is deduplicated when its distinct windows fit in this
MAX_DISTINCT_FRACTION = 0.9  # ... and when at most this fraction of the first chunk's windows are distinct
MIN_DEDUP_POSITIONS = 16  # ... and when it has at least this many positions per image (edge groups have few)
BUDGET_BYTES = 32 << 20  # temporaries of one chunk (its windows, as `chunk_images` counts them), whatever N
MIN_BLOCK_ROWS = 64  # query rows of a block at least, where the chunk allows (fewer make the products inefficient)
LOGIT_BLOCK = 1 << 19  # logits of one (sample, group, chunk) block: small enough to stay in cache (L3),
# large enough that per-call overheads stay small (2^19 is 8-15% faster than 2^18 at k = 3-7 with the few passes
# left per block; docs/local-patch.md)
WIDE_WINDOWS = 81  # windows of at least this many values (k >= 9 in grey) get blocks WIDE_FACTOR times larger:
WIDE_FACTOR = 2  # the product then dominates, and it runs 15-20% faster with more rows than the cache-sized block
WIDE_MIN_ROWS = 256  # ... and at least this many query rows
FLOAT32_LOGIT_NOISE = 1e-4  # above this bound on the float32 logit error, logits are computed in float64
WEIGHT_FLOOR = logit_floor(torch.float32)  # -43.7: float32 weights are floored at e^this
MAX_LOGIT_SCALE = 1e30  # c at ab_t = 1 (no noise): the nearest-window limit, kept finite
LOG2E = 1.0 / math.log(2.0)  # the streams work in base 2 (c log2 e folded into the queries, exp2 for exp):
# exp2 is about twice as fast as exp on CPUs, and the weights are the same


def block_shape(depth: int) -> tuple[int, int]:
    """(logits of one block, least query rows of a block) for windows of `depth` values."""
    if depth >= WIDE_WINDOWS:
        return LOGIT_BLOCK * WIDE_FACTOR, WIDE_MIN_ROWS
    return LOGIT_BLOCK, MIN_BLOCK_ROWS


def weight_floor(dtype: torch.dtype) -> float:
    """log2 of the smallest weight kept (relative to the row's largest): weights are floored at sqrt(tiny), no
    subnormals (they slow the CPU down 20-50x); a sum whose largest term is 1 changes by at most M sqrt(tiny)."""
    return 0.5 * math.log2(torch.finfo(dtype).tiny)


@dataclass(frozen=True)
class WindowSpec:
    """How training windows are cut: F.unfold(images, size, padding=padding); the value of a window is its
    centre pixel (C values, `value="centre"`, requires a grid of one window per pixel) or the window (D values)."""

    size: tuple[int, int]  # (kh, kw)
    padding: int = 0  # zero padding of the training images (model space 0: contributes nothing in either)
    value: str = "centre"  # centre | window

    def grid_shape(self, sample_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(rows, columns) of the windows the unfold cuts from one [C, H, W] image (a window's position is
        row * columns + column)."""
        _, height, width = sample_shape
        return height + 2 * self.padding - self.size[0] + 1, width + 2 * self.padding - self.size[1] + 1


@dataclass
class UniqueWindows:
    """The distinct windows of a shared dictionary and how often each occurs (N (H - k + 1)^2 MNIST windows of
    size 3 hold about 27% distinct ones: the background repeats). A window that occurs m times enters the softmax
    once, weighing m times as much: the same weights, sums and 1 / sum w^2 as the full dictionary."""

    windows: torch.Tensor  # [U, D] model space, float32
    counts: torch.Tensor  # [U] float64 multiplicities
    values: torch.Tensor  # [U, V] the value of each window (its centre pixel)
    operands: dict[int, list] = field(default_factory=dict, repr=False)  # `float32_operands` by chunk, once built

    def float32_operands(self, rows: int, bias_scale: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The float32 product operands of the distinct windows in chunks of `rows`, built once and kept (the same
        numbers a construction per call gives, contiguous as it gives them): per chunk [1, D + 1, M] windows with
        this step's biases `bias_scale` ||phi||^2 in the last row (rewritten on every call), [1, V + 1, M] values
        times m with m in the last row, and [M] m^1/2."""
        if rows not in self.operands:
            parts = self.operands[rows] = []
            for start in range(0, self.windows.shape[0], rows):
                phi, counts = self.windows[start : start + rows], self.counts[start : start + rows].float()
                norms = phi.square().sum(1)
                values = torch.cat([self.values[start : start + rows].float().T * counts, counts[None]])
                parts.append((torch.cat([phi.T, norms[None]]), norms, values, counts.sqrt()))
        for windows, norms, _, _ in self.operands[rows]:
            torch.mul(norms, bias_scale, out=windows[-1])
        return [(windows[None], values[None], roots) for windows, _, values, roots in self.operands[rows]]


def unique_windows(store: DatasetStore, images: torch.Tensor, window: WindowSpec, position_sets: list[torch.Tensor],
                   max_bytes: int, chunk: int = 256) -> list[UniqueWindows | None]:
    """For each position set [1, S]: the distinct windows at those positions of every image, or None where they
    are not worth it (more than MAX_DISTINCT_FRACTION distinct in the first chunk) or exceed `max_bytes`.
    Each chunk of images is padded once; each set's windows are copied from it (`gather_windows`)."""
    strips = [window_strips(positions, window, store.sample_shape) for positions in position_sets]
    parts: list[list | None] = [[] if _may_repeat(store, images[:chunk], window, positions) else None
                                for positions in position_sets]
    if all(part is None for part in parts):
        return [None] * len(position_sets)
    sizes = [0] * len(position_sets)
    for start in range(0, store.num_images, chunk):
        padded = F.pad(store.decode(images[start : start + chunk], torch.float32), (window.padding,) * 4)
        for i, positions in enumerate(position_sets):
            if parts[i] is None:
                continue
            rows = _windows_at(padded, strips[i], positions.shape[1], window.size).T  # [K S, D], image-major
            distinct, count = torch.unique(rows, dim=0, return_counts=True)
            sizes[i] += distinct.numel() * distinct.element_size()
            if sizes[i] > max_bytes or (start == 0 and distinct.shape[0] > MAX_DISTINCT_FRACTION * rows.shape[0]):
                parts[i] = None
                continue
            parts[i].append((distinct, count.to(torch.float64)))
        if all(part is None for part in parts):
            break
    channels = store.sample_shape[0]
    kh, kw = window.size
    centre = (torch.arange(channels) * kh * kw + (kh // 2) * kw + kw // 2).to(images.device)
    out: list[UniqueWindows | None] = []
    for part in parts:
        if part is None:
            out.append(None)
            continue
        kept, inverse = torch.unique(torch.cat([d for d, _ in part]), dim=0, return_inverse=True)
        counts = torch.zeros(kept.shape[0], dtype=torch.float64, device=kept.device)
        counts.index_add_(0, inverse, torch.cat([c for _, c in part]))
        out.append(UniqueWindows(kept, counts, kept[:, centre]))
    return out


def distinct_window_keys(images: torch.Tensor, window: WindowSpec, positions: torch.Tensor, sample_shape
                         ) -> tuple[int, int]:
    """(distinct keys, windows) of the windows of the uint8 `images` [K, C, H, W] at `positions` [1, S]: each
    window keyed by an exact integer (its raw values, padding marked -1, against integer weights below 2^20, summed
    in float64: integers below 2^53 whatever the order of the sum), so equal windows have equal keys and the keys
    are at most as many as the distinct windows (as many, unless two windows collide). One strided copy and one
    product instead of an unfold of every position and a sort of the windows."""
    padded = F.pad(images.to(torch.float64), (window.padding,) * 4, value=-1.0)
    windows = _windows_at(padded, window_strips(positions, window, sample_shape), positions.shape[1], window.size)
    weights = torch.randint(1 << 20, (windows.shape[0],), generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    keys = weights.to(windows.device) @ windows
    return torch.unique(keys).numel(), keys.numel()


def _windows_at(padded: torch.Tensor, strips: list[Strip], span: int, size: tuple[int, int]) -> torch.Tensor:
    """[D, K S] the windows of `size` of a padded chunk [K, C, Hp, Wp] at the `span` positions per image that
    `strips` cover (column j: image j // S, position j % S)."""
    count, channels = padded.shape[:2]
    depth = channels * size[0] * size[1]
    return gather_windows(padded, strips, span, size, padded.new_empty(1, depth, count * span))[0]


def _may_repeat(store: DatasetStore, images: torch.Tensor, window: WindowSpec, positions: torch.Tensor) -> bool:
    """False where the first chunk's windows at `positions` are certainly more than MAX_DISTINCT_FRACTION distinct
    (their distinct keys are: `distinct_window_keys`), so that `unique_windows` skips the set without unfolding
    and sorting it (broken ELS at k >= 9, where 98% of the windows are distinct: most of a patch size's plan);
    True otherwise (the exact count then decides)."""
    if not store.is_uint8:
        return True
    distinct, total = distinct_window_keys(images, window, positions, store.sample_shape)
    return distinct <= MAX_DISTINCT_FRACTION * total


@dataclass(frozen=True)
class PatchGroup:
    """Query windows that share one dictionary rule.

    `positions` are window positions in the training unfold (flat indices into its output grid), shape [G, S]:
    the group's L_g locations form G consecutive runs of equal length L_g / G, and every query of run g is
    compared with the windows at the S positions of row g in every image. G = 1: one dictionary for the whole
    group (ELS); G = L_g: one per location (LS, PSPC); in between: one per line (the edges of broken ELS).

    `aligned`: S = 1 and each query is compared with the training windows at its own place, the query windows
    being the same unfold of x_t (LS, PSPC, the corners of broken ELS). Their cross terms are window sums of
    x_t * y_i, computed without unfolding (`patch_softmax` needs x_t for them).
    """

    locations: torch.Tensor  # long [L_g]: columns of the query unfold
    positions: torch.Tensor  # long [G, S]
    unique: UniqueWindows | None = None  # shared groups: the dictionary's distinct windows, when precomputed
    aligned: bool = False

    @property
    def shared(self) -> bool:
        """One position list for the whole group (a group of one location is both)."""
        return self.positions.shape[0] == 1

    @property
    def run(self) -> int:
        """Query locations per dictionary (L_g / G)."""
        return self.locations.numel() // self.positions.shape[0]


@dataclass
class PatchSoftmaxResult:
    """Per sample b and query location l: the softmax mean of the values, 1 / sum w^2, and (optionally) the
    window of largest weight as (image index, window position). Window values (PSPC) come folded instead: per
    pixel, the sum of the means of the windows covering it. With a `merge` (`patch_softmax`), also the state of
    each softmax before its division: running maximum, normaliser and sum of squared weights."""

    mean: torch.Tensor | None  # [B, L, V] in the logits' dtype (centre values)
    effective_count: torch.Tensor  # [B, L]
    top_image: torch.Tensor | None = None  # long [B, L]
    top_position: torch.Tensor | None = None  # long [B, L]
    dtype: torch.dtype = torch.float32  # what the logits were computed in
    folded: torch.Tensor | None = None  # [B, C, H, W] window values: sum over the windows covering each pixel
    max: torch.Tensor | None = None  # [B, L] the largest logit, in base 2 (log2 of a weight; with a merge)
    total: torch.Tensor | None = None  # [B, L] sum of 2^(logit - max) (with a merge)
    squares: torch.Tensor | None = None  # [B, L] sum of 2^(2 (logit - max)) (with a merge)


def logit_scale(noise_variance: float, temperature: float) -> float:
    """c = 1 / (2 (1 - ab_t) tau), capped at MAX_LOGIT_SCALE."""
    denominator = 2.0 * noise_variance * temperature
    return MAX_LOGIT_SCALE if denominator <= 0 else min(1.0 / denominator, MAX_LOGIT_SCALE)


def split_groups(groups: list[PatchGroup], max_logits: int) -> list[PatchGroup]:
    """Split groups so that one sample's logits against one image (L_g x S values, or L_g x 1 distinct window)
    stay under `max_logits`; groups of several runs are split between runs."""
    out = []
    for group in groups:
        block = max(1, max_logits // group.positions.shape[1])
        if group.locations.numel() <= block:
            out.append(group)
            continue
        runs = 1 if group.shared else max(1, block // group.run)
        rows = block if group.shared else runs * group.run
        for start in range(0, group.locations.numel(), rows):
            positions = group.positions if group.shared else group.positions[start // group.run :][:runs]
            out.append(PatchGroup(group.locations[start : start + rows], positions, group.unique))
    return out


def chunk_images(groups: list[PatchGroup], window: WindowSpec, sample_shape, dtype: torch.dtype) -> int:
    """Images per chunk (never dependent on the batch): large enough that the smallest group's block of logits
    fills a block (`block_shape`), small enough that the chunk's windows stay within BUDGET_BYTES and that the
    widest group still gets blocks of its least rows (groups are then split to fit the block). The budget counts
    every window of the grid, as when the chunk was unfolded whole; only the windows the groups use are copied now
    (`gather_windows`), but larger chunks measured no faster (broken ELS k = 13-25), and the chunk size sets the
    order of the streamed sums, so it was kept."""
    channels = sample_shape[0]
    kh, kw = window.size
    depth = channels * kh * kw
    grid = math.prod(window.grid_shape(sample_shape))
    unfolded = depth * grid + grid  # one image's windows and their norms
    gathered = max(g.positions.numel() for g in groups) * (depth + channels + 2)  # a group's windows, biases, values
    size = torch.finfo(dtype).bits // 8
    by_memory = BUDGET_BYTES // (size * (unfolded + gathered))
    block, min_rows = block_shape(depth)
    by_smallest = block // min(g.locations.numel() * g.positions.shape[1] for g in groups)
    by_widest = block // (min_rows * max(g.positions.shape[1] for g in groups))
    return max(1, min(by_memory, by_smallest, by_widest))


def aligned_chunk_images(sample_shape, window: WindowSpec, dtype: torch.dtype, locations: int) -> int:
    """(image, sample) pairs per chunk of the aligned path within BUDGET_BYTES: per pair a padded image for each
    of the three buffers of the window sums and `locations` queries' terms [values | w | w^2] with their first
    halving, all counted in the logits' dtype (at float64 steps two smaller blocks measured faster than one)."""
    channels, height, width = sample_shape
    padded = (height + 2 * window.padding) * (width + 2 * window.padding)
    per_pair = 3 * channels * padded + 2 * padded + (channels + 4) * locations
    return max(1, BUDGET_BYTES // ((torch.finfo(dtype).bits // 8) * per_pair))


def query_norms(queries: torch.Tensor) -> torch.Tensor:
    """|q| of every query window [B, D, L] -> [B, L], in float64 (float32 on MPS, which has no float64)."""
    dtype = torch.float32 if queries.device.type == "mps" else torch.float64
    return queries.to(dtype).square().sum(1).sqrt()  # (linalg.vector_norm over dim 1 is 10x slower on CPUs)


def float32_logit_error(queries: torch.Tensor, signal_scale: float, scale: float, window: WindowSpec, channels: int,
                        norms: torch.Tensor | None = None) -> float:
    """c (2 s |q| |phi| + s^2 |phi|^2) u32 for the largest query and window (|phi| <= sqrt(D): model space is
    within [-1, 1]): a bound on the rounding error of a float32 logit. `norms`: `query_norms(queries)`, when
    already computed."""
    depth = channels * window.size[0] * window.size[1]
    norms = query_norms(queries) if norms is None else norms
    q_norm = norms.max().item() if norms.numel() else 0.0
    phi_norm = math.sqrt(depth)
    magnitude = 2 * signal_scale * q_norm * phi_norm + signal_scale**2 * phi_norm**2
    return scale * torch.finfo(torch.float32).eps * magnitude


def logit_spread(norms: torch.Tensor, signal_scale: float, scale: float, window: WindowSpec, channels: int) -> float:
    """An upper bound on how far below its row's largest logit any logit can lie, for queries of norms `norms`
    (`query_norms`) and any dictionary of model-space windows (|phi| <= R = sqrt(D)): for two windows,
    l_i - l_j = c (|q - s phi_j|^2 - |q - s phi_i|^2) >= -c (|q| + s R)^2, and also = c (2 s q.(phi_i - phi_j) -
    s^2 (|phi_i|^2 - |phi_j|^2)) >= -c (4 s |q| R + s^2 R^2); the smaller of the two per query, then the largest
    over the queries."""
    if not norms.numel():
        return 0.0
    reach = signal_scale * math.sqrt(channels * window.size[0] * window.size[1])  # s R
    spread = torch.minimum((norms + reach).square(), 4 * reach * norms + reach**2)
    return scale * spread.max().item()


def logit_bounds(norms: torch.Tensor, signal_scale: float, scale: float, window: WindowSpec,
                 channels: int) -> tuple[float, float]:
    """(lowest, highest) bounds on c (2 s q.phi - s^2 |phi|^2) (the logit of `patch_softmax`, before any shift;
    repeated windows enter as factors, not in the logit) over queries of norms `norms` and any model-space window
    (|phi| <= R = sqrt(D)): at least -c (2 s |q| R + s^2 R^2), at most the top of the parabola in |phi|,
    c |q|^2 when |q| <= s R, else c (2 s |q| R - s^2 R^2)."""
    if not norms.numel():
        return 0.0, 0.0
    reach = signal_scale * math.sqrt(channels * window.size[0] * window.size[1])  # s R
    lowest = -(2 * reach * norms + reach**2).max().item()
    highest = torch.where(norms <= reach, norms.square(), 2 * reach * norms - reach**2).max().item()
    return scale * lowest, scale * highest


def unshifted(bounds: tuple[float, float], entries: int) -> bool:
    """Whether base-2 logits within `bounds` (`logit_bounds`) can be exponentiated as they are, with no shift by a
    running maximum: every weight 2^logit and its square normal float32 numbers (logit >= -62: no subnormal, which
    costs many CPUs a microcode assist per operation, and no square, normaliser squared or effective count that
    underflows) and the sums over at most `entries` copies finite (the squares at most entries 2^(2 highest) <
    2^126; the weighted values are at most the normaliser). Then each block needs no maximum, no shift, no floor
    and no rescaling of the running sums; the weights are the same numbers (2^(l - M) 2^M) with one rounding
    fewer."""
    lowest, highest = bounds
    return lowest >= -62.0 and 2 * max(highest, 0.0) + math.log2(max(entries, 1)) <= 126.0


def needs_floor(spread: float) -> bool:
    """Whether base-2 logits that lie at most `spread` below their row's maximum (plus 1 for the float32 rounding
    of the logits) can fall below the weight floor (`weight_floor`: 2^-63 in float32, where the squares of the
    weights would turn subnormal; many CPUs take a microcode assist per subnormal operation). If not, the clamp
    (a pass over every logit) would change nothing and is skipped."""
    return spread + 1.0 > -weight_floor(torch.float32)


def choose_dtype(queries: torch.Tensor, signal_scale: float, scale: float, window: WindowSpec, channels: int,
                 norms: torch.Tensor | None = None) -> torch.dtype:
    """float32 when `float32_logit_error` < FLOAT32_LOGIT_NOISE, else float64; float32 on MPS, which has no
    float64."""
    if queries.device.type == "mps":
        return torch.float32
    error = float32_logit_error(queries, signal_scale, scale, window, channels, norms)
    return torch.float32 if error < FLOAT32_LOGIT_NOISE else torch.float64


class BlockSoftmax(StreamingSoftmax):
    """`StreamingSoftmax` (same state, same `mean()` and `effective_count()`) with the passes over one block fused
    in place: the logits become the weights, and one matrix product with [values | 1] gives the weighted sum and
    the normaliser together. Logits must be finite."""

    def __init__(self) -> None:
        super().__init__(track_concentration=True)

    def add(self, logits: torch.Tensor, values: torch.Tensor, roots: torch.Tensor | None = None,
            floor: bool = True, shift: bool = True) -> None:
        """logits [G, R, M] (overwritten); values [G, V + 1, M], the last row all ones, or, for windows that stand
        for m copies, the values times m and the last row m, with `roots` [M] = m^1/2 so that the squares count
        every copy. (The copies enter as factors, not as + log m in the logits: a logit then does not depend on
        how many copies a part of the dataset holds, so the parts of a distributed run round as the whole does.)
        `floor`: clamp the weights at 2^weight_floor (False when no logit can lie that far below its row's
        maximum, `needs_floor`: the clamp would change nothing); `shift`: False when the logits can be
        exponentiated as they are (`unshifted`; then for every block of the stream)."""
        new_max = None
        if shift:
            chunk_max = logits.amax(-1)
            new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
            logits.sub_(new_max[..., None])
            if floor:
                logits.clamp_(min=weight_floor(logits.dtype))
        weights = logits.exp2_()
        # one group (G = 1): a GEMM against the transposed values is ~3x faster on CPUs than bmm's skinny output
        sums = F.linear(weights[0], values[0])[None] if weights.shape[0] == 1 else torch.bmm(weights, values.mT)
        if roots is None:  # sum w^2 in one pass (a norm, squared)
            squares = torch.linalg.vector_norm(weights, dim=-1).square_()
        else:  # sum w^2 m: the weights are squared in place (no longer needed), then one product with m
            squares = torch.matmul(weights.square_(), roots.square())
        self._merge(new_max, sums, squares)

    def _merge(self, new_max: torch.Tensor | None, sums: torch.Tensor, squares: torch.Tensor) -> None:
        """Fold a block's [weighted sums | normaliser] and squares, taken against `new_max` (None: against 0,
        unshifted logits), into the state."""
        if new_max is None and self.max is not None:  # unshifted: every block against 0, plain sums
            self.numerator = self.numerator + sums[..., :-1]
            self.total = self.total + sums[..., -1]
            self.squares = self.squares + squares
            return
        if new_max is None:
            new_max = squares.new_zeros(squares.shape)
        if self.max is None:
            self.numerator, self.total, self.squares = sums[..., :-1], sums[..., -1], squares
        else:
            rescale = torch.exp2(self.max - new_max)
            self.numerator = self.numerator * rescale[..., None] + sums[..., :-1]
            self.total = self.total * rescale + sums[..., -1]
            self.squares = self.squares * rescale.square() + squares
        self.max = new_max

    def add_screened(self, screen: torch.Tensor, margin: float, queries: torch.Tensor, phi: torch.Tensor,
                     values: torch.Tensor, inverse_counts: torch.Tensor | None = None) -> None:
        """Float64 rescoring of a block screened in float32: `screen` [G, R, M] float32 logits; only the entries
        within `margin` of their row's running float32 maximum are recomputed from `queries` [G, R, D + 1] and
        `phi` [G, D + 1, M] (float64) and enter the softmax; values [G, V + 1, M] float64. The margin covers the
        float32 error twice and the weight floor, so every dropped entry weighs less than e^WEIGHT_FLOOR."""
        runs, rows, width = screen.shape
        block_max = screen.amax(-1)
        self.screen_max = block_max if self.max is None else torch.maximum(self.screen_max, block_max)
        threshold = (self.screen_max - margin).flatten()
        near = (block_max.flatten() >= threshold).nonzero()[:, 0]  # rows with a candidate in this block
        if self.max is not None and near.numel() == 0:
            return
        flat = screen.view(runs * rows, width)
        few = 2 * near.numel() < runs * rows  # then compare those rows only
        if few:
            flat, threshold = flat[near], threshold[near]
        picked, j = (flat >= threshold[:, None]).nonzero().unbind(1)
        row = near[picked] if few else picked
        g, r = row // rows, row % rows
        logits = torch.linalg.vecdot(queries[g, r], phi.transpose(1, 2)[g, j])  # [n] float64
        flat_max = logits.new_full((runs * rows,), -math.inf).scatter_reduce_(0, row, logits, "amax")
        new_max = flat_max.view(runs, rows)
        new_max = new_max if self.max is None else torch.maximum(self.max, new_max)
        weights = (logits - new_max.flatten()[row]).clamp_(min=weight_floor(logits.dtype)).exp2_()
        sums = logits.new_zeros(runs * rows, values.shape[1]).index_add_(
            0, row, weights[:, None] * values.transpose(1, 2)[g, j]).view(runs, rows, -1)
        squares = weights.square() if inverse_counts is None else weights.square() * inverse_counts[j]
        squares = logits.new_zeros(runs * rows).index_add_(0, row, squares).view(runs, rows)
        self._merge(new_max, sums, squares)


@dataclass
class _GroupState:
    """The streaming softmax of one (group, sample) and the running best window."""

    softmax: BlockSoftmax = field(default_factory=BlockSoftmax)
    top_image: torch.Tensor | None = None
    top_position: torch.Tensor | None = None


def patch_softmax(
    queries: torch.Tensor,
    store: DatasetStore,
    images: torch.Tensor,
    window: WindowSpec,
    groups: list[PatchGroup],
    signal_scale: float,
    temperature: float,
    noise_variance: float,
    chunk_size: int | None = None,
    track_top: bool = False,
    x_t: torch.Tensor | None = None,
    merge: Any = None,
    scratch: Scratch | None = None,
) -> PatchSoftmaxResult:
    """Softmax-weighted values of the training windows for every query window, streamed over the store.

    queries: [B, D, L] query windows (the columns of an unfold of x_t); `images`: the store's compact images on
    the working device ([N, C, H, W], decoded chunk by chunk); groups: which windows each query is compared with
    (together they must cover each query location once); `x_t` [B, C, H, W]: the image the queries were cut
    from with `window`'s size and padding, needed by aligned groups. Returns means [B, L, C] (centre values) or,
    for window values (every group aligned), their fold [B, C, H, W]. DESIGN.md §6; Kamb & Ganguli (arXiv
    2412.20292) eq. for the ELS machine, Niedoba et al. (arXiv 2411.19339) for the patch posterior.

    `merge`: when the store is one part of the dataset (a shard of a distributed run, distributed/dataset.py), an
    object with `state(result) -> result`, which turns this part's result with its softmax state (max, total,
    squares) into the whole dataset's (means, effective counts, state, best windows as global image indices), and
    `sum(folded) -> folded`, which sums the parts' folds; window values are folded with the merged state.
    `scratch`: buffers for the temporaries, kept by the caller from one call to the next (a step's fresh
    megabytes otherwise cost page faults every step); None: fresh ones.
    """
    batch, depth, num_locations = queries.shape
    channels = store.sample_shape[0]
    aligned = [group for group in groups if group.aligned]
    matched = [group for group in groups if not group.aligned]
    if aligned and x_t is None:
        raise ValueError("aligned groups need x_t, the image the query windows were cut from")
    if window.value != "centre" and matched:
        raise ValueError("window values are only computed for aligned groups")
    scale = logit_scale(noise_variance, temperature)
    norms = query_norms(queries)
    dtype = choose_dtype(queries, signal_scale, scale, window, channels, norms)
    # at float64 steps the matched groups are screened with float32 logits and only the entries near each row's
    # maximum recomputed in float64 (not when the best window is tracked: it needs every logit exactly)
    margin = None
    if dtype == torch.float64 and not track_top and matched:
        margin = -WEIGHT_FLOOR + 4 * float32_logit_error(queries, signal_scale, scale, window, channels, norms)
        margin *= LOG2E
    spread = LOG2E * logit_spread(norms, signal_scale, scale, window, channels)  # in base 2
    bounds = tuple(LOG2E * bound for bound in logit_bounds(norms, signal_scale, scale, window, channels))
    grid = math.prod(window.grid_shape(store.sample_shape))
    # logits exponentiated as they are (no maximum, shift or rescaling) where their range allows; the best
    # window and the merge of a distributed run need each row's true maximum
    shift = track_top or merge is not None or not unshifted(bounds, store.num_images * grid)
    scratch = scratch or Scratch(queries.device)
    scale *= LOG2E  # base-2 logits from here on
    out = _Output(batch, num_locations, channels, dtype, queries.device, track_top, window.value == "centre", merge)
    if aligned:
        _stream_aligned(x_t, store, images, window, aligned, signal_scale, scale, dtype, chunk_size, out, scratch,
                        needs_floor(spread), shift)
    if matched:
        _stream_matched(queries, store, images, window, matched, signal_scale, scale, dtype, chunk_size, out, margin,
                        scratch, spread, shift)
    if merge is None:
        return out.result()
    if window.value == "centre":
        return merge.state(out.result())
    return replace(out.result(), folded=merge.sum(out.folded))


@dataclass
class _Output:
    """The result tensors, filled group by group."""

    batch: int
    num_locations: int
    channels: int
    dtype: torch.dtype
    device: torch.device
    track_top: bool
    centre: bool
    merge: Any = None

    def __post_init__(self) -> None:
        shape = (self.batch, self.num_locations)
        self.mean = torch.empty(*shape, self.channels, dtype=self.dtype, device=self.device) if self.centre else None
        self.effective = torch.empty(*shape, dtype=self.dtype, device=self.device)
        self.top_image = torch.empty(*shape, dtype=torch.long, device=self.device) if self.track_top else None
        self.top_position = torch.empty_like(self.top_image) if self.track_top else None
        self.folded = None
        kept = self.merge is not None  # the softmax state, for the merge with the other parts of the dataset
        self.max, self.total, self.squares = (torch.empty(*shape, dtype=self.dtype, device=self.device) if kept
                                              else None for _ in range(3))

    def keep(self, rows, where: torch.Tensor, softmax: StreamingSoftmax) -> None:
        """With a merge: keep the state of `softmax` as that of samples `rows` at locations `where`."""
        if self.merge is not None:
            for name in ("max", "total", "squares"):
                target = getattr(self, name)
                # the aligned path keeps its sums in float32 at float64 steps (only its logits and max are float64)
                target[rows, where] = getattr(softmax, name).reshape(target[rows, where].shape).to(target.dtype)

    def merge_parts(self) -> None:
        """Replace this part's state, effective counts and best windows by the whole dataset's."""
        whole = self.merge.state(self.result())
        self.max, self.total, self.squares = whole.max, whole.total, whole.squares
        self.effective = whole.effective_count
        self.top_image, self.top_position = whole.top_image, whole.top_position

    def result(self) -> PatchSoftmaxResult:
        return PatchSoftmaxResult(self.mean, self.effective, self.top_image, self.top_position, self.dtype,
                                  self.folded, self.max, self.total, self.squares)


def _stream_matched(queries, store, images, window, groups, signal_scale, scale, dtype, chunk_size, out,
                    margin=None, scratch: Scratch | None = None, spread: float = math.inf, shift: bool = True) -> None:
    """Groups compared with windows at other places (ELS): cross terms as one batched matrix product per
    (group, sample, chunk) against the chunk's windows at the group's positions (copied from strided views of the
    padded chunk, `gather_windows`, into the scratch), or against the distinct windows. With a
    `margin` (float64 steps), the products are float32 and the entries within it of their row's maximum are
    recomputed in float64 (`BlockSoftmax.add_screened`)."""
    batch, depth, _ = queries.shape
    track_top = out.track_top
    if track_top:  # the best single window needs every copy with its own (image, position)
        groups = [PatchGroup(group.locations, group.positions) for group in groups]
    from_images = [group for group in groups if group.unique is None]  # the others use their distinct windows
    chunk = chunk_size or (chunk_images(from_images, window, store.sample_shape, dtype) if from_images else 1)
    if margin is not None and not chunk_size:  # float32 and float64 windows both: two thirds of the chunk
        chunk = max(1, 2 * chunk // 3)
    block, _ = block_shape(depth)
    groups = split_groups([g for g in groups if g.unique is not None], block) + split_groups(
        from_images, max(1, block // chunk))
    streamed = [g for g, group in enumerate(groups) if group.unique is None]
    device = queries.device
    scratch = scratch or Scratch(device)
    floor = needs_floor(spread)
    # per group and sample, the queries pre-multiplied by 2 s c and a last entry -1 for the bias: [G, run, D + 1]
    scaled = (queries.to(dtype) * (2 * signal_scale * scale)).transpose(1, 2)  # [B, L, D]
    scaled = torch.cat([scaled, scaled.new_full((batch, scaled.shape[1], 1), -1.0)], 2)
    group_queries = [scaled[:, group.locations.to(device)].reshape(batch, group.positions.shape[0], group.run,
                                                                    depth + 1) for group in groups]
    screen_queries = [q.float() for q in group_queries] if margin is not None else None
    states = [[_GroupState() for _ in range(batch)] for _ in groups]
    bias_scale = scale * signal_scale**2
    for g in range(len(groups)):
        if groups[g].unique is not None:
            span = groups[g].positions.shape[1]
            rows = chunk_size * span if chunk_size else max(1, block // groups[g].locations.numel())
            _stream_unique(groups[g].unique, group_queries[g], states[g], rows, bias_scale, dtype,
                           screen_queries and screen_queries[g], margin, scratch, spread, shift)
    channels = store.sample_shape[0]
    (kh, kw), pad = window.size, window.padding
    centre = (kh // 2) * (store.sample_shape[2] + 2 * pad) + kw // 2  # a window's centre pixel, from its corner
    strips = {}  # per position list (the parts of a split shared group share theirs): strided views of a chunk
    for g in streamed:
        if id(groups[g].positions) not in strips:
            strips[id(groups[g].positions)] = window_strips(groups[g].positions, window, store.sample_shape)
    for start in range(0, store.num_images if streamed else 0, chunk):
        decoded = store.decode(images[start : start + chunk], dtype)  # [K, C, H, W]
        padded = F.pad(decoded, (pad,) * 4)
        screen_padded = F.pad(decoded.float(), (pad,) * 4) if margin else None
        count = decoded.shape[0]
        gathered = {}  # the parts of a split shared group gather their windows once
        for g in streamed:
            group = groups[g]
            positions = group.positions.to(device)  # [G, S]
            runs, span = positions.shape
            key = id(group.positions)
            if key not in gathered:  # windows and values straight from strided views of the padded chunk
                slot, pieces = len(gathered), strips[key]
                phi = gather_windows(padded, pieces, span, window.size,
                                     scratch.take(("windows", slot), (runs, depth + 1, count * span), dtype))
                torch.linalg.vecdot(phi[:, :depth], phi[:, :depth], dim=1, out=phi[:, depth]).mul_(bias_scale)
                vals = scratch.take(("values", slot), (runs, channels + 1, count * span), dtype)
                vals[:, channels] = 1.0
                gather_windows(padded, pieces, span, (1, 1), vals, centre)
                screen = None
                if margin:  # the float32 screen uses the same biases
                    screen = gather_windows(screen_padded, pieces, span, window.size, scratch.take(
                        ("screen", slot), (runs, depth + 1, count * span), torch.float32))
                    screen[:, -1] = phi[:, -1]
                gathered[key] = phi, vals, screen
            phi, vals, screen = gathered[id(group.positions)]
            for b in range(batch):
                state = states[g][b]
                if margin is not None:
                    state.softmax.add_screened(_product(screen_queries[g][b], screen), margin, group_queries[g][b],
                                               phi, vals)
                    continue
                logits = _product(group_queries[g][b], phi, scratch)  # [G, run, K*S]
                if track_top:
                    _track_top(state, logits, start, span, positions)
                state.softmax.add(logits, vals, floor=floor, shift=shift)
    for group, group_states in zip(groups, states):
        where = group.locations.to(device)
        for b, state in enumerate(group_states):
            out.mean[b, where] = state.softmax.mean().reshape(where.numel(), -1)
            out.effective[b, where] = state.softmax.effective_count().reshape(-1)
            out.keep(b, where, state.softmax)
            if track_top:
                out.top_image[b, where] = state.top_image.reshape(-1)
                out.top_position[b, where] = state.top_position.reshape(-1)


def _stream_unique(unique: UniqueWindows, queries: torch.Tensor, states: list[_GroupState], rows: int,
                   bias_scale: float, dtype: torch.dtype, screen_queries: torch.Tensor | None = None,
                   margin: float | None = None, scratch: Scratch | None = None, spread: float = math.inf,
                   shift: bool = True) -> None:
    """One shared group against its distinct windows, `rows` windows per chunk, each weighing m times (its
    copies): a factor m of the values and the normaliser, or, screened in float32 and rescored in float64 when
    `screen_queries` are given, logits + log m and squares / m. `scratch` holds the logits of a block; `spread`:
    `logit_spread` in base 2, for `needs_floor`; `shift`: see `BlockSoftmax.add`."""
    floor = needs_floor(spread)
    if screen_queries is None and dtype == torch.float32:  # the operands of every chunk, built once
        for phi_t, vals, roots in unique.float32_operands(rows, bias_scale):
            for b, state in enumerate(states):
                state.softmax.add(_product(queries[b], phi_t, scratch), vals, roots, floor, shift)
        return
    for start in range(0, unique.windows.shape[0], rows):
        phi = unique.windows[start : start + rows].to(dtype)  # [M, D]
        counts = unique.counts[start : start + rows].to(dtype)
        values = unique.values[start : start + rows].to(dtype).T
        bias = phi.square().sum(1) * bias_scale  # [M]
        if screen_queries is not None:  # the screen must see the copies: + log m in the logits
            phi_t = torch.cat([phi.T, (bias - counts.log2())[None]])[None]  # [1, D + 1, M]: the bias below
            vals = torch.cat([values, phi.new_ones(1, phi.shape[0])])[None]
            screen = phi_t.float()
            for b, state in enumerate(states):
                state.softmax.add_screened(_product(screen_queries[b], screen), margin, queries[b], phi_t, vals,
                                           counts.reciprocal())
        else:  # the copies as factors of the values (BlockSoftmax.add)
            phi_t = torch.cat([phi.T, bias[None]])[None]
            vals = torch.cat([values * counts, counts[None]])[None]
            roots = counts.sqrt()
            for b, state in enumerate(states):
                state.softmax.add(_product(queries[b], phi_t, scratch), vals, roots, floor, shift)


@dataclass(frozen=True)
class Strip:
    """Windows of a position list [G, S] that form one strided view of a padded image: lines `lines` (a slice of
    G), columns `columns` (a slice of S) laid out as `rows` x `cols` positions; in the flattened padded image the
    top-left pixel of the window at (line g, row r, column c) is at `offset + g line_step + r row_step + c
    col_step` (g, r, c counted from the strip's start)."""

    lines: slice
    columns: slice
    rows: int
    cols: int
    offset: int
    line_step: int
    row_step: int
    col_step: int


def _run(values: list[int], start: int) -> tuple[int, int]:
    """(length, step) of the longest arithmetic progression with a non-negative step (strides of a view) from
    values[start]."""
    if start + 1 >= len(values) or values[start + 1] < values[start]:
        return 1, 0
    step = values[start + 1] - values[start]
    end = start + 2
    while end < len(values) and values[end] - values[end - 1] == step:
        end += 1
    return end - start, step


def _line_pieces(offsets: list[int]) -> list[tuple[int, int, int, int, int, int]]:
    """One line's window offsets as pieces (start, rows, cols, offset, row_step, col_step): the whole line as one
    rectangle (rows of one progression, each row's start one step further) where it is one, else its longest
    progressions from the left."""
    cols, col_step = _run(offsets, 0)
    starts = offsets[::cols]
    rows, row_step = _run(starts, 0)
    if len(offsets) == rows * cols and all(offsets[r * cols + c] == starts[r] + c * col_step
                                           for r in range(rows) for c in range(cols)):
        return [(0, rows, cols, offsets[0], row_step, col_step)]
    pieces, start = [], 0
    while start < len(offsets):
        cols, col_step = _run(offsets, start)
        pieces.append((start, 1, cols, offsets[start], 0, col_step))
        start += cols
    return pieces


def window_strips(positions: torch.Tensor, window: WindowSpec, sample_shape) -> list[Strip]:
    """Cover the window positions [G, S] (flat indices into `window`'s grid) by strided views of the padded image
    (`Strip`): each line split into rectangles of positions in arithmetic progression (one for an ELS interior or
    an edge line), and consecutive lines with the same pieces, one step apart, merged (the edge lines of broken
    ELS: four strips)."""
    _, height, width = sample_shape
    columns = window.grid_shape(sample_shape)[1]
    padded_width = width + 2 * window.padding
    flat = ((positions // columns) * padded_width + positions % columns).tolist()
    strips: list[Strip] = []
    last: dict[tuple, int] = {}  # piece shape -> index in strips of the strip it may extend
    for g, offsets in enumerate(flat):
        for start, rows, cols, offset, row_step, col_step in _line_pieces(offsets):
            key = (start, rows, cols, row_step, col_step)
            i = last.get(key)
            if i is not None and strips[i].lines.stop == g:
                strip = strips[i]
                lines = g - strip.lines.start
                step = offset - strip.offset if lines == 1 else strip.line_step
                if step >= 0 and offset - strip.offset == lines * step:
                    strips[i] = replace(strip, lines=slice(strip.lines.start, g + 1), line_step=step)
                    continue
            last[key] = len(strips)
            strips.append(Strip(slice(g, g + 1), slice(start, start + rows * cols), rows, cols, offset, 0, row_step,
                                col_step))
    return strips


def gather_windows(padded: torch.Tensor, strips: list[Strip], span: int, size: tuple[int, int],
                   out: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """The windows of `size` of a contiguous padded chunk [K, C, Hp, Wp] at the positions that `strips` cover
    (`window_strips` of positions [G, S]) written into out[:, :C kh kw] ([G, >= C kh kw, K S]; column j = image
    j // S, position j % S), one strided copy per strip; `shift`: added to every window's offset (the centre
    pixel of a window with size (1, 1)). Returns out."""
    count, channels, height, width = padded.shape
    kh, kw = size
    depth = channels * kh * kw
    target = out[:, :depth].unflatten(1, (channels, kh, kw)).unflatten(-1, (count, span))  # [G, C, kh, kw, K, S]
    for strip in strips:
        lines = strip.lines.stop - strip.lines.start
        source = padded.as_strided(
            (lines, channels, kh, kw, count, strip.rows, strip.cols),
            (strip.line_step, height * width, width, 1, channels * height * width, strip.row_step, strip.col_step),
            padded.storage_offset() + strip.offset + shift)
        target[strip.lines, ..., strip.columns].unflatten(-1, (strip.rows, strip.cols)).copy_(source)
    return out


def _product(queries: torch.Tensor, phi: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """[G, R, D + 1] @ [G, D + 1, M]: the logits, bias included (queries end in -1, phi in the bias); one GEMM
    when G = 1; written into `scratch` when given (overwritten by the next product)."""
    runs, rows, _ = queries.shape
    out = None if scratch is None else scratch.take("logits", (runs, rows, phi.shape[-1]), queries.dtype)
    if runs == 1:
        return torch.mm(queries[0], phi[0], out=None if out is None else out[0])[None]
    return torch.bmm(queries, phi, out=out)


def _track_top(state: _GroupState, logits: torch.Tensor, start: int, span: int, positions: torch.Tensor) -> None:
    """Keep the (image, position) of the largest logit so far per row (the earliest on ties)."""
    best = logits.argmax(-1)  # [G, rows]
    chunk_max = logits.gather(-1, best[..., None])[..., 0]
    image = start + best // span
    position = positions.gather(1, best % span)
    if state.top_image is None:
        state.top_image, state.top_position = image, position
    else:
        better = chunk_max > state.softmax.max
        state.top_image = torch.where(better, image, state.top_image)
        state.top_position = torch.where(better, position, state.top_position)


# --- aligned groups: each query against the windows at its own place -----------------------------------------


def window_sums_(buffers: list[torch.Tensor], length: int, size: int, step: int = 1) -> int:
    """In place: sums of `size` entries `step` apart along the last dim of buffers[0][..., :length], by doubling
    (about 2 log2(size) additions of shifted slices, every entry summed in an order fixed by `size` alone, so the
    same whatever the batch or chunk it is in), written into buffers[0][..., :n]; returns n = length - (size - 1)
    step. buffers[1] and buffers[2], of buffers[0]'s shape, hold the doubled sums (no allocation)."""
    total_length = length - (size - 1) * step
    source, spares = buffers[0], buffers[1:]
    power, started, offset, span = source, False, 0, 1
    while True:
        if size & span:
            piece = power[..., offset * step : offset * step + total_length]
            total = source[..., :total_length]
            if started:
                total += piece
            elif power is not source:  # the first piece is a doubled sum (even sizes): source is free by now
                total.copy_(piece)
            started = True
            offset += span
        if 2 * span > size:
            return total_length
        n = length - span * step
        target = spares[0] if power is not spares[0] else spares[1]
        torch.add(power[..., :n], power[..., span * step : span * step + n], out=target[..., :n])
        power, length, span = target, n, 2 * span


def window_sums(z: torch.Tensor, size: int, dim: int, step: int = 1) -> torch.Tensor:
    """Sums of `size` entries `step` apart along `dim` (length n -> n - (size - 1) step): `window_sums_` on a
    copy."""
    last = z.movedim(dim, -1)
    buffers = [last.contiguous().clone(), torch.empty_like(last), torch.empty_like(last)]
    n = window_sums_(buffers, last.shape[-1], size, step)
    return buffers[0][..., :n].movedim(-1, dim)


def box_sums_(buffers: list[torch.Tensor], shape: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """In place: buffers[0] [..., H * W] (flattened rows of `shape`) -> the sum of every size[0] x size[1]
    window, a strided view [..., H - kh + 1, W - kw + 1] of buffers[0]. Both passes run on the flattened rows
    (shifts of W and of 1: long contiguous loops instead of rows of W); the sums that wrap around a row end are
    never looked at. buffers[1:]: scratch of the same shape (`window_sums_`)."""
    (height, width), (kh, kw) = shape, size
    length = window_sums_(buffers, height * width, kh, width)
    window_sums_(buffers, length, kw, 1)
    flat = buffers[0]
    rows, cols = height - kh + 1, width - kw + 1
    return flat.as_strided((*flat.shape[:-1], rows, cols), (*flat.stride()[:-1], width, 1))


def box_sums(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] -> the sum of every size[0] x size[1] window, [..., H - kh + 1, W - kw + 1]: `box_sums_` on
    a copy."""
    flat = z.flatten(-2)
    buffers = [flat.clone(memory_format=torch.contiguous_format), torch.empty_like(flat), torch.empty_like(flat)]
    return box_sums_(buffers, z.shape[-2:], size)


def _channel_sum(z: torch.Tensor) -> torch.Tensor:
    """[..., C, P] -> [..., P] by adding channel slices (elementwise: the same in any batch)."""
    total = z[..., 0, :]
    for c in range(1, z.shape[-2]):
        total = total + z[..., c, :]
    return total


def halving_sum_(z: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over dim 0 by pairwise halving (z[:h] + z[h:2h], the odd last slice added to the first): about
    log2(K) elementwise additions, each entry summed in an order fixed by K alone, so the same whatever the other
    dimensions hold (a reduction kernel may split or vectorise differently as they grow). In place in z, or with
    `first` (at least K // 2 slices of z's shape) the first halving goes there and z is left as it was. Returns a
    view."""
    while z.shape[0] > 1:
        half = z.shape[0] // 2
        if first is None:
            head = z[:half]
            head += z[half : 2 * half]
        else:
            head = torch.add(z[:half], z[half : 2 * half], out=first[:half])
            first = None
        if z.shape[0] % 2:
            head[0] += z[2 * half]
        z = head
    return z[0]


def halving_sum(z: torch.Tensor) -> torch.Tensor:
    """`halving_sum_` leaving z as it was."""
    return halving_sum_(z, z.new_empty(max(1, z.shape[0] // 2), *z.shape[1:]))


class Scratch:
    """Buffers reused by the blocks of one call: `take(name, shape, dtype)` is a contiguous view of the first
    prod(shape) values of buffer `name`, grown when too small (every fresh allocation of megabytes costs page
    faults)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[Any, torch.Tensor] = {}

    def take(self, name: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[(name, dtype)] = torch.empty(size, dtype=dtype, device=self.device)
        return buffer[:size].view(shape)


class ColumnSoftmax(StreamingSoftmax):
    """`StreamingSoftmax` over the images (dim 0) of [K, B, L] logits, one softmax per (sample, location); every
    step elementwise or a `halving_sum_`, so each (sample, location) gets the same bits whatever else is batched."""

    def __init__(self) -> None:
        super().__init__(track_concentration=True)
        self.top_image: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, values: torch.Tensor | None, start: int, track_top: bool,
            scratch: Scratch | None = None, floor: bool = True, shift: bool = True) -> torch.Tensor:
        """logits [K, B, L] (any strides); values [K, L, V] (float32) or None (normaliser, maximum and squares
        only); `start`: the index of the chunk's first image, for the best window (the first of equal maxima);
        the terms and their sums go to `scratch` when given (the weights returned are then overwritten by the next
        call), else to fresh tensors; `floor`: clamp the weights at 2^weight_floor (False when no logit can lie
        that far below its row's maximum, `needs_floor`: the clamp would change nothing); `shift`: False when
        the logits can be exponentiated as they are (`unshifted`; then for every chunk, and not with
        `track_top`), the maximum then being 0 for the whole stream. Returns the chunk's weights
        2^(logit - the new maximum) [K, B, L] in float32: at float64 steps only the logits and their
        maximum need float64 (their rounding error is what grows with c); the differences to the maximum that
        matter (down to the floor, -63) are rounded to float32 within 63 u32 < 4e-6, and the weights and their sums
        are float32 as at float32 steps."""
        width = 0 if values is None else values.shape[-1]
        count, batch, locations = logits.shape
        take = scratch.take if scratch is not None else lambda _, shape, dtype: logits.new_empty(shape, dtype=dtype)
        # [weighted values | weight | weight^2] per image, each a contiguous [K, B, L] slice, summed at once
        terms = take("terms", (width + 2, count, batch, locations), torch.float32)
        if shift:
            chunk_max, best = logits.max(0) if track_top else (logits.amax(0), None)
            if track_top:
                better = best + start if self.max is None else torch.where(chunk_max > self.max, best + start,
                                                                            self.top_image)
                self.top_image = better
            new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
            weights = torch.sub(logits, new_max, out=terms[width])
            if floor:
                weights.clamp_(min=weight_floor(torch.float32))
            weights.exp2_()
        else:
            new_max = logits.new_zeros(batch, locations)
            weights = torch.exp2(logits, out=terms[width])
        torch.square(weights, out=terms[width + 1])
        if values is not None:
            torch.mul(weights[None], values.permute(2, 0, 1)[:, :, None], out=terms[:width])
        halves = take("halves", (count // 2, width + 2, batch, locations), torch.float32)
        sums = halving_sum_(terms.movedim(0, 1), halves)  # [V + 2, B, L]: the terms are left as they were
        numerator, total, squares = sums[:width].permute(1, 2, 0), sums[width], sums[width + 1]
        if self.max is None:  # copies: the sums may be in the scratch
            self.total, self.squares, self.numerator = total.clone(), squares.clone(), numerator.clone()
        elif not shift:
            self.total = self.total + total
            self.squares = self.squares + squares
            self.numerator = self.numerator + numerator
        else:
            rescale = torch.exp2(self.max - new_max).float()
            self.total = self.total * rescale + total
            self.squares = self.squares * rescale.square() + squares
            self.numerator = self.numerator * rescale[..., None] + numerator
        self.max = new_max
        return weights


def _stream_aligned(x_t, store, images, window, groups, signal_scale, scale, dtype, chunk_size, out,
                    scratch: Scratch, floor: bool = True, shift: bool = True) -> None:
    """Aligned groups: per chunk, the logits of every query against every image at its own place are window
    sums of y_i (2 s c x_t) - s^2 c y_i^2 (summed over the channels): no unfold, about 1 + 2 log2 k passes per
    logit instead of a C k^2-long dot product. The sums run along the flattened rows of the padded images; with
    every window a location (LS, PSPC) the logits stay in that layout, a row of the padded width per grid row
    (the k - 1 sums per row that wrap around are computed and dropped at the end: contiguous passes instead of
    strided ones), else the locations' sums are gathered. Samples are batched (as many as BUDGET_BYTES allows
    against the chunk, a split fixed for the whole call): every operation is elementwise or a `halving_sum_`,
    so a sample's bits do not depend on its batch. Temporaries go to `scratch`. Window values (PSPC) are folded
    with the final maximum and normaliser: each pixel gets sum_i y_i(p) * (the sum of w_i over the windows
    covering p), from the first pass's weights when the store is one chunk that fits the budget, else from a
    second pass."""
    batch = x_t.shape[0]
    channels, height, width = store.sample_shape
    kh, kw = window.size
    pad = window.padding
    device = x_t.device
    padded_shape = (height + 2 * pad, width + 2 * pad)
    grid_shape = window.grid_shape(store.sample_shape)
    grid = grid_shape[0] * grid_shape[1]
    index = torch.cat([group.positions[:, 0] for group in groups]).to(device)  # window positions [La]
    where = torch.cat([group.locations for group in groups]).to(device)  # output columns [La]
    whole = index.numel() == grid and bool((index == torch.arange(grid, device=device)).all())
    flat = (index // grid_shape[1]) * padded_shape[1] + index % grid_shape[1]  # in the flattened padded rows
    span = (grid_shape[0] - 1) * padded_shape[1] + grid_shape[1]  # the sums kept in that layout (whole)
    pixels = (index // grid_shape[1] + kh // 2 - pad) * width + index % grid_shape[1] + kw // 2 - pad  # centres
    scaled = F.pad(x_t.to(dtype) * (2 * signal_scale * scale), (pad,) * 4).flatten(-2)  # [B, C, Pp]
    bias_scale = scale * signal_scale**2
    pairs = aligned_chunk_images(store.sample_shape, window, dtype, index.numel())
    chunk = min(chunk_size or pairs, store.num_images)  # never dependent on the batch
    step = max(1, pairs // chunk)  # samples per block (large blocks: the per-call overheads dominate small ones)
    batches = [slice(b, min(b + step, batch)) for b in range(0, batch, step)]
    states = [ColumnSoftmax() for _ in batches]

    def chunks():
        for start in range(0, store.num_images, chunk):
            decoded = store.decode(images[start : start + chunk], dtype)  # [K, C, H, W]
            padded = F.pad(decoded, (pad,) * 4).flatten(-2)  # [K, C, Pp]
            # per pixel, -s^2 c sum_c y^2: its window sums are the biases -s^2 c ||phi||^2
            yield start, decoded, padded, _channel_sum(padded * padded).mul_(-bias_scale)

    def logits(part, padded, neg_bias):
        """[K, b, span] (every window, in the flattened padded rows) or [K, b, La] (the locations')."""
        buffers = [scratch.take(i, (padded.shape[0], part.stop - part.start, padded.shape[-1]), dtype)
                   for i in range(3)]
        torch.addcmul(neg_bias[:, None], padded[:, None, 0], scaled[None, part, 0], out=buffers[0])
        for c in range(1, channels):
            buffers[0].addcmul_(padded[:, None, c], scaled[None, part, c])
        box_sums_(buffers, padded_shape, window.size)
        return buffers[0][..., :span] if whole else buffers[0][..., flat]

    def on_grid(z):  # [K, b, span] or [K, b, La] -> [K, b, *grid_shape] (zeros at the locations not in `index`)
        if whole:
            return z.as_strided((*z.shape[:2], *grid_shape), (*z.stride()[:2], padded_shape[1], 1))
        return z.new_zeros(*z.shape[:2], grid).index_copy_(2, index, z).unflatten(2, grid_shape)

    centre = window.value == "centre"
    # window values with a single chunk whose weights fit the budget: keep them for the fold (no second pass)
    keep = not centre and out.merge is None and chunk >= store.num_images and (
        chunk * batch * index.numel() * (torch.finfo(dtype).bits // 8) <= BUDGET_BYTES)
    kept = []
    for start, decoded, padded, neg_bias in chunks():
        values = None
        if centre:  # [K, span or La, C]: a window's centre pixel (whole: a slice of the padded rows)
            values = decoded.float().flatten(2)
            if whole:
                values = padded.float()[..., (kh // 2) * padded_shape[1] + kw // 2 :][..., :span]
            elif pixels.numel() != height * width or not bool((pixels == torch.arange(pixels.numel(), device=device)).all()):
                values = values[:, :, pixels]
            values = values.transpose(1, 2)
        for part, state in zip(batches, states):
            weights = state.add(logits(part, padded, neg_bias), values, start, out.track_top,
                                None if keep else scratch, floor, shift)
            if keep:
                kept.append(weights)

    def located(z):  # [b, span or La, ...] -> [b, La, ...]
        if not whole:
            return z
        rows = z.as_strided((z.shape[0], *grid_shape, *z.shape[2:]),
                            (z.stride(0), padded_shape[1] * z.stride(1), *z.stride()[1:]))
        return rows.reshape(z.shape[0], grid, *z.shape[2:])

    if bool((where == torch.arange(where.numel(), device=device)).all()):
        where = slice(0, where.numel())  # every location in order (LS, PSPC): no scatter
    for part, state in zip(batches, states):
        if centre:
            out.mean[part, where] = located(state.mean()).to(dtype)
        out.effective[part, where] = located(state.effective_count()).to(dtype)
        if out.merge is not None:
            for name in ("max", "total", "squares"):
                setattr(state, name, located(getattr(state, name)))
        out.keep(part, where, state)
        if out.track_top:
            out.top_image[part, where] = located(state.top_image)
            out.top_position[part, where] = index
    if centre:
        return
    if out.merge is not None:  # one part of the dataset: fold with the whole dataset's maximum and normaliser
        out.merge_parts()
        for part, state in zip(batches, states):
            state.max, state.total = out.max[part, where], out.total[part, where]
            if whole:  # back to the layout of the logits (the wrapped sums get weight 0: any value will do)
                for name in ("max", "total"):
                    full = getattr(state, name).new_ones(state.max.shape[0], span)
                    setattr(state, name, full.index_copy_(1, flat, getattr(state, name)))
    lowest = weight_floor(torch.float32)
    out.folded = torch.zeros(batch, channels, height, width, dtype=dtype, device=device)

    full = (grid_shape[0] + 2 * (kh - 1), grid_shape[1] + 2 * (kw - 1))

    def fold(part, decoded, weights):  # weights [K, b, span or La] normalised: out.folded[part] += their fold
        # the weight of image i at every window covering pixel p, summed: a full-size window sum of the weights
        # zero-padded by the window size
        count, size = weights.shape[:2]
        buffers = [scratch.take(("fold", i), (count, size, full[0] * full[1]), torch.float32) for i in range(3)]
        buffers[0].zero_().view(count, size, *full)[..., kh - 1 : kh - 1 + grid_shape[0],
                                                     kw - 1 : kw - 1 + grid_shape[1]] = on_grid(weights)
        spread = box_sums_(buffers, full, (kh, kw))[..., pad : pad + height, pad : pad + width]  # [K, b, H, W]
        terms = scratch.take("fold terms", (count, size, channels, height, width), torch.float32)
        out.folded[part] += halving_sum_(torch.mul(decoded[:, None], spread[:, :, None], out=terms))

    if keep:  # one chunk: its weights were taken against the final maximum already
        decoded = store.decode(images, torch.float32)
        for part, state, weights in zip(batches, states, kept):
            fold(part, decoded, weights.div_(state.total))
        return
    for start, decoded, padded, neg_bias in chunks():
        for part, state in zip(batches, states):
            shifted = (logits(part, padded, neg_bias) - state.max).float()
            fold(part, decoded.float(), shifted.clamp_(min=lowest).exp2_().div_(state.total))

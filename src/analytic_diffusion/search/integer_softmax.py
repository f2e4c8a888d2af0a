"""Softmax-weighted means over a uint8 store from exact integer products, each result within a rigorous bound.

For queries q [B, n] (float64) and a scale c > 0 it computes w_i = softmax_i(-c ||q - y_i||^2) over all N images
and the mean sum_i w_i y_i (the optimal denoiser, DESIGN.md §3; docs/benchmarks-optimal.md has the derivation).

1. Scores. q = s X + e with s a power of two and X split into D balanced digits of `bits` bits; the raw uint8
   chunk (zero point 128) times the digits is one uint8 x int8 GEMM (oneDNN) accumulated exactly in int32, so
   d_hat_i = ||q||^2 + ||y_i||^2 - 2 (s X.(u_i / 127.5 - 1) + e.mu) misses d_i = ||q - y_i||^2 by at most E per
   query: the rounding e against ||y_i - mu|| (mu the dataset mean), decoding off the affine model (optionally
   corrected by a second one-digit GEMM against integer levels of y(u) - (u / 127.5 - 1)), float conversions, all
   doubled. The query may come in pieces, v = s_1 X_1 + s_2 X_2 + ..., each piece's products added exactly, and
   E bounds d_hat for their sum.
2. Passes. A small block (at most DIRECT_COLUMNS digit columns: the GEMM is memory-bound) whose cheapest plan
   with c E <= LOGIT_ERROR exists (early and middle steps) takes it in one pass: nothing is rescored. Otherwise a
   first pass of 1 to FIRST_MAX_DIGITS digits: images with d_hat_i > min d_hat + 2 E + L / c weigh less than e^-L
   times the largest weight and are skipped (N e^-L <= e^-40 of the mass), and the candidates are counted that
   must be rescored exactly (float64 squared differences, nearest first) before the mass the others may carry,
   times their logit error, moves the mean by at most WEIGHTS_ACCURACY. Where the weight sits on few images
   (late steps) that count is small and they are rescored. Queries for which rescoring would cost more than
   REFINE_COLUMNS digit columns over the store get a refinement pass with digits of the rest q - s_1 X_1: first
   relaxed (c E <= RELAXED_ERROR, then rescoring), then, where that still leaves many, to c E <= LOGIT_ERROR.
   Candidates are gathered into [B, K] when K <= N / COMPACT_SHARE, so that late steps touch [B, N] only a
   few times.
3. Weighted sum. Weights below DROP_ACCURACY / 2 of their sum / N are left out. Few kept images: gathered and
   summed in float64. Many: the weights become D_w int8 digits against a transposed uint8 copy of the store in
   the same exact GEMM, D_w the fewest for which the rounding of the weights moves the mean by at most
   SUM_ACCURACY.

Every stage's error is bounded a priori, so every value of the mean is within WEIGHTS_ACCURACY + DROP_ACCURACY +
SUM_ACCURACY = 8e-6 of the float64 formula (plus float rounding of order 1e-7: the float32 outputs of the
weighted-sum GEMM, 2^-24 relative), whatever the data, timestep, chunking or path taken (the passes change the
cost, never the bound). The digit width is chosen at run time: 8 bits where the GEMM accumulates u8 x s8 products
exactly (VNNI, AMX), 7 where pairs of products pass through int16 (AVX2 without VNNI: 2 x 255 x 64 < 2^15), and no
integer path (the caller's float fallback) where neither self-test passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Protocol

import torch

from ..data.store import DatasetStore
from .knn import _decode_error

# the most each stage may move any value of the mean (rigorous bounds; together 8e-6 < 1e-5):
WEIGHTS_ACCURACY = 4e-6  # logit errors of the weights (2 (e^cE - 1) e^cE <= 4e-6 for cE <= LOGIT_ERROR)
DROP_ACCURACY = 2e-6  # weights below DROP_ACCURACY / 2 sum_j w_j / N left out of the weighted sum
SUM_ACCURACY = 2e-6  # rounding of the weights to integer digits for the dense weighted sum
LOGIT_ERROR = 2e-6  # c E at or below this: scores used as they are, nothing rescored
SKIP_LOGITS = 40.0  # images this far (plus log N) below the largest logit are skipped
MAX_DIGITS = 5  # digits of the weights, or of the refinement of a query, at most (35 to 40 bits)
FIRST_DIGITS = 2  # digits of a query in the first pass (13 to 15 bits) when none reaches FEW_RESCORED
FEW_RESCORED = 1e-3  # first-pass logit errors c E up to this leave few candidates to rescore
RELAXED_ERROR = 1e-5  # a first refinement may stop at this c E (no decoding correction) and rescore a few
FIRST_MAX_DIGITS = 3  # the first pass has at most this many digits (more are a refinement pass's job)
FIRST_RESCORED = 8  # candidates rescored per query first; x4 per round while the bound is not met
RESCORE_COST = 300  # time of one float64 rescored value / one multiply-add of the int8 GEMM (measured, AVX2)
REFINE_COLUMNS = 4  # digit columns a refinement pass typically costs; queries whose rescoring would cost more
# (take_b RESCORE_COST > REFINE_COLUMNS N) are refined instead
DIRECT_COLUMNS = 96  # query x digit columns up to which one pass with every digit costs about one pass
PASS_COLUMNS = 24  # a pass over the store costs at least this many digit columns (reading it, measured AVX2)
PROBE_QUERIES = 8  # queries, spread over the batch, whose first pass decides `probe`
PROBE_MARGIN = 4  # a probed one-digit first pass: rescoring what it keeps must cost < 1/4 of a digit column
MIN_LOGIT = -700.0  # logits are floored here (relative to the largest, 0): e^-700 is no subnormal, which would
# slow exp and every product after it tenfold, and N e^-700 of extra weight changes nothing
SAFETY = 2.0  # rigorous bounds are doubled before use
ZERO_POINT = 128  # the GEMM multiplies u - 128 in [-128, 127]
LEVELS = 63  # decoding corrections are written as int levels in [-63, 63]: level + 128 <= 191, 2 x 191 x 64 < 2^15
FLOAT32_EXACT = 2.0**24  # integers below this convert to float32 exactly
RESCORE_BYTES = 1 << 20  # float64 rows rescored together (cache-sized)
WORKING_BYTES = 512 << 20  # scores, weights and temporaries of one query block
CHUNK_BYTES = 4 << 20  # uint8 images per GEMM call (cache-sized; the result does not depend on it)
SUM_IMAGES = 1 << 16  # images per weighted-sum GEMM: 2^16 x 128 x 128 = 2^30 < 2^31, no int32 overflow
COMPACT_SHARE = 64  # candidates are gathered into [B, K] when K <= N / COMPACT_SHARE (a cheap top-k)
SPARSE_SHARE = 1 / 16  # kept (query, image) pairs below this share of B x N: gathered weighted sum
SPARSE_ALWAYS = 64  # ... or below this many per query (exact in float64, so one kept image returns that image)


@dataclass
class SoftmaxMean:
    """Per query: the softmax mean and the concentration of its weights."""

    mean: torch.Tensor  # [B, n] float64, sum_i w_i y_i
    top_weight: torch.Tensor  # [B] float64, max_i w_i
    effective_count: torch.Tensor  # [B] float64, 1 / sum_i w_i^2
    top_index: torch.Tensor  # [B] int64, argmax_i w_i (lowest index on ties)


@dataclass
class Probe:
    """What a first pass over a few queries says about a batch (IntegerSoftmax.probe)."""

    concentrated: bool  # few images to rescore, a gathered weighted sum: the integer kernel is the fast path
    first_places: int  # digits of the first pass for the whole batch


class SharedCeiling(Protocol):
    """The other parts of a dataset split across processes (distributed/dataset.py): `num_images` of the largest
    part (every part cuts its queries into the same blocks), and the call: per query, the smallest of every part's
    bound on its smallest distance [B] float64 (a collective). `agree(flag)`: True where every part's flag is
    (a collective), for decisions every part must take alike."""

    num_images: int

    def __call__(self, bound: torch.Tensor) -> torch.Tensor: ...

    def agree(self, flag: bool) -> bool: ...


@dataclass
class _Piece:
    """One part s X of a quantised query block: s [B] powers of two, X [B, n] integers (float64) that `places`
    balanced digits of `bits` bits hold."""

    scale: torch.Tensor
    whole: torch.Tensor
    bits: int
    places: int

    @cached_property
    def digits(self) -> torch.Tensor:
        """int8 [places, B, n], most significant first (built when a GEMM or a bound needs them)."""
        return _balanced_digits(self.whole, self.bits, self.places)

    def select(self, rows: torch.Tensor) -> _Piece:
        return _Piece(self.scale[rows], self.whole[rows], self.bits, self.places)


@dataclass
class _Candidates:
    """Per query the images not skipped: distances [B, K] (d_hat, exact where rescored), their image indices
    [B, K] (None: K = N, all images in order) and which entries are kept [B, K]."""

    distances: torch.Tensor
    index: torch.Tensor | None
    valid: torch.Tensor

    def select(self, rows: torch.Tensor) -> _Candidates:
        index = None if self.index is None else self.index[rows]
        return _Candidates(self.distances[rows], index, self.valid[rows])


class _Plans:
    """Candidate plans for one query block: `base` pieces plus one piece of 1 to MAX_DIGITS digits of the rest
    q - v, and the error bounds E [B] of each with and without the decoding correction, all computed at once (one
    batched pass instead of a few dozen small operations per plan)."""

    def __init__(self, kernel: IntegerSoftmax, q: torch.Tensor, base: list[_Piece]):
        self.base = base
        base_value = _value(base) if base else torch.zeros_like(q)
        wholes, scales = _quantise(q - base_value, kernel.bits, torch.arange(1, MAX_DIGITS + 1))  # [P, B, n], [P, B]
        self.pieces = [_Piece(scales[p], wholes[p], kernel.bits, p + 1) for p in range(MAX_DIGITS)]
        values = scales[..., None] * wholes + base_value  # v [P, B, n] of each plan
        base_conversion = kernel._conversions(base) if base else 0
        conversion = torch.stack([base_conversion + kernel._conversions([piece]) for piece in self.pieces])
        self.errors = {corrected: kernel._error_bound(q, values, conversion, corrected) for corrected in (False, True)}

    def plan(self, places: int) -> list[_Piece]:
        return [*self.base, self.pieces[places - 1]]

    def error(self, places: int, corrected: bool) -> torch.Tensor:
        """E [B] of the plan."""
        return self.errors[corrected][places - 1]

    def worst(self, c: float, places: int, corrected: bool) -> float:
        """max_b c E_b of the plan."""
        return float(c * self.errors[corrected][places - 1].max())


def _plan_order() -> list[tuple[int, int, bool]]:
    """(digit columns, places, corrected) cheapest first: the correction costs one more column."""
    return sorted((places + corrected, places, bool(corrected)) for places in range(1, MAX_DIGITS + 1)
                  for corrected in (0, 1))


def _value(pieces: list[_Piece]) -> torch.Tensor:
    """v = sum_k s_k X_k [B, n]."""
    return sum(piece.scale[:, None] * piece.whole for piece in pieces)


def _gemm(activation: torch.Tensor, packed: torch.Tensor, columns: int) -> torch.Tensor:
    """float32 [M, C] = (uint8 [M, K] - 128) x int8 [C, K]^T, accumulated in int32 by oneDNN."""
    zero = torch.zeros(columns, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        activation, 1.0, ZERO_POINT, packed, torch.ones(columns), zero, None, 1.0, 0, torch.float32, "none", [], ""
    )


@lru_cache(maxsize=None)
def digit_bits(length: int) -> int | None:
    """Bits per signed digit for which this CPU's uint8 x int8 GEMM is exact on rows of `length`: 8, 7 or None."""
    ramp = torch.arange(length)
    even = ramp % 2 == 0
    data = torch.stack([torch.full((length,), 255), torch.zeros(length), torch.where(even, 255, 0), ramp * 37 % 256])
    for bits in (8, 7):
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        digits = torch.stack([torch.full((length,), low), torch.full((length,), high), torch.where(even, low, high),
                              ramp * 11 % (high - low + 1) + low])
        try:
            packed = torch.ops.onednn.qlinear_prepack(digits.to(torch.int8), None)
            out = _gemm(data.to(torch.uint8), packed, digits.shape[0]).to(torch.float64)
        except (AttributeError, RuntimeError, NotImplementedError):
            return None
        expected = (data.to(torch.float64) - ZERO_POINT) @ digits.to(torch.float64).t()
        if torch.equal(out, expected.to(torch.float32).to(torch.float64)):
            return bits
    return None


def integer_path_available(store: DatasetStore, device: torch.device) -> bool:
    """uint8 store on the CPU, rows short enough for exact int32 sums, and an exact GEMM on this CPU."""
    return (store.is_uint8 and device.type == "cpu" and store.dim * 128 * 128 < 2**31
            and digit_bits(store.dim) is not None)


def _balanced_digits(whole: torch.Tensor, bits: int, places: int) -> torch.Tensor:
    """int8 [places, *shape], most significant first: whole = sum_j d_j 2^(bits (places - 1 - j)), every |d_j| <
    2^(bits - 1), for |whole| <= (2^(bits - 1) - 1) 2^(bits (places - 1)) (exact integer arithmetic)."""
    half = 1 << (bits - 1)
    rest = whole.to(torch.int64)
    digits = torch.empty((places, *whole.shape), dtype=torch.int8)
    for place in range(places - 1, 0, -1):
        low = (rest + half).bitwise_and_(2 * half - 1).sub_(half)
        digits[place] = low
        rest = (rest - low).bitwise_right_shift_(bits)
    digits[0] = rest
    return digits


def _quantise(values: torch.Tensor, bits: int, places: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., m] float64 = scale[..., None] * whole + rest with scale a power of two and whole integers that
    `places` digits hold; returns (whole [..., m] float64, scale [...]). `places` a tensor [P] of counts: one
    quantisation per count, whole [P, ..., m] and scale [P, ...]."""
    scale = _scales(values.abs().amax(dim=-1), bits, places)
    return torch.round(values / scale[..., None]), scale


def _scales(amax: torch.Tensor, bits: int, places: int | torch.Tensor) -> torch.Tensor:
    """The powers of two s [...] (or [P, ...] for a tensor of counts) for which |values| <= amax [...] become
    integers that `places` digits hold."""
    counts = torch.as_tensor(places)
    limit = torch.tensor([float(((1 << (bits - 1)) - 1) << (bits * (k - 1))) for k in counts.reshape(-1).tolist()],
                         dtype=torch.float64).reshape(counts.shape + (1,) * amax.dim())
    amax = amax.clamp_min(2.0**-900)
    scale = torch.exp2(torch.ceil(torch.log2(amax / limit)))
    return torch.where(amax / scale > limit, scale * 2, scale)  # guard rounding of log2


class IntegerSoftmax:
    """The kernel, fitted once on a uint8 store: float64 norms, the mean image, its spread, a transposed copy."""

    def __init__(self, store: DatasetStore, chunk_size: int | None = None):
        if not integer_path_available(store, torch.device("cpu")):
            raise ValueError("IntegerSoftmax needs a uint8 store on a CPU with an exact uint8 x int8 GEMM")
        self.store, self.dim, self.num_images = store, store.dim, store.num_images
        self.bits = digit_bits(store.dim)
        self.images = store.images.reshape(self.num_images, self.dim)  # read in place
        # [n, K] blocks of the transposed store, the weighted sum's GEMM operand (K images keep int32 sums exact)
        self.transposed = [self.images[start : start + SUM_IMAGES].t().contiguous()
                           for start in range(0, self.num_images, SUM_IMAGES)]
        self.chunk = chunk_size or max(1, CHUNK_BYTES // self.dim)
        norms, total = [], torch.zeros(self.dim, dtype=torch.float64)
        for start in range(0, self.num_images, self.chunk):
            rows = self._decoded(self.images[start : start + self.chunk])
            norms.append(rows.square().sum(1))
            total += rows.sum(0)
        self.norms = torch.cat(norms)  # ||y_i||^2 of the decoded float32 images, in float64
        self.mu = total / self.num_images
        spread = max(float((self._decoded(self.images[s : s + self.chunk]) - self.mu).norm(dim=1).max())
                     for s in range(0, self.num_images, self.chunk))
        self.spread = spread * (1 + 1e-9)  # >= max_i ||y_i - mu||
        self.max_norm_sq = float(self.norms.max())
        self.decode_error = _decode_error(store)
        # decoding off the affine model, delta(u) = y(u) - (u / 127.5 - 1), as delta_max / LEVELS * level(u) + rest
        values = torch.arange(256, dtype=torch.uint8)
        delta = store.decode(values, torch.float64) - (values.to(torch.float64) / 127.5 - 1)
        levels = torch.round(delta / max(self.decode_error, 1e-300) * LEVELS)
        self.level_step = self.decode_error / LEVELS
        self.level_rest = float((delta - self.level_step * levels).abs().max()) * (1 + 1e-9)
        self.level_table = (levels + ZERO_POINT).to(torch.uint8)
        self._levels: torch.Tensor | None = None  # level(u_i) + 128 [N, n], built the first time it is needed

    def _decoded(self, raw: torch.Tensor) -> torch.Tensor:
        return self.store.decode(raw, torch.float64)

    @property
    def levels(self) -> torch.Tensor:
        """level(u) + 128 for every stored value (uint8 [N, n], N n bytes), the decoding correction's GEMM operand."""
        if self._levels is None:
            self._levels = self.level_table[self.images.long()]
        return self._levels

    @torch.no_grad()
    def __call__(self, query: torch.Tensor, scale: float, first_places: int | None = None,
                 shared: SharedCeiling | None = None) -> SoftmaxMean:
        """Softmax of -scale ||q_b - y_i||^2 over all images and the weighted mean, for queries [B, n] float64.
        `first_places`: the first pass's digits when a `probe` chose them (else chosen per block). `shared`: the
        store is one part of a dataset (a shard of a distributed run); each block's bounds on its smallest
        distances are exchanged with the other parts, and images that weigh < e^-SKIP_LOGITS / N of the largest
        weight over the whole dataset are skipped (every part calls it once per block, in the same blocks)."""
        images = self.num_images if shared is None else shared.num_images
        block = max(1, WORKING_BYTES // (48 * images))
        parts = [self._block(query[start : start + block], scale, first_places, shared)
                 for start in range(0, query.shape[0], block)]
        return SoftmaxMean(*(torch.cat(values) for values in zip(*(
            (p.mean, p.top_weight, p.effective_count, p.top_index) for p in parts))))

    @torch.no_grad()
    def probe(self, query: torch.Tensor, scale: float) -> Probe:
        """A first pass over PROBE_QUERIES queries spread over the batch.

        `concentrated`: it leaves few images to rescore and few weights for the sum (the weight sits on few images:
        late steps, or middle steps on well separated data), so no refinement pass and no dense weighted sum (weight
        spread over many images: early steps, where this kernel's digit columns cost more than float32 products on
        a CPU without VNNI). `first_places`: one digit where a one-digit first pass would keep so few images that
        rescoring them costs under 1 / PROBE_MARGIN of a second digit column (counted from this pass's scores: an
        image that pass keeps has d_i <= min d + 4 E_1 + (SKIP_LOGITS + ln N) / c), else the usual first pass.
        A speed heuristic only: every answer gives results within the same bound."""
        q = query[:: max(1, query.shape[0] // PROBE_QUERIES)][:PROBE_QUERIES]  # spread over the batch
        plans = _Plans(self, q, [])
        places = self._first_places(scale, plans)
        approx, error, _ = self._first_pass(q, plans, places)
        limit = self._refine_limit()
        width = 4 * plans.error(1, False) + 2 * error + self._skip_width(scale)
        kept = (approx <= (approx.amin(dim=1) + width)[:, None]).sum(1)
        one_digit = bool((kept * RESCORE_COST * PROBE_MARGIN <= self.num_images).all())  # << one digit column
        first_places = 1 if one_digit else places
        candidates = self._candidates(approx, error, scale)
        if bool((self._rescore_counts(scale, candidates, error, limit) > limit).any()):
            return Probe(False, first_places)
        distances = candidates.distances
        weights = torch.exp(-scale * (distances - distances.amin(dim=1, keepdim=True)))
        weights.masked_fill_(~candidates.valid, 0)
        summed = self._summed(weights, candidates.valid, weights.sum(1))
        return Probe(int(summed.sum()) <= self._sparse_pairs() * q.shape[0], first_places)  # a gathered sum

    def _block(self, q: torch.Tensor, c: float, first_places: int | None, shared: SharedCeiling | None
               ) -> SoftmaxMean:
        """Scores from a first pass of FIRST_DIGITS digits; queries whose weight is spread (many images would need
        rescoring) get a refinement pass with more digits of the rest of the query; what the bound still leaves
        uncertain is rescored exactly; then the weighted sum. With `shared`, the candidates are cut at the whole
        dataset's bound on the smallest distance (min over the parts of min_i d_hat + E)."""
        plans = _Plans(self, q, [])
        first = first_places or self._first_places(c, plans)
        columns = max(first + 1, DIRECT_COLUMNS // q.shape[0])
        direct = self._direct_plan(c, plans, columns)
        if direct is not None:  # about as cheap as the first pass (or few queries), nothing to rescore: one pass
            places, corrected = direct
            pieces = plans.plan(places)
            dots = self._dots(pieces[0])
            correction = self._correction(pieces) if corrected else None
            approx, error = self._approx(q, pieces, dots, correction), plans.error(places, corrected)
            del dots, correction
            ceiling = None if shared is None else shared(approx.amin(dim=1) + error)
            return self._softmax_mean(q, c, self._candidates(approx, error, c, ceiling), None)
        approx, error, dots = self._first_pass(q, plans, first)
        ceiling = None if shared is None else shared(approx.amin(dim=1) + error)
        candidates, limit = self._candidates(approx, error, c, ceiling), self._refine_limit()
        take = self._rescore_counts(c, candidates, error, limit)
        rows = self._to_refine(take, limit)
        pieces = [plans.plan(first)[0].select(rows)]
        for strict in (False, True):  # a relaxed refinement (then rescoring), then one to c E <= LOGIT_ERROR
            if rows.numel() == 0:
                break
            sub = q[rows]
            refined = _Plans(self, sub, pieces)
            places, corrected = self._refinement(c, refined, strict)
            pieces = refined.plan(places)
            dots[:, rows] += self._dots(pieces[-1])
            correction = self._correction(pieces) if corrected else None
            approx[rows] = self._approx(sub, pieces, dots[:, rows], correction)
            error[rows] = refined.error(places, corrected)
            candidates = self._candidates(approx, error, c, ceiling)
            take[rows] = counts = self._rescore_counts(c, candidates.select(rows), error[rows])
            keep = torch.isin(rows, self._to_refine(torch.zeros_like(take).index_copy_(0, rows, counts), limit))
            rows, pieces = rows[keep], [piece.select(keep.nonzero()[:, 0]) for piece in pieces]
        del dots, approx
        return self._softmax_mean(q, c, candidates, take)

    def _softmax_mean(self, q: torch.Tensor, c: float, candidates: _Candidates, take: torch.Tensor | None):
        """Rescore the take_b nearest candidates of each query (None: none), then the weights and the mean."""
        if take is not None and bool(take.any()):
            self._rescore(q, candidates, take)
        valid = candidates.valid
        distances = candidates.distances.masked_fill_(~valid, math.inf)
        logits = (-c * (distances - distances.amin(dim=1, keepdim=True))).clamp_min_(MIN_LOGIT)
        weights = torch.exp(logits).masked_fill_(~valid, 0)
        total = weights.sum(1)
        mean = self._weighted_sum(weights, candidates) / total[:, None]
        top_weight = weights.amax(dim=1)
        images = candidates.index if candidates.index is not None else torch.arange(self.num_images)[None, :]
        top_index = torch.where(weights == top_weight[:, None], images, self.num_images).amin(dim=1)  # lowest on ties
        return SoftmaxMean(mean, top_weight / total, total.square() / weights.square().sum(1), top_index)

    def _first_places(self, c: float, plans: _Plans) -> int:
        """The first pass's digits: the fewest up to FIRST_MAX_DIGITS whose logit errors c E <= FEW_RESCORED (then
        few candidates need rescoring where the weight concentrates: middle steps), else FIRST_DIGITS (late steps:
        only near ties of the nearest image are rescored). A batch's `probe` may choose one digit instead."""
        for places in range(1, FIRST_MAX_DIGITS + 1):
            if plans.worst(c, places, False) <= FEW_RESCORED:
                return places
        return FIRST_DIGITS

    def _first_pass(self, q: torch.Tensor, plans: _Plans, places: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """d_hat [B, N], E [B] and the products [N, B] of the first piece of `places` digits."""
        first = plans.plan(places)[0]
        dots = self._dots(first)
        return self._approx(q, [first], dots, None), plans.error(places, False), dots

    def _skip_width(self, c: float) -> float:
        """(SKIP_LOGITS + ln N) / c: how far above the smallest distance an image weighs < e^-SKIP_LOGITS / N of
        the largest weight."""
        return (SKIP_LOGITS + math.log(self.num_images)) / c

    def _candidates(self, approx: torch.Tensor, error: torch.Tensor, c: float, ceiling: torch.Tensor | None = None
                    ) -> _Candidates:
        """The images that may weigh more than e^-SKIP_LOGITS / N of the largest weight (the others are skipped):
        gathered into [B, K] when every query keeps at most N / COMPACT_SHARE of them, else all N. `ceiling` [B]:
        a bound on the smallest distance over the whole dataset (this store one part of it): images with
        d_hat - E above it by the skip width are skipped too, except this part's nearest (so that its state, which
        the merge scales down, is never empty)."""
        threshold = approx.amin(dim=1) + (2 * error + self._skip_width(c))
        if ceiling is not None:
            threshold = torch.minimum(threshold, ceiling + error + self._skip_width(c)).maximum(approx.amin(dim=1))
        kept = approx <= threshold[:, None]
        most = int(kept.sum(1).max())
        if most * COMPACT_SHARE > self.num_images:
            return _Candidates(approx, None, kept)
        distances, index = approx.topk(most, dim=1, largest=False, sorted=False)
        return _Candidates(distances, index, distances <= threshold[:, None])

    def _to_refine(self, take: torch.Tensor, limit: int) -> torch.Tensor:
        """Queries [R] to refine: those whose rescoring would cost more than REFINE_COLUMNS digit columns over the
        store, unless rescoring them all costs less than one pass (at least PASS_COLUMNS columns: few rows)."""
        rows = (take > limit).nonzero()[:, 0]
        pass_cost = self.num_images * max(REFINE_COLUMNS * rows.numel(), PASS_COLUMNS)
        if int(take[rows].sum()) * RESCORE_COST <= pass_cost:
            return rows[:0]
        return rows

    def _refine_limit(self) -> int:
        """Rescored candidates per query beyond which a refinement pass (REFINE_COLUMNS digit columns over the
        whole store) is the cheaper way to certain weights."""
        return REFINE_COLUMNS * self.num_images // RESCORE_COST

    def _direct_plan(self, c: float, plans: _Plans, columns: int) -> tuple[int, bool] | None:
        """(places, corrected) of the cheapest plan of at most `columns` digit columns (one more with the decoding
        correction) whose logit errors c E <= LOGIT_ERROR (early steps), or None."""
        for cost, places, corrected in _plan_order():
            if cost > columns:
                return None
            if plans.worst(c, places, corrected) <= LOGIT_ERROR:
                return places, corrected
        return None

    def _refinement(self, c: float, plans: _Plans, strict: bool) -> tuple[int, bool]:
        """(places, corrected): the digits of the rest q - v to add, and whether to correct for decoding: the
        cheapest plan with logit errors c E <= LOGIT_ERROR (or, unless strict, without the correction's pass over
        the store and c E <= RELAXED_ERROR: then the few candidates that carry the weight are rescored), else the
        one with the least error (its candidates are rescored)."""
        best = None
        for _, places, corrected in _plan_order():
            worst = plans.worst(c, places, corrected)
            if worst <= LOGIT_ERROR or (not strict and not corrected and worst <= RELAXED_ERROR):
                return places, corrected
            if best is None or worst < best[0] / 2:
                best = (worst, places, corrected)
        return best[1], best[2]

    def _error_bound(self, q: torch.Tensor, v: torch.Tensor, conversion: torch.Tensor, corrected: bool
                     ) -> torch.Tensor:
        """E [..., B]: |d_hat_i - d_i| <= E for every image i (see the module docstring), for queries q [B, n]
        scored as v = sum_k s_k X_k [..., B, n] (exact: the pieces' bits do not overlap beyond float64's 53) whose
        products' float32 conversions lose at most `conversion` [..., B]."""
        rounding = torch.linalg.vector_norm(q - v, dim=-1)  # ||e||, exact up to float64 rounding
        q1, q2 = q.abs().sum(-1), q.square().sum(-1)
        float64 = 2.0**-48 * (self.max_norm_sq + q2 + 4 * q1 + self.dim * self.max_norm_sq)
        if corrected:  # |v.delta_i - step s1 X1.level_i| <= delta_max ||e1||_1 + rest ||v||_1 (+ its conversion)
            whole1, s1 = _quantise(v, self.bits, 1)
            size = LEVELS * whole1.abs().sum(-1)
            conversion = conversion + 2 * self.level_step * s1 * torch.where(size >= FLOAT32_EXACT, size * 2.0**-24, 0)
            residual = (v - s1[..., None] * whole1).abs().sum(-1)
            decoding = 2 * (self.decode_error * residual + self.level_rest * v.abs().sum(-1))
        else:
            decoding = 2 * self.decode_error * v.abs().sum(-1)
        return SAFETY * (2 * rounding * (1 + 1e-9) * self.spread + decoding + conversion + float64)

    def _conversions(self, pieces: list[_Piece]) -> torch.Tensor:
        """[B]: what converting the pieces' int32 digit products to float32 may lose, in all."""
        return sum((self._conversion(piece) for piece in pieces), torch.zeros_like(pieces[0].scale))

    def _conversion(self, piece: _Piece) -> torch.Tensor:
        """[B]: what converting one piece's int32 digit products to float32 may lose (0 when all are < 2^24)."""
        if ZERO_POINT * (1 << (self.bits - 1)) * self.dim < FLOAT32_EXACT:
            return torch.zeros_like(piece.scale)
        sizes = ZERO_POINT * piece.digits.abs().sum(2, dtype=torch.float64)  # >= |P_j| of each digit [places, B]
        sizes = torch.where(sizes >= FLOAT32_EXACT, sizes * 2.0**-24, torch.zeros_like(sizes))
        places = piece.digits.shape[0]
        place_values = 2.0 ** (self.bits * torch.arange(places - 1, -1, -1, dtype=torch.float64))
        return 2 * piece.scale / 127.5 * (place_values[:, None] * sizes).sum(0)

    def _dots(self, piece: _Piece) -> torch.Tensor:
        """s X.(u_i - 128) [N, B] float64 (image-major) from one exact integer GEMM per chunk of images."""
        places, batch = piece.digits.shape[0], piece.digits.shape[1]
        packed = torch.ops.onednn.qlinear_prepack(piece.digits.reshape(places * batch, self.dim), None)
        products = torch.empty((self.num_images, batch), dtype=torch.float64)
        for start in range(0, self.num_images, self.chunk):
            out = _gemm(self.images[start : start + self.chunk], packed, places * batch)  # [c, places * B]
            part = products[start : start + out.shape[0]]
            part.copy_(out[:, :batch])
            for place in range(1, places):  # Horner in float64: exact integers while below 2^53
                part.mul_(float(1 << self.bits)).add_(out[:, place * batch : (place + 1) * batch])
        return products.mul_(piece.scale)

    def _correction(self, pieces: list[_Piece]) -> torch.Tensor:
        """step s1 X1.level_i [N, B]: the decoding correction of v = sum_k s_k X_k (X1 one digit of v)."""
        whole1, s1 = _quantise(_value(pieces), self.bits, 1)
        packed = torch.ops.onednn.qlinear_prepack(whole1.to(torch.int8), None)
        out = torch.empty((self.num_images, whole1.shape[0]), dtype=torch.float64)
        for start in range(0, self.num_images, self.chunk):
            out[start : start + self.chunk] = _gemm(self.levels[start : start + self.chunk], packed, whole1.shape[0])
        return out.mul_(self.level_step * s1)

    def _approx(self, q: torch.Tensor, pieces: list[_Piece], dots: torch.Tensor, correction) -> torch.Tensor:
        """d_hat [B, N] = ||q||^2 + ||y_i||^2 - 2 (v.y_i + e.mu), v.y_i from the pieces' exact products `dots`."""
        # s X.(u / 127.5 - 1) = s (X.(u - 128) / 127.5 + sum(X) / 255); e.mu keeps d_hat unbiased by the rounding
        sums = sum(piece.scale * piece.whole.sum(1) for piece in pieces)
        constant = q.square().sum(1) - 2 * (sums / 255 + (q - _value(pieces)) @ self.mu)
        approx = torch.add(self.norms, constant[:, None]).add_(dots.t(), alpha=-2 / 127.5)
        if correction is not None:  # s X.y_i = s X.(u_i / 127.5 - 1) + s X.delta_i
            approx.add_(correction.t(), alpha=-2)
        return approx

    def _exact(self, q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """||q_r - y_c||^2 in float64 from differences, for pairs (rows, cols), in cache-sized groups."""
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        group = max(1, RESCORE_BYTES // (8 * self.dim))
        for start in range(0, rows.shape[0], group):
            r, i = rows[start : start + group], cols[start : start + group]
            out[start : start + group] = (self._decoded(self.images[i]).sub_(q[r])).square_().sum(1)
        return out

    def _rescore_counts(
        self, c: float, candidates: _Candidates, error: torch.Tensor, limit: int | None = None
    ) -> torch.Tensor:
        """K_b [B] int64: the fewest nearest candidates of query b (x4 from FIRST_RESCORED) to rescore exactly
        (float64 differences) so that the other kept images' logit errors move the mean by at most
        WEIGHTS_ACCURACY; 0 where c E <= LOGIT_ERROR (nothing to rescore). Counts beyond `limit` are not searched:
        those queries get their number of kept images (> limit).

        With w_hat_i = exp(-c (d_hat_i - min d_hat)): exact weights w_i are within e^(+-cE) of w_hat_i; using w_hat
        for the rest R moves the mean by at most 2 ((e^cE - 1) e^cE sum_R w_hat + e^-SKIP_LOGITS) / sum_S w, and
        sum_S w >= e^-cE sum_S w_hat. So K_b is found from the approximate weights alone, before any rescoring.
        """
        approx, kept = candidates.distances, candidates.valid
        take = torch.zeros(approx.shape[0], dtype=torch.int64)
        pending = (c * error > LOGIT_ERROR).nonzero()[:, 0]
        if pending.numel() == 0:
            return take
        ce = (c * error).clamp_max(350.0)
        factor = 2 * torch.expm1(ce) * torch.exp(2 * ce)
        skipped = 2 * math.exp(-SKIP_LOGITS) * ce.exp()
        sub = approx[pending]
        approx_logits = (-c * (sub - sub.amin(dim=1, keepdim=True))).clamp_min_(MIN_LOGIT)
        approx_weights = torch.exp(approx_logits).masked_fill_(~kept[pending], 0)
        total, counts = approx_weights.sum(1), kept[pending].sum(1)

        def certain_with(k: int, position: torch.Tensor) -> torch.Tensor:
            head = approx_weights[position].topk(k, dim=1).values.sum(1)
            rest = (total[position] - head).clamp_min_(0) + 1e-14 * total[position]  # + its own rounding
            rows = pending[position]
            return (factor[rows] * rest + skipped[rows] <= WEIGHTS_ACCURACY * head) | (counts[position] <= k)

        position, k = torch.arange(pending.numel()), FIRST_RESCORED
        if limit is not None and limit < int(counts.max()):  # one look at the limit first: spread rows stop here
            beyond = ~certain_with(limit, position)
            take[pending[beyond]] = counts[beyond]
            position = position[~beyond]
        while position.numel():
            k = min(k, int(counts[position].max()), limit if limit is not None else k)
            certain = certain_with(k, position)
            take[pending[position[certain]]] = torch.minimum(counts[position[certain]], torch.tensor(k))
            position, k = position[~certain], 4 * k
        return take

    def _rescore(self, q: torch.Tensor, candidates: _Candidates, take: torch.Tensor) -> None:
        """Replace the distances of the take_b nearest candidates of each query b by exact ones (in place)."""
        ranked = candidates.distances.masked_fill(~candidates.valid, math.inf)
        nearest = ranked.topk(int(take.max()), dim=1, largest=False).indices
        rows, places = (torch.arange(nearest.shape[1])[None, :] < take[:, None]).nonzero(as_tuple=True)
        positions = nearest[rows, places]
        cols = positions if candidates.index is None else candidates.index[rows, positions]
        candidates.distances[rows, positions] = self._exact(q, rows, cols)

    def _summed(self, weights: torch.Tensor, valid: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """The weights [B, K] that enter the weighted sum: those at least DROP_ACCURACY / 2 sum_j w_j / N."""
        return valid & (weights >= (DROP_ACCURACY / 2 / self.num_images) * total[:, None])

    def _sparse_pairs(self) -> float:
        """Kept images per query up to which the weighted sum gathers them (float64) instead of the dense GEMM."""
        return max(SPARSE_SHARE * self.num_images, SPARSE_ALWAYS)

    def _weight_digits(self, weights: torch.Tensor, kept: torch.Tensor, total: torch.Tensor
                       ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(places, whole [B, K], s [B]): the fewest digits (up to MAX_DIGITS) whose rounding of the weights [B, K]
        moves sum_i |w_q,i - w_i| by at most SUM_ACCURACY sum_i w_i. Rounding one weight moves it by at most
        min(w_i, s / 2), so `kept` [B] nonzero weights move by at most kept s / 2: the fewest places meeting that
        bound qualify, and one place fewer is measured (it may still qualify: most weights are far below s / 2)."""
        scales = _scales(weights.amax(dim=1), self.bits, torch.arange(1, MAX_DIGITS + 1))  # [P, B]
        meets = ((kept * scales / 2) <= SUM_ACCURACY * total).all(dim=1)
        places = int(meets.to(torch.int64).argmax()) + 1 if bool(meets.any()) else MAX_DIGITS
        if places > 1:
            whole, s = _quantise(weights, self.bits, places - 1)
            if bool(((weights - s[:, None] * whole).abs().sum(1) <= SUM_ACCURACY * total).all()):
                return places - 1, whole, s
        whole, s = _quantise(weights, self.bits, places)
        return places, whole, s

    def _weighted_sum(self, weights: torch.Tensor, candidates: _Candidates) -> torch.Tensor:
        """sum_i w_i y_i [B, n] for the candidates' weights [B, K] (zero where not valid), within (DROP_ACCURACY +
        SUM_ACCURACY) sum_i w_i: weights below DROP_ACCURACY / 2 sum_j w_j / N are left out (moving the mean by at
        most DROP_ACCURACY)."""
        batch = weights.shape[0]
        total = weights.sum(1)
        kept = self._summed(weights, candidates.valid, total)
        pairs = int(kept.sum())
        if pairs <= self._sparse_pairs() * batch:
            rows, places = kept.nonzero(as_tuple=True)
            cols = places if candidates.index is None else candidates.index[rows, places]
            values = weights[rows, places]
            out = torch.zeros((batch, self.dim), dtype=torch.float64)
            group = max(1, RESCORE_BYTES // (8 * self.dim))
            for start in range(0, rows.shape[0], group):
                r, i = rows[start : start + group], cols[start : start + group]
                out.index_add_(0, r, self._decoded(self.images[i]).mul_(values[start : start + group, None]))
            return out
        weights = weights * kept
        if candidates.index is not None:
            weights = torch.zeros((batch, self.num_images), dtype=torch.float64).scatter_(1, candidates.index, weights)
        places, whole, s = self._weight_digits(weights, kept.sum(1), total)
        digits = _balanced_digits(whole, self.bits, places)
        place_values = 2.0 ** (self.bits * torch.arange(places - 1, -1, -1, dtype=torch.float64))
        products = torch.zeros((self.dim, batch), dtype=torch.float64)
        for block, start in zip(self.transposed, range(0, self.num_images, SUM_IMAGES)):
            part = digits[:, :, start : start + block.shape[1]].reshape(places * batch, -1)
            out = _gemm(block, torch.ops.onednn.qlinear_prepack(part, None), places * batch)  # sum_i d_i (u_i - 128)
            products += out.to(torch.float64).reshape(self.dim, places, batch).mul_(place_values[:, None]).sum(1)
        products = products.t()
        # sum_i w_i (u_i / 127.5 - 1) = sum_i w_i (u_i - 128) / 127.5 + sum_i w_i / 255
        return products.mul_(s[:, None] / 127.5).add_((s * whole.sum(1) / 255)[:, None])

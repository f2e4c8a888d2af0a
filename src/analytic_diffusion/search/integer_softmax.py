"""Softmax-weighted means over a uint8 store from exact integer products, each result within a rigorous bound.

For queries q [B, n] (float64) and a scale c > 0 it computes w_i = softmax_i(-c ||q - y_i||^2) over all N images
and the mean sum_i w_i y_i (the optimal denoiser, DESIGN.md §3; docs/benchmarks-optimal.md has the derivation).

1. Scores. q = s X + e with s a power of two and X split into D balanced digits of `bits` bits; the raw uint8
   chunk (zero point 128) times the digits is one uint8 x int8 GEMM (oneDNN) accumulated exactly in int32, so
   d_hat_i = ||q||^2 + ||y_i||^2 - 2 (s X.(u_i / 127.5 - 1) + e.mu) misses d_i = ||q - y_i||^2 by at most E per
   query: the rounding e against ||y_i - mu|| (mu the dataset mean), decoding off the affine model (optionally
   corrected by a second one-digit GEMM against integer levels of y(u) - (u / 127.5 - 1)), float conversions, all
   doubled. The plan (D, correction or not) is the cheapest with c E <= LOGIT_ERROR (then no image is rescored),
   else one close to the least error, or REFINE_DIGITS when even that leaves many logits uncertain (late steps).
2. Selection. Images with d_hat_i > min d_hat + 2 E + L / c weigh less than e^-L times the largest weight and are
   skipped (N e^-L <= e^-40 of the mass). When c E > LOGIT_ERROR the candidates are rescored exactly (float64
   squared differences), nearest first, until the mass the others may carry, times their logit error, moves
   the mean by at most WEIGHTS_ACCURACY.
3. Weighted sum. Weights below DROP_ACCURACY / 2 of their sum / N are left out. Few kept images: gathered and
   summed in float64. Many: the weights become D_w int8 digits against a transposed uint8 copy of the store in
   the same exact GEMM, D_w the fewest for which the rounding of the weights moves the mean by at most
   SUM_ACCURACY.

Every stage's error is bounded a priori, so every value of the mean is within WEIGHTS_ACCURACY + DROP_ACCURACY +
SUM_ACCURACY = 8e-6 of the float64 formula (plus float rounding of order 1e-7: the float32 outputs of the
weighted-sum GEMM, 2^-24 relative), whatever the data, timestep or chunking. The digit width is chosen at run time: 8 bits where the GEMM
accumulates u8 x s8 products exactly (VNNI, AMX), 7 where pairs of products pass through int16 (AVX2 without
VNNI: 2 x 255 x 64 < 2^15), and no integer path (the caller's float fallback) where neither self-test passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..data.store import DatasetStore
from .knn import _decode_error

# the most each stage may move any value of the mean (rigorous bounds; together 8e-6 < 1e-5):
WEIGHTS_ACCURACY = 4e-6  # logit errors of the weights (2 (e^cE - 1) e^cE <= 4e-6 for cE <= LOGIT_ERROR)
DROP_ACCURACY = 2e-6  # weights below DROP_ACCURACY / 2 sum_j w_j / N left out of the weighted sum
SUM_ACCURACY = 2e-6  # rounding of the weights to integer digits for the dense weighted sum
LOGIT_ERROR = 2e-6  # c E at or below this: scores used as they are, nothing rescored
FEW_RESCORED = 1e-3  # c E of the most digits at or below this: score with about that many digits, rescore few
SKIP_LOGITS = 40.0  # images this far (plus log N) below the largest logit are skipped
MAX_DIGITS = 5  # digits of a query or of the weights at most (35 to 40 bits)
REFINE_DIGITS = 2  # digits of the first pass when candidates are rescored anyway
FIRST_RESCORED = 8  # candidates rescored per query first; x4 per round while the bound is not met
MIN_LOGIT = -700.0  # logits are floored here (relative to the largest, 0): e^-700 is no subnormal, which would
# slow exp and every product after it tenfold, and N e^-700 of extra weight changes nothing
SAFETY = 2.0  # rigorous bounds are doubled before use
ZERO_POINT = 128  # the GEMM multiplies u - 128 in [-128, 127]
LEVELS = 63  # decoding corrections are written as int levels in [-63, 63]: level + 128 <= 191, 2 x 191 x 64 < 2^15
FLOAT32_EXACT = 2.0**24  # integers below this convert to float32 exactly
WORKING_BYTES = 512 << 20  # scores, weights and temporaries of one query block
CHUNK_BYTES = 4 << 20  # uint8 images per GEMM call (cache-sized; the result does not depend on it)
SUM_IMAGES = 1 << 16  # images per weighted-sum GEMM: 2^16 x 128 x 128 = 2^30 < 2^31, no int32 overflow
SPARSE_SHARE = 1 / 16  # kept (query, image) pairs below this share of B x N: gathered weighted sum
SPARSE_ALWAYS = 64  # ... or below this many per query (exact in float64, so one kept image returns that image)


@dataclass
class SoftmaxMean:
    """Per query: the softmax mean and the concentration of its weights."""

    mean: torch.Tensor  # [B, n] float64, sum_i w_i y_i
    top_weight: torch.Tensor  # [B] float64, max_i w_i
    effective_count: torch.Tensor  # [B] float64, 1 / sum_i w_i^2
    top_index: torch.Tensor  # [B] int64, argmax_i w_i (lowest index on ties)


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


def _quantise(values: torch.Tensor, bits: int, places: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, m] float64 = scale[:, None] * whole + rest with scale a power of two and whole integers that
    `places` digits hold; returns (whole [B, m] float64, scale [B])."""
    limit = ((1 << (bits - 1)) - 1) * 2.0 ** (bits * (places - 1))
    amax = values.abs().amax(dim=1).clamp_min(2.0**-900)
    scale = torch.exp2(torch.ceil(torch.log2(amax / limit)))
    scale = torch.where(amax / scale > limit, scale * 2, scale)  # guard rounding of log2
    return torch.round(values / scale[:, None]), scale


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
    def __call__(self, query: torch.Tensor, scale: float) -> SoftmaxMean:
        """Softmax of -scale ||q_b - y_i||^2 over all images and the weighted mean, for queries [B, n] float64."""
        block = max(1, WORKING_BYTES // (48 * self.num_images))
        parts = [self._block(query[start : start + block], scale) for start in range(0, query.shape[0], block)]
        return SoftmaxMean(*(torch.cat(values) for values in zip(*(
            (p.mean, p.top_weight, p.effective_count, p.top_index) for p in parts))))

    def _block(self, q: torch.Tensor, c: float) -> SoftmaxMean:
        places, corrected, error = self._choose_places(q, c)
        approx = self._scores(q, places, corrected)  # d_hat [B, N]
        lowest = approx.amin(dim=1, keepdim=True)
        skip = SKIP_LOGITS + math.log(self.num_images)
        kept = approx <= lowest + 2 * error[:, None] + skip / c
        if bool((c * error <= LOGIT_ERROR).all()):
            distances = approx
        else:
            distances = self._rescore_until_certain(q, c, approx, kept, error)
        distances = distances.masked_fill(~kept, math.inf)
        logits = (-c * (distances - distances.amin(dim=1, keepdim=True))).clamp_min_(MIN_LOGIT)
        weights = torch.exp(logits).masked_fill_(~kept, 0)
        total = weights.sum(1)
        mean = self._weighted_sum(weights, kept) / total[:, None]
        top_weight, top_index = weights.max(dim=1)
        return SoftmaxMean(mean, top_weight / total, total.square() / weights.square().sum(1), top_index)

    def _choose_places(self, q: torch.Tensor, c: float) -> tuple[int, bool, torch.Tensor]:
        """Digits D, whether to correct for decoding, and E [B]: the cheapest (D digit columns, one more with the
        correction) whose logit errors c E <= LOGIT_ERROR. Where none does (late steps), candidates are rescored:
        with the cheapest choice within 2x of the least error if that is at most FEW_RESCORED (few candidates
        carry the weight that matters), else with REFINE_DIGITS (only near ties of the nearest image count)."""
        plans = sorted((places + corrected, places, corrected) for places in range(1, MAX_DIGITS + 1)
                       for corrected in (False, True))
        errors, worst = {}, {}
        for _, places, corrected in plans:  # cheapest first; stop at the first that needs no rescoring
            errors[places, corrected] = error = self._score_error(q, places, corrected)
            worst[places, corrected] = float((c * error).max())
            if worst[places, corrected] <= LOGIT_ERROR:
                return places, corrected, error
        least = min(worst.values())
        if least <= FEW_RESCORED:
            chosen = next(plan[1:] for plan in plans if worst[plan[1:]] <= 2 * least)
        else:
            chosen = (min(REFINE_DIGITS, MAX_DIGITS), False)
        return (*chosen, errors[chosen])

    def _score_error(self, q: torch.Tensor, places: int, corrected: bool) -> torch.Tensor:
        """E [B]: |d_hat_i - d_i| <= E for every image i (see the module docstring)."""
        whole, s = _quantise(q, self.bits, places)
        rounding = torch.linalg.vector_norm(q - s[:, None] * whole, dim=1)  # ||e||, exact up to float64 rounding
        conversion = torch.zeros_like(s)
        if ZERO_POINT * (1 << (self.bits - 1)) * self.dim >= FLOAT32_EXACT:  # else every |P_j| < 2^24: exact
            digits = _balanced_digits(whole, self.bits, places).to(torch.float64)
            sizes = ZERO_POINT * digits.abs().sum(2)  # >= |P_j| of each digit's product [places, B]
            sizes = torch.where(sizes >= FLOAT32_EXACT, sizes * 2.0**-24, torch.zeros_like(sizes))
            place_values = 2.0 ** (self.bits * torch.arange(places - 1, -1, -1, dtype=torch.float64))
            conversion = 2 * s / 127.5 * (place_values[:, None] * sizes).sum(0)
        q1, q2 = q.abs().sum(1), q.square().sum(1)
        float64 = 2.0**-48 * (self.max_norm_sq + q2 + 4 * q1 + self.dim * self.max_norm_sq)
        v = s[:, None] * whole  # the quantised query, exact
        if corrected:  # |v.delta_i - step s1 X1.level_i| <= delta_max ||e1||_1 + rest ||v||_1 (+ its conversion)
            whole1, s1 = _quantise(v, self.bits, 1)
            size = LEVELS * whole1.abs().sum(1)
            conversion = conversion + 2 * self.level_step * s1 * torch.where(size >= FLOAT32_EXACT, size * 2.0**-24, 0)
            residual = (v - s1[:, None] * whole1).abs().sum(1)
            decoding = 2 * (self.decode_error * residual + self.level_rest * v.abs().sum(1))
        else:
            decoding = 2 * self.decode_error * v.abs().sum(1)
        return SAFETY * (2 * rounding * (1 + 1e-9) * self.spread + decoding + conversion + float64)

    def _scores(self, q: torch.Tensor, places: int, corrected: bool) -> torch.Tensor:
        """d_hat [B, N] float64 from one exact integer GEMM per chunk of images (two with the correction)."""
        whole, s = _quantise(q, self.bits, places)
        digits = _balanced_digits(whole, self.bits, places)
        batch = q.shape[0]
        packed = torch.ops.onednn.qlinear_prepack(digits.reshape(places * batch, self.dim), None)
        products = torch.empty((self.num_images, batch), dtype=torch.float64)  # X.(u_i - 128), image-major
        if corrected:
            whole1, s1 = _quantise(s[:, None] * whole, self.bits, 1)
            packed1 = torch.ops.onednn.qlinear_prepack(whole1.to(torch.int8), None)
            corrections = torch.empty((self.num_images, batch), dtype=torch.float64)  # X1.level_i
        for start in range(0, self.num_images, self.chunk):
            out = _gemm(self.images[start : start + self.chunk], packed, places * batch)  # [c, places * B]
            part = products[start : start + out.shape[0]]
            part.copy_(out[:, :batch])
            for place in range(1, places):  # Horner in float64: exact integers while below 2^53
                part.mul_(float(1 << self.bits)).add_(out[:, place * batch : (place + 1) * batch])
            if corrected:
                corrections[start : start + out.shape[0]] = _gemm(self.levels[start : start + self.chunk], packed1, batch)
        # s X.(u / 127.5 - 1) = s (X.(u - 128) / 127.5 + sum(X) / 255); e.mu keeps d_hat unbiased by the rounding
        constant = q.square().sum(1) - 2 * (s * whole.sum(1) / 255 + (q - s[:, None] * whole) @ self.mu)
        approx = torch.addcmul(self.norms + constant[:, None], products.t(), (-2 / 127.5) * s[:, None])
        if corrected:  # s X.y_i = s X.(u_i / 127.5 - 1) + s X.delta_i
            approx.addcmul_(corrections.t(), (-2 * self.level_step) * s1[:, None])
        return approx

    def _exact(self, q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """||q_r - y_c||^2 in float64 from differences, for pairs (rows, cols), in memory-bounded groups."""
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        group = max(1, (32 << 20) // (16 * self.dim))
        for start in range(0, rows.shape[0], group):
            r, i = rows[start : start + group], cols[start : start + group]
            out[start : start + group] = (q[r] - self._decoded(self.images[i])).square_().sum(1)
        return out

    def _rescore_until_certain(
        self, q: torch.Tensor, c: float, approx: torch.Tensor, kept: torch.Tensor, error: torch.Tensor
    ) -> torch.Tensor:
        """Distances with the K_b nearest candidates of query b exact (float64 differences), K_b the fewest (x4 from
        FIRST_RESCORED) for which the other kept images' logit errors move the mean by at most WEIGHTS_ACCURACY.

        With w_hat_i = exp(-c (d_hat_i - min d_hat)): exact weights w_i are within e^(+-cE) of w_hat_i; using w_hat
        for the rest R moves the mean by at most 2 ((e^cE - 1) e^cE sum_R w_hat + e^-SKIP_LOGITS) / sum_S w, and
        sum_S w >= e^-cE sum_S w_hat. So K_b is found from the approximate weights alone, before any rescoring.
        """
        ce = (c * error).clamp_max(350.0)
        factor = 2 * torch.expm1(ce) * torch.exp(2 * ce)
        skipped = 2 * math.exp(-SKIP_LOGITS) * ce.exp()
        approx_logits = (-c * (approx - approx.amin(dim=1, keepdim=True))).clamp_min_(MIN_LOGIT)
        approx_weights = torch.exp(approx_logits).masked_fill_(~kept, 0)
        total, counts = approx_weights.sum(1), kept.sum(1)
        take = counts.clone()
        pending, k = torch.arange(q.shape[0]), FIRST_RESCORED
        while pending.numel():
            k = min(k, int(counts[pending].max()))
            head = approx_weights[pending].topk(k, dim=1).values.sum(1)
            rest = (total[pending] - head).clamp_min_(0) + 1e-14 * total[pending]  # + its own rounding
            certain = (factor[pending] * rest + skipped[pending] <= WEIGHTS_ACCURACY * head) | (counts[pending] <= k)
            take[pending[certain]] = torch.minimum(counts[pending[certain]], torch.tensor(k))
            pending, k = pending[~certain], 4 * k
        nearest = approx.masked_fill(~kept, math.inf).topk(int(take.max()), dim=1, largest=False).indices
        rows, places = (torch.arange(nearest.shape[1])[None, :] < take[:, None]).nonzero(as_tuple=True)
        distances = approx.clone()
        cols = nearest[rows, places]
        distances[rows, cols] = self._exact(q, rows, cols)
        return distances

    def _weighted_sum(self, weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """sum_i w_i y_i [B, n] (weights zero outside `kept`), within (DROP_ACCURACY + SUM_ACCURACY) sum_i w_i:
        weights below DROP_ACCURACY / 2 sum_j w_j / N are left out (moving the mean by at most DROP_ACCURACY)."""
        batch = weights.shape[0]
        total = weights.sum(1)
        kept = kept & (weights >= (DROP_ACCURACY / 2 / self.num_images) * total[:, None])
        weights = weights * kept
        pairs = int(kept.sum())
        if pairs <= max(SPARSE_SHARE * self.num_images, SPARSE_ALWAYS) * batch:
            rows, cols = kept.nonzero(as_tuple=True)
            out = torch.zeros((batch, self.dim), dtype=torch.float64)
            group = max(1, (32 << 20) // (16 * self.dim))
            for start in range(0, rows.shape[0], group):
                r, i = rows[start : start + group], cols[start : start + group]
                out.index_add_(0, r, weights[r, i, None] * self._decoded(self.images[i]))
            return out
        for places in range(1, MAX_DIGITS + 1):
            whole, s = _quantise(weights, self.bits, places)
            moved = (weights - s[:, None] * whole).abs().sum(1)  # sum_i |w_q,i - w_i|
            if bool((moved <= SUM_ACCURACY * total).all()) or places == MAX_DIGITS:
                break
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

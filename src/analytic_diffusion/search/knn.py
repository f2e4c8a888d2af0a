"""Exact k-nearest-neighbour search in Euclidean distance over a dataset store.

Two stages per query batch (docs/benchmarks-knn.md has the derivation and the measurements):
1. Filter. Stream the dataset chunk by chunk in its compact dtype and score every image with the expansion
   s_i = ||y_i||^2 - 2 x.y_i (= ||x - y_i||^2 - ||x||^2; the norms are computed once). A scorer returns
   s_hat_i and a bound E on |s_hat_i - s_i| per query. Only images with s_hat_i <= t_k + 2E can be among
   the k nearest (t_k: the k-th smallest s_hat), so a chunk whose best score is above the running value of
   that threshold is skipped; the others contribute their best `capacity` images to a candidate list.
2. Re-score. Candidates within the final threshold get the reference distance, the float64 sum of squared
   differences, and the k best are taken with ties broken by the lowest index. A query for which an image
   within the threshold could have been dropped (more than `capacity` near-ties) is searched again with four
   times the capacity, so rounding in the expansion can never change the answer.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..data.store import DatasetStore
from ..devices import full_precision, reduced_precision_matmul

MEMORY_BUDGET = 64 << 20  # bytes of temporaries per query batch, whatever N
CPU_CHUNK_BYTES = 8 << 20  # CPU: bytes of one chunk and its scores (amortises per-call overheads, fits L3)
CANDIDATE_CAPACITY = 16  # candidates kept beyond k on the first try; more only when the margin demands it
QUERY_BLOCK = 256  # queries searched together at most; larger batches are split
QUERY_BYTES_PER_VALUE = 40  # temporaries per query value (float64 copy, digits), bounds the block by memory
SAFETY = 2.0  # every rigorous error bound is doubled before use
UNIT = 2.0**-24  # float32 unit roundoff
QUERY_DIGITS = (2, 3)  # int8 digits per query value, first try and retries (8 or 7 bits of precision each)
DIGIT_BITS = (8, 7)  # digit widths tried at index build: 8 needs exact int32 GEMMs (VNNI, AMX), 7 fits AVX2's int16
INT32_SAFE_DIM = (1 << 31) // (255 * 128)  # uint8 x int8 dot products this long cannot overflow int32


class KnnResult(NamedTuple):
    """The k nearest images of each query, nearest first (ties broken by the lowest index)."""

    distances: torch.Tensor  # [B, k] Euclidean distances, float32
    indices: torch.Tensor  # [B, k] int64 indices into the store


@dataclass
class _Prepared:
    """A query batch ready for a scorer: its GEMM operand, per-channel weights and error bound E [B]."""

    operand: torch.Tensor
    weights: torch.Tensor | None
    error: torch.Tensor  # float64 [B]: |s_hat_i - s_i| <= error for every image i


@dataclass
class _DatasetStats:
    """What the error bounds need to know about the dataset, computed once when the index is built."""

    max_norm_sq: float  # max_i ||y_i||^2 in model space
    max_raw_l1: float  # max_i sum_j |w_ij| of the values a scorer multiplies (raw pixels, or y_i)
    max_raw_l2: float  # max_i ||w_i||_2
    max_centred_l2: float  # uint8: min over c in {0, 128} of max_i ||u_i - c||_2
    decode_error: float  # uint8: max_u |decode(u) - (u / 127.5 - 1)|, what the affine model of decoding misses
    norm_error: float  # max_i |norms_i - ||y_i||^2| of the precomputed norms


class _IntegerScorer:
    """s_hat for uint8 stores: x.u_i exact in int32 from a uint8 x int8 GEMM (oneDNN: AMX/VNNI, or AVX2).

    x = s X + e with s a power of two and |e| <= s/2; X = sum_j d_j 2^(bj) with D balanced b-bit digits (D = 2 on
    the first try, 3 on retries, whose smaller margin needs fewer candidates), so x.u_i = s sum_j 2^(bj) d_j.u_i
    + e.u_i. b = 8 where the GEMM accumulates in int32 (VNNI, AMX); b = 7 on AVX2, whose int16 sums of two
    products saturate beyond 2 x 255 x 64 (|d| <= 64 keeps them exact). The raw uint8 chunk is the GEMM's
    activation (no conversion pass); the digits are its weights, prepacked once per query batch; per-channel
    output scales apply -2 s 2^(bj) / 127.5 (y = u / 127.5 - 1), so the D outputs of a query sum to its score.
    """

    bytes_per_value = 0  # the uint8 chunk is read in place
    bytes_per_score = max(QUERY_DIGITS) * 4 + 4  # the float32 digit products and the score

    def __init__(self, stats: _DatasetStats, dim: int, digit_bits: int = 8):
        self.stats, self.dim, self.digit_bits = stats, dim, digit_bits

    def prepare(self, x: torch.Tensor, retry: bool = False) -> _Prepared:
        places, bits = QUERY_DIGITS[retry], self.digit_bits
        base, half = 1 << bits, 1 << (bits - 1)
        limit = (half - 1) * base ** (places - 1)  # |X| that balanced digits in [-half, half) can hold
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=1)
        scale = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-300) / limit)))
        scale = torch.where(amax / scale > limit, scale * 2, scale)  # guard log2 rounding
        whole = (x / scale[:, None]).round_()  # exact division: scale is a power of two
        rounding = torch.linalg.vector_norm(torch.addcmul(x, whole, scale[:, None], value=-1), dim=1)  # ||e||_2
        rest = whole.to(torch.int32)
        del whole
        digits = torch.empty((places, *x.shape), dtype=torch.int8, device=x.device)
        digit_norms = torch.empty((places, x.shape[0]), dtype=torch.float64, device=x.device)
        for place in range(places - 1, -1, -1):  # balanced base-2^b digits, least significant first, exact
            low = (rest + half).bitwise_and_(base - 1).sub_(half) if place else rest
            digits[place] = low
            digit_norms[place] = torch.linalg.vector_norm(low.to(torch.float32), dim=1, dtype=torch.float64)
            rest.sub_(low).bitwise_right_shift_(bits)
        place_values = float(base) ** torch.arange(places - 1, -1, -1, dtype=torch.float64, device=x.device)
        weights = -2 / 127.5 * place_values[:, None] * scale[None, :]  # [places, B]
        stats = self.stats
        quantisation = 2 / 127.5 * torch.minimum(scale / 2 * stats.max_raw_l1, rounding * stats.max_centred_l2)
        digit_dots = (digit_norms * stats.max_raw_l2 * (1 + 1e-6)).clamp_max(half * stats.max_raw_l1)  # >= |d.u_i|
        terms = stats.max_norm_sq + (weights.abs() * digit_dots).sum(0)  # >= each summand of the score
        float32_sums = (4 + 2 * places) * UNIT * terms  # int32 -> float32, scaling, the additions, the norm
        error = SAFETY * (quantisation + float32_sums + _common_error(x, stats, self.dim))
        packed = torch.ops.onednn.qlinear_prepack(digits.reshape(-1, x.shape[1]), None)
        return _Prepared(packed, weights.reshape(-1).to(torch.float32), error)

    def scores(self, raw: torch.Tensor, norms: torch.Tensor, prepared: _Prepared) -> torch.Tensor:
        products = _u8s8_gemm(raw, prepared.operand, prepared.weights)
        batch = prepared.error.shape[0]
        scores = torch.add(products[:, :batch], norms[:, None])
        for start in range(batch, products.shape[1], batch):
            scores.add_(products[:, start : start + batch])
        return scores


def _u8s8_gemm(activation: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [M, C] = (uint8 [M, K] x int8 [C, K]^T) * scales[C], accumulated exactly in int32 by oneDNN."""
    zero_points = torch.zeros(scales.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        activation, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _u8s8_gemm_is_exact(dim: int, digit_bits: int = 8) -> bool:
    """True if this build and CPU run the uint8 x int8 GEMM exactly for digits in [-2^(b-1), 2^(b-1)) (CPUs
    without VNNI saturate int16 sums of two products beyond 2 x 255 x 64), checked on extreme operands of the
    store's length."""
    low, high = -(1 << (digit_bits - 1)), (1 << (digit_bits - 1)) - 1
    try:
        ramp = torch.arange(dim)
        pattern = ramp % 2 == 0
        data = torch.stack([torch.full((dim,), 255), torch.where(pattern, 255, 0), ramp * 37 % 256])
        digits = torch.stack([torch.full((dim,), low), torch.full((dim,), high), torch.where(pattern, low, high)])
        data, digits = data.to(torch.uint8), digits.to(torch.int8)
        out = _u8s8_gemm(data, torch.ops.onednn.qlinear_prepack(digits, None), torch.ones(3))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    reference = data.to(torch.float64) @ digits.to(torch.float64).t()
    return bool(((out.to(torch.float64) - reference).abs() <= 4 * UNIT * reference.abs()).all())


def exact_digit_bits(dim: int) -> int | None:
    """The widest query digit (8 or 7 bits) this CPU's uint8 x int8 GEMM handles exactly; None if neither."""
    return next((bits for bits in DIGIT_BITS if _u8s8_gemm_is_exact(dim, bits)), None)


class _FloatScorer:
    """s_hat from a float32 GEMM: s_hat_i = ||y_i||^2 - c x.w_i (w = raw pixels, c = 2/127.5; or w = y, c = 2).

    A float32 dot product of length n errs by at most gamma_n sum_j |x_j w_j| <= gamma_n ||x|| ||w_i||.
    """

    bytes_per_value = 4  # the float32 copy of a chunk
    bytes_per_score = 4

    def __init__(self, stats: _DatasetStats, dim: int, uint8: bool, device: torch.device):
        self.stats, self.dim = stats, dim
        self.coefficient = 2.0 / 127.5 if uint8 else 2.0
        self.device = device

    def prepare(self, x: torch.Tensor, retry: bool = False) -> _Prepared:
        stats, n = self.stats, self.dim
        input_rounding = 2.0**-8 if reduced_precision_matmul(self.device) else 0.0  # the setting of this search
        gamma = n * UNIT / (1 - n * UNIT)
        cross = self.coefficient * torch.linalg.vector_norm(x, dim=1) * stats.max_raw_l2  # >= c sum_j |x_j w_ij|
        gemm = (gamma + 2 * UNIT + 2 * input_rounding) * cross  # + rounding x and w to float32
        output = 4 * UNIT * (stats.max_norm_sq + cross)
        error = SAFETY * (gemm + output + _common_error(x, stats, n))
        return _Prepared(x.to(torch.float32).t(), None, error)

    def scores(self, raw: torch.Tensor, norms: torch.Tensor, prepared: _Prepared) -> torch.Tensor:
        return torch.addmm(norms[:, None], raw.to(torch.float32), prepared.operand, alpha=-self.coefficient)


def _common_error(x: torch.Tensor, stats: _DatasetStats, dim: int) -> torch.Tensor:
    """Error terms of every scorer: uint8 decoding off the affine model, 2 |x.(y_i - u_i / 127.5 + 1)|; the
    precomputed norms; and the rounding of the float64 reference distance itself."""
    decode = 2 * stats.decode_error * torch.linalg.vector_norm(x, ord=1, dim=1)
    reference = dim * 2.0**-52 * 4 * (torch.linalg.vector_norm(x, dim=1).square() + stats.max_norm_sq)
    return decode + stats.norm_error + reference


class KnnIndex:
    """Exact k-NN over a store: built once (norms, error statistics, placement), then searched many times.

    placement (CUDA only; on the CPU the store is always read in place, memory-mapped or not):
    "device" copies the compact store to the GPU, "pinned" keeps it in page-locked host memory and streams
    chunks, "mapped" streams chunks straight from the store; "auto" = device if it fits in half the free
    GPU memory, else pinned. scorer: "auto" | "integer" (uint8 stores on the CPU) | "float".
    """

    def __init__(
        self,
        store: DatasetStore,
        device: torch.device | str = "cpu",
        chunk_size: int | None = None,
        placement: str = "auto",
        scorer: str = "auto",
        memory_budget: int = MEMORY_BUDGET,
    ):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of images, got {chunk_size}")
        self.store = store
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.images = self._place(store.images.reshape(store.num_images, store.dim), placement)
        norms, stats = self._dataset_statistics()
        self.norms32 = norms.to(torch.float32)
        self.scorer = self._make_scorer(scorer, stats)

    @property
    def num_images(self) -> int:
        return self.store.num_images

    def _place(self, flat: torch.Tensor, placement: str) -> torch.Tensor:
        if placement not in ("auto", "device", "pinned", "mapped"):
            raise ValueError(f"placement must be auto, device, pinned or mapped, got {placement!r}")
        if self.device.type == "cpu" or placement == "mapped":
            return flat
        if placement == "auto":
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
            placement = "device" if flat.numel() * flat.element_size() < free // 2 else "pinned"
        return flat.to(self.device) if placement == "device" else flat.pin_memory()

    def _dataset_statistics(self) -> tuple[torch.Tensor, _DatasetStats]:
        """||y_i||^2 (float64) and the bound statistics in one pass. uint8 stores take the norms from the exact
        integer sums S1 = sum u, S2 = sum u^2 through y = u / 127.5 - 1, whose miss of the decoded float32
        values (at most `decode_error` per pixel) goes into `norm_error`."""
        n, uint8 = self.store.dim, self.store.is_uint8
        norms, raw_l1, raw_l2, centred_l2 = [], 0.0, 0.0, 0.0
        step = max(1, (8 << 20) // (4 * n))
        for start in range(0, self.num_images, step):
            raw = self._chunk(start, start + step)
            if uint8:
                wide = raw.to(torch.float32)  # exact, and so are the squares (< 2^16)
                l1, l2_sq = _exact_row_sums(wide), _exact_row_sums(wide.square_())
                norms.append(l2_sq / 127.5**2 - 2 * l1 / 127.5 + n)
                centred_l2 = max(centred_l2, float((l2_sq - 256 * l1 + 128**2 * n).max().sqrt()))  # ||u - 128||
            else:
                wide = raw.to(torch.float64)
                l1, l2_sq = wide.abs().sum(1), wide.square().sum(1)
                norms.append(l2_sq)
            raw_l1, raw_l2 = max(raw_l1, float(l1.max())), max(raw_l2, float(l2_sq.max().sqrt()))
        norms = torch.cat(norms)
        max_norm_sq, decode_error = float(norms.max()), _decode_error(self.store)
        norm_error = n * (decode_error * (2 + decode_error) + 2.0**-45 * (1 + max_norm_sq))
        centred_l2 = min(raw_l2, centred_l2 * (1 + 1e-9)) if uint8 else raw_l2
        return norms, _DatasetStats(max_norm_sq, raw_l1, raw_l2, centred_l2, decode_error, norm_error)

    def _make_scorer(self, scorer: str, stats: _DatasetStats) -> _IntegerScorer | _FloatScorer:
        if scorer not in ("auto", "integer", "float"):
            raise ValueError(f"scorer must be auto, integer or float, got {scorer!r}")
        bits = None
        if self.store.is_uint8 and self.device.type == "cpu" and self.store.dim < INT32_SAFE_DIM:
            bits = exact_digit_bits(self.store.dim)
        if scorer == "integer" and bits is None:
            raise ValueError("the integer scorer needs a uint8 store on the CPU, < 65793 values per image and oneDNN")
        if scorer == "integer" or (scorer == "auto" and bits is not None):
            return _IntegerScorer(stats, self.store.dim, bits)
        return _FloatScorer(stats, self.store.dim, self.store.is_uint8, self.device)

    def _chunk(self, start: int, stop: int) -> torch.Tensor:
        return self.images[start:stop].to(self.device, non_blocking=True)

    def auto_chunk_size(self, batch: int) -> int:
        """Images per chunk (a multiple of 64): the chunk and its scores within half the memory budget and, on
        the CPU, within CPU_CHUNK_BYTES (measured best on the benchmark shapes, docs/benchmarks-knn.md)."""
        scorer = self.scorer
        per_value = scorer.bytes_per_value + self.images.element_size()
        per_image = self.store.dim * per_value + batch * scorer.bytes_per_score
        budget = self.memory_budget // 2
        if self.device.type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(self.device)[0] // 4)
        else:
            budget = min(budget, CPU_CHUNK_BYTES, _available_host_memory() // 8)
        chunk = budget // per_image
        return max(1, min(self.num_images, chunk - chunk % 64 if chunk >= 64 else chunk))

    @torch.no_grad()
    @full_precision()
    def search(self, queries: torch.Tensor, k: int = 1, chunk_size: int | None = None) -> KnnResult:
        """Exact k-NN of `queries` [B, ...] (flattened to [B, n]) in model space; see the module docstring. Float32
        products run in full precision whatever the global TF32 setting (devices.full_precision)."""
        flat = queries.reshape(queries.shape[0], -1)
        if flat.shape[1] != self.store.dim:
            raise ValueError(f"queries have {flat.shape[1]} values each, the store's images {self.store.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of images, got {chunk_size}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("queries contain NaN or infinite values")
        k = min(k, self.num_images)
        distances = torch.empty((flat.shape[0], k), dtype=torch.float64, device=self.device)
        indices = torch.empty((flat.shape[0], k), dtype=torch.int64, device=self.device)
        rows = max(1, min(QUERY_BLOCK, (self.memory_budget // 2) // (QUERY_BYTES_PER_VALUE * self.store.dim)))
        for start in range(0, flat.shape[0], rows):
            block = slice(start, start + rows)
            x = flat[block].to(self.device, torch.float64)
            distances[block], indices[block] = self._search_block(x, k, chunk_size)
        return KnnResult(distances.sqrt().to(torch.float32).to(queries.device), indices.to(queries.device))

    def _search_block(self, x: torch.Tensor, k: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices [B, k]; queries with more near-ties than the capacity are retried."""
        distances = x.new_empty((x.shape[0], k))
        indices = torch.empty((x.shape[0], k), dtype=torch.int64, device=x.device)
        pending = torch.arange(x.shape[0], device=x.device)
        capacity, retry = min(self.num_images, k + CANDIDATE_CAPACITY), False
        while pending.numel():
            rows = x[pending]
            chunk = chunk_size or self.chunk_size or self.auto_chunk_size(len(rows))
            scores, candidates, threshold, dropped = self._filter(self.scorer.prepare(rows, retry), k, capacity, chunk)
            complete = dropped > threshold
            within = (scores.to(torch.float64) <= threshold[:, None]) & complete[:, None]
            best_d, best_i = _lowest_k(self._rescore(rows, candidates, within), candidates, k)
            done = pending[complete]
            distances[done], indices[done] = best_d[complete], best_i[complete]
            pending = pending[~complete]
            capacity, retry = min(self.num_images, 4 * capacity), True
        return distances, indices

    def _filter(
        self, prepared: _Prepared, k: int, capacity: int, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stream the dataset: candidate scores and indices [B, capacity] (unordered, +inf/-1 padded), the final
        threshold t_k + 2E [B], and a lower bound [B] on the score of every image that was not kept."""
        batch = prepared.error.shape[0]
        margin = 2 * prepared.error
        best_s = torch.full((batch, capacity), math.inf, dtype=torch.float32, device=self.device)
        best_i = torch.full((batch, capacity), -1, dtype=torch.int64, device=self.device)
        threshold = torch.full((batch,), math.inf, dtype=torch.float64, device=self.device)
        dropped = torch.full((batch,), math.inf, dtype=torch.float64, device=self.device)
        for start in range(0, self.num_images, chunk):
            stop = min(start + chunk, self.num_images)
            scores = self.scorer.scores(self._chunk(start, stop), self.norms32[start:stop], prepared)  # [c, B]
            active = (_column_min(scores).to(torch.float64) <= threshold).nonzero().squeeze(1)
            if active.numel() == 0:
                continue
            rows = scores.t().contiguous() if active.numel() == batch else scores.t()[active]
            take = min(capacity, stop - start)
            top_s, top_i = rows.topk(take, dim=1, largest=False, sorted=False)
            if take < stop - start:  # the rest of this chunk scores at least the largest taken
                dropped[active] = torch.minimum(dropped[active], top_s.amax(dim=1).to(torch.float64))
            merged_s, order = torch.cat([best_s[active], top_s], dim=1).sort(dim=1)
            merged_i = torch.cat([best_i[active], top_i.add_(start)], dim=1).gather(1, order)
            dropped[active] = torch.minimum(dropped[active], merged_s[:, capacity].to(torch.float64))
            best_s[active], best_i[active] = merged_s[:, :capacity], merged_i[:, :capacity]
            threshold[active] = merged_s[:, k - 1].to(torch.float64) + margin[active]
        return best_s, best_i, threshold, dropped

    def _rescore(self, x: torch.Tensor, candidates: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The reference distance (float64 sum of squared differences) of the selected pairs; +inf elsewhere."""
        exact = torch.full(candidates.shape, math.inf, dtype=torch.float64, device=x.device)
        rows, cols = selected.nonzero(as_tuple=True)
        group = max(1, (self.memory_budget // 8) // (self.store.dim * 32))  # uint8, float32, 3 x float64
        for start in range(0, rows.numel(), group):
            r, c = rows[start : start + group], cols[start : start + group]
            picked = self.images[candidates[r, c].to(self.images.device)].to(x.device)
            exact[r, c] = (x[r] - self.store.decode(picked, torch.float64)).square().sum(1)
        return exact


def _column_min(scores: torch.Tensor) -> torch.Tensor:
    """Per-query minimum of chunk-major scores [c, B], folded so the reduction runs over >= 64 lanes."""
    chunk, batch = scores.shape
    fold = 1 << max(0, (64 // batch).bit_length() - 1)
    if fold == 1 or chunk % fold:
        return scores.amin(dim=0)
    return scores.reshape(chunk // fold, fold * batch).amin(dim=0).reshape(fold, batch).amin(dim=0)


def _exact_row_sums(values: torch.Tensor) -> torch.Tensor:
    """float64 row sums of float32 [c, n] holding integers in [0, 2^16): blocks of 256 sum below 2^24, where
    float32 adds integers exactly in any order, and the block sums are added in float64."""
    whole = values.shape[1] // 256 * 256
    blocks = values[:, :whole].reshape(values.shape[0], -1, 256).sum(2).to(torch.float64).sum(1)
    return blocks + values[:, whole:].sum(1).to(torch.float64)


def _lowest_k(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances per row, ties broken by the lowest index."""
    by_index, order = indices.sort(dim=1)
    by_distance, order2 = distances.gather(1, order).sort(dim=1, stable=True)
    return by_distance[:, :k], by_index.gather(1, order2)[:, :k]


def _decode_error(store: DatasetStore) -> float:
    """uint8: max |decode(u) - (u / 127.5 - 1)| over the 256 byte values; 0 for float stores."""
    if not store.is_uint8:
        return 0.0
    values = torch.arange(256, dtype=torch.uint8)
    return float((store.decode(values, torch.float64) - (values.to(torch.float64) / 127.5 - 1)).abs().max())


def _available_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 34


_INDEXES: OrderedDict[tuple, KnnIndex] = OrderedDict()
_INDEX_CACHE_SIZE = 4


def knn_search(
    queries: torch.Tensor, store: DatasetStore, k: int = 1, chunk_size: int | None = None
) -> KnnResult:
    """Exact k-NN of `queries` [B, ...] among the store's images; the index is built once per store and device."""
    key = (store.fingerprint, store.num_images, store.dim, store.images.dtype, str(queries.device))
    index = _INDEXES.pop(key, None) or KnnIndex(store, device=queries.device)
    _INDEXES[key] = index
    while len(_INDEXES) > _INDEX_CACHE_SIZE:
        _INDEXES.popitem(last=False)
    return index.search(queries, k=k, chunk_size=chunk_size)

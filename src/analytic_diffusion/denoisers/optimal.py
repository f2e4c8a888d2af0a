"""The optimal (empirical Bayes) denoiser, DESIGN.md §3: the posterior mean of x_0 when the data are the dataset.

    w_i = softmax_i(-||x_t - sqrt(ab_t) y_i||^2 / (2 (1 - ab_t) tau)),    x0_hat = sum_i w_i y_i

With q = x_t / sqrt(ab_t) the logits are -c ||q - y_i||^2, c = ab_t / (2 (1 - ab_t) tau). `exact` takes the softmax
over the whole store: on uint8 stores on the CPU with the integer kernel (search/integer_softmax.py: exact integer
products, a rigorous error bound, float64 rescoring only where it matters), elsewhere (float stores, GPUs, CPUs
without an exact uint8 x int8 GEMM) streamed with float32 products and float64 rescoring; `topk` restricts it to the k nearest neighbours of q (the reference framework's
approximation, which can lose most of the mass at early timesteps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.store import DatasetStore
from ..errors import StudioError, closest
from ..search import knn_search
from ..search.integer_softmax import IntegerSoftmax, SharedCeiling, integer_path_available
from ..search.softmax import StreamingSoftmax
from .base import Denoised, Denoiser, NoiseLevel, check_chunk_size, check_temperature, register_denoiser

MODES = ("exact", "topk")
RESCORED_PER_CHUNK = 16  # nearest candidates of each chunk whose q.y is recomputed in float64
FLOAT32_LOGIT_NOISE = 1e-4  # above this typical float32 logit error (c u ||q|| ||y||), every product is float64
INTEGER_MAX_QUERIES = 32  # larger batches (scfdm: num_noise x B) take the integer kernel only where the weight is
# concentrated (IntegerSoftmax.probe): where it is spread, float32 products beat its digit columns at many
# queries on an AVX2 CPU (docs/benchmarks-optimal.md)
MAX_LOGIT_SCALE = 1e30  # c beyond this is already the nearest-neighbour limit; the cap keeps c * distance finite
WEIGHT_FLOOR = 2.0**-100  # softmax weights (relative to the largest) dropped from weighted sums: they change
# nothing, and as float32 subnormals they would slow the matrix product down a hundredfold on CPUs
CHUNK_BYTES = 256 << 20  # most working memory of one streamed chunk when chunk_size is None
CHUNK_ROWS = 4096  # default images per chunk: a decoded chunk stays in cache (docs/benchmarks-optimal.md), and
# chunks grow to 4 x queries x RESCORED_PER_CHUNK so that rescoring stays a small part of each chunk


@dataclass
class OptimalParams:
    temperature: float = 1.0  # tau, divides the logits; -> 0 gives the nearest neighbour of x_t / sqrt(ab_t)
    mode: str = "exact"  # exact: softmax over the whole dataset; topk: over the num_neighbors nearest images only
    num_neighbors: int = 200  # k of the topk mode (the reference framework's default)
    chunk_size: Optional[int] = None  # dataset images per streamed chunk; None = chosen from memory

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            hint = closest(self.mode, MODES)
            raise StudioError(f"model.params.mode must be one of {', '.join(MODES)}, not '{self.mode}'{hint}")
        check_temperature(self.temperature)
        if self.num_neighbors < 1:
            raise StudioError(f"model.params.num_neighbors must be at least 1, got {self.num_neighbors}")
        check_chunk_size(self.chunk_size)


def logit_scale(level: NoiseLevel, temperature: float) -> float:
    """c = ab_t / (2 (1 - ab_t) tau), so that logit_i = -c ||x_t / sqrt(ab_t) - y_i||^2; capped at MAX_LOGIT_SCALE."""
    denominator = 2.0 * level.noise_variance * temperature
    if denominator <= 0:
        return MAX_LOGIT_SCALE
    return min(level.alpha_bar / denominator, MAX_LOGIT_SCALE)


def accurate_dtype(device: torch.device) -> torch.dtype:
    """float64 for logits and rescored distances; MPS has no float64, so float32 there (less exact at late steps)."""
    return torch.float32 if device.type == "mps" else torch.float64


@register_denoiser("optimal")
class OptimalDenoiser(Denoiser):
    """Posterior mean of x_0 under the empirical distribution, with per-sample concentration diagnostics."""

    Params = OptimalParams

    def fit(self, store: DatasetStore) -> OptimalDenoiser:
        """Keep the compact images on the working device and their squared norms ||y_i||^2 in float64; for `exact`
        on a uint8 store on the CPU, the integer kernel (search/integer_softmax.py), which also keeps a transposed
        uint8 copy of the store (N n bytes)."""
        self.store = store
        self.images = store.images.to(self.device)
        self.integer = None
        if self.params.mode == "exact" and integer_path_available(store, self.device):
            self.integer = IntegerSoftmax(store, self.params.chunk_size)
            self.squared_norms = self.integer.norms
        else:
            dtype, chunk = accurate_dtype(self.device), self._chunk_rows(1)
            self.squared_norms = torch.cat([
                self._decoded(start, start + chunk, self.device, dtype).square().sum(-1)
                for start in range(0, store.num_images, chunk)
            ])
        self.max_norm = self.squared_norms.max().sqrt().item()
        return self

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return self.posterior_mean(x_t, level)

    def posterior_mean(self, x_t: torch.Tensor, level: NoiseLevel, shared: SharedCeiling | None = None) -> Denoised:
        """x0_hat = sum_i w_i y_i for a batch x_t [B, C, H, W], and per-sample diagnostics of the weights w.
        `shared`: the store is one shard of a distributed run; the integer kernel skips the images that weigh
        nothing next to the whole dataset's nearest (IntegerSoftmax). Its calls are collectives, so for larger
        batches the shards agree on the probe's choice of path first."""
        if not hasattr(self, "store"):
            raise RuntimeError("call fit(store) before denoising")
        query = x_t.reshape(x_t.shape[0], -1).to(accurate_dtype(x_t.device)) / level.signal_scale
        if query.shape[1] != self.store.dim:
            raise ValueError(f"x_t has {query.shape[1]} values per sample, the dataset's images {self.store.dim}")
        scale = logit_scale(level, self.params.temperature)
        probe = None
        if self.integer is not None and query.shape[0] > INTEGER_MAX_QUERIES:
            probe = self.integer.probe(query, scale)
            if shared is not None:  # the kernel's exchange is a collective: every shard takes the same path
                probe.concentrated = shared.agree(probe.concentrated)
        if self.integer is not None and (probe is None or probe.concentrated):
            result = self.integer(query, scale, None if probe is None else probe.first_places, shared)
            diagnostics = {
                "effective_count": result.effective_count.to(torch.float32),
                "top_weight": result.top_weight.to(torch.float32),
                "top_index": result.top_index,
            }
            return Denoised(result.mean.to(x_t.dtype).reshape(x_t.shape), diagnostics)
        stream = self._stream_exact if self.params.mode == "exact" else self._stream_topk
        softmax, top_index = stream(query, scale)
        x0_hat = softmax.mean().to(x_t.dtype).reshape(x_t.shape)
        diagnostics = {
            "effective_count": softmax.effective_count().to(torch.float32),
            "top_weight": softmax.top_weight().to(torch.float32),
            "top_index": top_index,
        }
        return Denoised(x0_hat, diagnostics)

    def _stream_exact(self, query: torch.Tensor, scale: float) -> tuple[StreamingSoftmax, torch.Tensor]:
        """Softmax over the whole store, ||q - y||^2 = ||q||^2 - 2 q.y + ||y||^2 (where the integer kernel is not used).

        A float32 product errs by about u ||q|| ||y|| (u = 2^-24), which c (5,000 at t = 0) turns into logit
        errors of order one. While that error stays below FLOAT32_LOGIT_NOISE, q.y comes from a float32 product
        and only the RESCORED_PER_CHUNK nearest candidates of each chunk (those that carry the weight when c is
        large) are recomputed in float64; beyond it (the last steps) every product is float64, so that many near
        ties, such as near-duplicate images, are weighed right too.
        """
        softmax = StreamingSoftmax(track_concentration=True)
        top_index = torch.zeros(query.shape[0], dtype=torch.int64, device=query.device)
        query_norms = query.square().sum(-1, keepdim=True)
        float32_noise = scale * torch.finfo(torch.float32).eps * query_norms.max().sqrt().item() * self.max_norm
        product_dtype = query.dtype if float32_noise > FLOAT32_LOGIT_NOISE else torch.float32
        query_low = query.to(product_dtype)
        chunk = self._chunk_rows(query.shape[0], query_low.element_size())
        for start in range(0, self.store.num_images, chunk):
            rows = self._decoded(start, start + chunk, query.device, product_dtype)
            row_norms = self.squared_norms[start : start + chunk].to(query.device)
            distances = query_norms + row_norms - 2 * (query_low @ rows.T).to(query.dtype)
            if product_dtype != query.dtype:
                nearest = distances.topk(min(RESCORED_PER_CHUNK, rows.shape[0]), dim=1, largest=False).indices
                rescored = _squared_distances(query, query_norms, rows[nearest], row_norms[nearest])
                distances = distances.scatter(1, nearest, rescored)
            top_index = _update(softmax, -scale * distances, lambda p: _weighted_sum(p, rows),
                                top_index, lambda arg: arg + start)
        return softmax, top_index

    def _stream_topk(self, query: torch.Tensor, scale: float) -> tuple[StreamingSoftmax, torch.Tensor]:
        """Softmax over the num_neighbors nearest images of q, every distance computed in float64."""
        k = min(self.params.num_neighbors, self.store.num_images)
        queries = query.to(torch.float32).reshape(-1, *self.store.sample_shape)
        neighbours = knn_search(queries, self.store, k, self.params.chunk_size).indices.to(query.device)
        softmax = StreamingSoftmax(track_concentration=True)
        top_index = torch.zeros(query.shape[0], dtype=torch.int64, device=query.device)
        query_norms = query.square().sum(-1, keepdim=True)
        per_chunk = max(1, CHUNK_BYTES // (query.element_size() * query.shape[0] * self.store.dim))
        for start in range(0, k, per_chunk):
            indices = neighbours[:, start : start + per_chunk]
            raw = self.images[indices.to(self.images.device)].to(query.device)
            rows = self.store.decode(raw, query.dtype).reshape(*indices.shape, -1)
            distances = _squared_distances(query, query_norms, rows, self.squared_norms[indices].to(query.device))
            top_index = _update(softmax, -scale * distances, lambda p: _weighted_sum(p[:, None, :], rows)[:, 0],
                                top_index, lambda arg: indices.gather(1, arg[:, None])[:, 0])
        return softmax, top_index

    def _chunk_rows(self, num_queries: int, bytes_per_value: int = 4) -> int:
        """Dataset images per chunk: chunk_size, else CHUNK_ROWS or more for many queries, within CHUNK_BYTES."""
        if self.params.chunk_size is not None:
            return self.params.chunk_size
        wanted = max(CHUNK_ROWS, 4 * num_queries * RESCORED_PER_CHUNK)
        return max(1, min(wanted, CHUNK_BYTES // (bytes_per_value * self.store.dim + 32 * num_queries)))

    def _decoded(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Images [start, stop) as [K, n] in model space, decoded from the compact copy on the working device."""
        return self.store.decode(self.images[start:stop].to(device), dtype).flatten(1)


def _squared_distances(
    query: torch.Tensor, query_norms: torch.Tensor, rows: torch.Tensor, row_norms: torch.Tensor
) -> torch.Tensor:
    """||q_b - y_bk||^2 [B, K] in query's dtype for per-query rows [B, K, n] with norms ||y_bk||^2 [B, K]."""
    products = torch.bmm(rows.to(query.dtype), query[:, :, None])[..., 0]
    return query_norms + row_norms - 2 * products


def _weighted_sum(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weights @ rows in rows' precision (after dropping weights below WEIGHT_FLOOR), returned in weights' dtype."""
    kept = weights.masked_fill(weights < WEIGHT_FLOOR, 0).to(rows.dtype)
    return (kept @ rows).to(weights.dtype)


def _update(
    softmax: StreamingSoftmax,
    logits: torch.Tensor,
    weighted_sum: Callable[[torch.Tensor], torch.Tensor],
    top_index: torch.Tensor,
    dataset_index: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Add one chunk to the softmax; return the dataset index of the largest weight so far (earliest on ties)."""
    arg = logits.argmax(dim=1)  # (argmax + gather: Tensor.max(dim) is far slower on small CPU tensors)
    chunk_max = logits.gather(1, arg[:, None])[:, 0]
    candidate = dataset_index(arg)
    top_index = candidate if softmax.max is None else torch.where(chunk_max > softmax.max, candidate, top_index)
    softmax.update(logits, weighted_sum)
    return top_index

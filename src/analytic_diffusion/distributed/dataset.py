"""The `dataset` strategy: the store is split into K contiguous shards, rank r reads only shard r, and every search
or sum over the dataset is computed per shard and merged with collectives, so that every rank holds the same
x0_hat at every step (DESIGN.md §9, docs/distributed.md).

What is merged, and how (all_gather of the per-shard partial results, combined in rank order on every rank):
- k-NN: each shard's k nearest with their float64 squared distances (recomputed exactly as the exact kernel's
  re-scoring does); the k smallest of the K k candidates, ties to the lowest global index (shards are contiguous,
  so that is the one-process answer bit for bit);
- softmax averages (optimal, scfdm, pca_locality, and the patch softmax of local_score, els and pspc through
  patch_softmax's `merge`): running max m_r, normaliser s_r and weighted sum v_r per shard (and sum w^2);
  M = max_r m_r, s = sum_r e^(m_r - M) s_r, v = sum_r e^(m_r - M) v_r, x0_hat = v / s;
- optimal topk and nearest_dataset with backends cdist and faiss: the k-NN merge, then (topk) the softmax over the
  merged k nearest;
- unet: nothing to merge, every rank runs the network on the same x_t;
- dataset statistics (wiener, pca_locality): count n_r, mean mu_r and centred second moment M2_r per shard; the
  global mean from the counts, M2 = sum_r M2_r + n_r (mu_r - mu)(mu_r - mu)^T (Chan et al.), summed by all_reduce.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.store import DatasetStore
from ..denoisers import Denoised, Denoiser, NoiseLevel, denoiser_class
from ..denoisers.local_patch import LocalPatchDenoiser
from ..denoisers.optimal import OptimalDenoiser, logit_scale
from ..denoisers.pca_locality import PcaLocality
from ..denoisers.scfdm import SmoothedClosedFormDenoiser
from ..devices import synchronize
from ..errors import StudioError
from ..search import KnnIndex, KnnResult, build_index
from ..search.patch_softmax import PatchSoftmaxResult
from ..search.softmax import StreamingSoftmax
from ..statistics import Moments, compute_moments, save_statistics, statistics_from_moments, statistics_path
from .group import Ranks, collective

SUPPORTED = ("els", "local_score", "nearest_dataset", "optimal", "pca_locality", "pspc", "scfdm", "unet", "wiener")


def shard_of(store: DatasetStore, ranks: Ranks) -> tuple[DatasetStore, int]:
    """This rank's contiguous shard of the store (a view: a memory-mapped store reads only these images) and the
    global index of its first image."""
    part = ranks.share(store.num_images)
    if store.num_images < ranks.world_size:  # checked by every rank alike: all stop before a run directory exists
        raise StudioError(f"{store.num_images} images cannot be split over {ranks.world_size} ranks; use fewer "
                          "processes or distributed.strategy=samples")
    shard = DatasetStore(store.name, f"{store.fingerprint}-shard{ranks.rank}of{ranks.world_size}",
                         store.images[part.start : part.stop])
    return shard, part.start


def _all_gather(ranks: Ranks, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensors` (each [B, ...], same shapes on every rank), each stacked in rank order: [K, B, ...].
    One collective for all of them (packed as float64 columns: integers below 2^53 are exact), since on a busy
    host each collective costs a scheduling round trip."""
    batch = tensors[0].shape[0]
    columns = [t.reshape(batch, -1).to(torch.float64) for t in tensors]
    packed = torch.cat(columns, 1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(ranks.world_size)]
    collective(dist.all_gather, parts, packed)
    stacked = torch.stack(parts)
    out, start = [], 0
    for tensor, column in zip(tensors, columns):
        part = stacked[:, :, start : start + column.shape[1]].reshape(ranks.world_size, *tensor.shape)
        out.append(part.to(tensor.dtype))
        start += column.shape[1]
    return out


def merge_softmax(ranks: Ranks, maximum: torch.Tensor, total: torch.Tensor, numerator: torch.Tensor | None,
                  *others: torch.Tensor, base2: bool = False) -> tuple[torch.Tensor, ...]:
    """Merge per-shard streaming-softmax states (max m [*b], normaliser s [*b], weighted sum v [*b, *v] or None)
    into the state over the whole dataset, identical on every rank. Returns M, s, v (None without one), the shard
    holding M (the lowest on ties) [*b], the factors e^(m_r - M) (2^(m_r - M) for `base2` logits) [K, *b], then
    `others` gathered alongside ([K, ...]); one collective in all."""
    parts = [t for t in (maximum, total, numerator, *others) if t is not None]
    m, totals, *rest = _all_gather(ranks, *parts)
    values = rest.pop(0) if numerator is not None else None
    top = m.amax(0)
    exp = torch.exp2 if base2 else torch.exp
    factor = exp(m - top.masked_fill(top == -math.inf, 0))  # [K, *b]; shards with only -inf logits add 0
    merged_total = (factor * totals).sum(0)
    merged_numerator = None
    if values is not None:
        merged_numerator = (factor.reshape(*factor.shape, *[1] * (values.ndim - factor.ndim)) * values).sum(0)
    return (top, merged_total, merged_numerator, m.argmax(0), factor, *rest)


def merge_knn(ranks: Ranks, indices: torch.Tensor, distances: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each shard's k nearest (global indices [B, k], distances [B, k]) -> the k smallest distances of the K k
    candidates [B, k] and their indices, ties to the lowest global index (shards are contiguous and each shard's
    own ties go to its lowest index, so that is the one-process order)."""
    indices, distances = (part.permute(1, 0, 2).flatten(1) for part in _all_gather(ranks, indices, distances))
    by_index, order = indices.sort(dim=1)
    best, order2 = distances.gather(1, order).sort(dim=1, stable=True)
    return best[:, :k], by_index.gather(1, order2)[:, :k]


def pick(values: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """values [K, *b] gathered from the shards -> [*b]: each entry from the shard `shard` [*b] names."""
    return values.gather(0, shard[None])[0]


class ShardedDataset:
    """Exact k-NN search and image look-up over a store split across the ranks. Collective: every rank calls each
    method at the same point with queries of the same shape."""

    def __init__(self, store: DatasetStore, ranks: Ranks, device: torch.device, chunk_size: int | None = None):
        self.ranks, self.device, self.num_images = ranks, device, store.num_images
        self.shard, self.offset = shard_of(store, ranks)
        self.index = KnnIndex(self.shard, device=device, chunk_size=chunk_size)

    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult:
        """The k nearest images of the whole store (global indices, nearest first, ties to the lowest index);
        distances float32 as the exact kernel gives them. Results on the queries' device."""
        k = min(k, self.num_images)
        flat = queries.reshape(queries.shape[0], -1).to(self.device, torch.float64)
        local = self.index.search(flat, k).indices.to(self.device)  # [B, k'] with k' = min(k, shard size)
        picked = self.shard.images[local.cpu().reshape(-1)].to(self.device)
        rows = flat.repeat_interleave(local.shape[1], 0)
        squared = (rows - self.shard.decode(picked, torch.float64).flatten(1)).square().sum(1).reshape(local.shape)
        if local.shape[1] < k:  # a shard smaller than k: pad with candidates that never win
            pad = k - local.shape[1]
            squared = torch.cat([squared, squared.new_full((squared.shape[0], pad), math.inf)], 1)
            local = torch.cat([local, local.new_full((local.shape[0], pad), self.num_images)], 1)
        best, chosen = merge_knn(self.ranks, local + self.offset, squared, k)
        return KnnResult(best.sqrt().to(torch.float32).to(queries.device), chosen.to(queries.device))

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        """Images at global `indices` (any shape) in model space, [*indices.shape, C, H, W]: each from its shard,
        summed with the others' zeros (exact)."""
        flat = indices.reshape(-1).to(self.device)
        mine = (flat >= self.offset) & (flat < self.offset + self.shard.num_images)
        images = torch.zeros((flat.shape[0], *self.shard.sample_shape), dtype=dtype, device=self.device)
        images[mine] = self.shard.gather(flat[mine] - self.offset, self.device, dtype)
        collective(dist.all_reduce, images)
        return images.reshape(*indices.shape, *self.shard.sample_shape).to(device)


class ShardedNearest(Denoiser):
    """nearest_dataset over a sharded store: the nearest image of the whole store, bit for bit. Backend `exact`:
    the exact merge of ShardedDataset.search; `cdist` and `faiss`: the backend's index over the shard, its own
    float32 distances merged (the one-process comparison, pair by pair)."""

    def __init__(self, params, device: torch.device, dataset: ShardedDataset):
        super().__init__(params, device)
        self.dataset = dataset
        self.index = None
        if params.backend != "exact":
            self.index = build_index(dataset.shard, params.backend, device, params.chunk_size, params.faiss_index,
                                     params.faiss_nprobe)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        query = x_t / level.signal_scale if self.params.timestep_aware else x_t
        if self.index is None:
            found = self.dataset.search(query, k=1)
        else:
            local = self.index.search(query, k=1)
            distances, indices = merge_knn(self.dataset.ranks, local.indices.to(x_t.device) + self.dataset.offset,
                                           local.distances.to(x_t.device), 1)
            found = KnnResult(distances, indices)
        index = found.indices[:, 0]
        x0_hat = self.dataset.gather(index, x_t.device, x_t.dtype)
        return Denoised(x0_hat, {"nearest_index": index, "nearest_distance": found.distances[:, 0]})


class SmallestDistance:
    """The integer kernel's `shared` (search/integer_softmax.py SharedCeiling): every shard's bound on each query's
    smallest distance, the smallest taken (one all_reduce), so that a shard skips the images that weigh nothing next
    to an image of another shard; shards cut their queries as the largest shard does, and agree on the kernel's
    path for large batches (`agree`, one all_reduce)."""

    def __init__(self, ranks: Ranks, num_images: int):
        self.num_images = -(-num_images // ranks.world_size)  # the largest shard's

    def __call__(self, bound: torch.Tensor) -> torch.Tensor:
        smallest = bound.clone()
        collective(dist.all_reduce, smallest, op=dist.ReduceOp.MIN)
        return smallest

    def agree(self, flag: bool) -> bool:
        every = torch.tensor([int(flag)])
        collective(dist.all_reduce, every, op=dist.ReduceOp.MIN)
        return bool(every.item())


class ShardedOptimal(Denoiser):
    """optimal over a sharded store. `exact`: each shard's posterior mean, top weight and effective count (the
    kernel's public results) give its softmax state, whose max logit is -c ||q - y_top||^2 recomputed in float64;
    the states are merged (merge_softmax). `topk`: the k nearest images of q over all shards (merge_knn), then the
    softmax over them in float64."""

    def __init__(self, params, device: torch.device, dataset: ShardedDataset):
        super().__init__(params, device)
        self.dataset = dataset
        self.shard = OptimalDenoiser(params, device).fit(dataset.shard) if params.mode == "exact" else None
        self.ceiling = SmallestDistance(dataset.ranks, dataset.num_images)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return self.posterior_mean(x_t, level)

    def posterior_mean(self, x_t: torch.Tensor, level: NoiseLevel) -> Denoised:
        """x0_hat and the diagnostics of OptimalDenoiser.posterior_mean, over the whole store."""
        if self.shard is None:
            return self._topk(x_t, level)
        part = self.shard.posterior_mean(x_t, level, self.ceiling)
        shard = self.dataset.shard
        top = part.diagnostics["top_index"].to(self.device)
        query = x_t.reshape(x_t.shape[0], -1).to(self.device, torch.float64) / level.signal_scale
        nearest = shard.decode(shard.images[top.cpu()].to(self.device), torch.float64).flatten(1)
        maximum = -logit_scale(level, self.params.temperature) * (query - nearest).square().sum(1)
        total = 1 / part.diagnostics["top_weight"].to(self.device, torch.float64)  # the top weight is e^0 / s
        squares = total.square() / part.diagnostics["effective_count"].to(self.device, torch.float64)
        numerator = part.x0_hat.reshape(x_t.shape[0], -1).to(self.device, torch.float64) * total[:, None]
        _, total, numerator, shard, factor, squares, tops = merge_softmax(
            self.dataset.ranks, maximum, total, numerator, squares, top + self.dataset.offset)
        squares = (factor.square() * squares).sum(0)
        top_index = pick(tops, shard)  # the first shard with the largest logit: the lowest index
        diagnostics = {
            "effective_count": (total.square() / squares).to(torch.float32).to(x_t.device),
            "top_weight": (1 / total).to(torch.float32).to(x_t.device),
            "top_index": top_index.to(x_t.device),
        }
        return Denoised((numerator / total[:, None]).to(x_t.dtype).reshape(x_t.shape).to(x_t.device), diagnostics)

    def _topk(self, x_t: torch.Tensor, level: NoiseLevel) -> Denoised:
        """Softmax over the num_neighbors nearest images of q = x_t / sqrt(ab_t) (found as the one-process kernel
        finds them: exact search of q in float32), every distance in float64."""
        batch = x_t.shape[0]
        query = x_t.reshape(batch, -1).to(self.device, torch.float64) / level.signal_scale
        k = min(self.params.num_neighbors, self.dataset.num_images)
        neighbours = self.dataset.search(query.to(torch.float32).reshape(x_t.shape), k).indices.to(self.device)
        rows = self.dataset.gather(neighbours, self.device, torch.float64).reshape(batch, k, -1)
        logits = -logit_scale(level, self.params.temperature) * (query[:, None] - rows).square().sum(-1)
        softmax = StreamingSoftmax(track_concentration=True)
        softmax.update(logits, lambda p: torch.bmm(p[:, None], rows)[:, 0])
        diagnostics = {
            "effective_count": softmax.effective_count().to(torch.float32).to(x_t.device),
            "top_weight": softmax.top_weight().to(torch.float32).to(x_t.device),
            "top_index": neighbours.gather(1, logits.argmax(1, keepdim=True))[:, 0].to(x_t.device),
        }
        return Denoised(softmax.mean().to(x_t.dtype).reshape(x_t.shape).to(x_t.device), diagnostics)


class ShardedScfdm(ShardedOptimal):
    """scfdm over a sharded store: its M perturbed queries through the sharded posterior mean."""

    denoise = SmoothedClosedFormDenoiser.denoise


class PatchMerge:
    """patch_softmax's `merge` for a store split across the ranks: every (sample, query location)'s softmax state
    over this shard (max, normaliser, sum of squared weights, weighted sum of the centre values) merged with the
    other shards' (merge_softmax), the best window taken from the shard with the largest logit (the lowest on ties:
    the lowest global image index), and the shards' folds of window values summed."""

    def __init__(self, dataset: ShardedDataset):
        self.dataset = dataset

    def state(self, part: PatchSoftmaxResult) -> PatchSoftmaxResult:
        wide = torch.float64
        total = part.total.to(wide)
        numerator = None if part.mean is None else part.mean.to(wide) * total[..., None]
        tops = [] if part.top_image is None else [part.top_image + self.dataset.offset, part.top_position]
        top, total, numerator, shard, factor, squares, *tops = merge_softmax(
            self.dataset.ranks, part.max.to(wide), total, numerator, part.squares.to(wide), *tops, base2=True)
        squares = (factor.square() * squares).sum(0)
        mean = None if numerator is None else (numerator / total[..., None]).to(part.dtype)
        top_image, top_position = (pick(t, shard) for t in tops) if tops else (None, None)
        return replace(part, mean=mean, effective_count=(total.square() / squares).to(part.dtype),
                       top_image=top_image, top_position=top_position, max=top.to(part.dtype),
                       total=total.to(part.dtype), squares=squares.to(part.dtype))

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The training images at global `indices` [M], [M, C, H, W] model space on the CPU (a collective)."""
        return self.dataset.gather(indices)

    def sum(self, folded: torch.Tensor) -> torch.Tensor:
        """The shards' folds [B, ...] added in rank order (the same bits on every rank)."""
        return _all_gather(self.dataset.ranks, folded)[0].sum(0)


class ShardedPcaLocality(PcaLocality):
    """pca_locality over a sharded store: masks from the merged statistics, the per-pixel softmax over the shard,
    its states merged (merge_softmax)."""

    def use_shard(self, dataset: ShardedDataset) -> ShardedPcaLocality:
        self.dataset, self.store = dataset, dataset.shard
        return self

    def _softmax_average(self, x_active, plan, level) -> torch.Tensor:
        state = self._softmax_state(x_active, plan, level)
        _, total, numerator, *_ = merge_softmax(self.dataset.ranks, state.max, state.total, state.numerator)
        return numerator / total


def share_statistics(store: DatasetStore, dataset: ShardedDataset, cache_dir: Path, device: torch.device) -> None:
    """The store's statistics from the shards' moments, written to every rank's statistics cache (where the
    method's fit reads them), unless rank 0 finds them cached already. Rank 0's eigendecomposition is the one
    every rank uses, so that all hold the same model."""
    ranks, path = dataset.ranks, statistics_path(cache_dir, store)
    cached = [path.is_file()]
    collective(dist.broadcast_object_list, cached, src=0)
    if cached[0] and path.is_file():
        return
    local = compute_moments(dataset.shard, device)
    counts, means = _all_gather(ranks, torch.tensor([[float(local.count)]], dtype=torch.float64, device=device),
                                local.mean[None])
    counts, means = counts[:, 0, 0], means[:, 0]
    count = int(counts.sum().item())
    mean = (counts[:, None] * means).sum(0) / count
    delta = local.mean - mean
    m2 = local.m2.addr_(delta, delta, alpha=float(local.count))
    collective(dist.all_reduce, m2)
    stats = [statistics_from_moments(store.fingerprint, Moments(count, mean, m2)) if ranks.is_writer else None]
    collective(dist.broadcast_object_list, stats, src=0)
    save_statistics(stats[0], path)  # atomic: on a shared file system every rank writes the same bytes


def check_sharded_method(name: str) -> None:
    """A method without a sharded form stops with one line naming those that have one."""
    if name not in SUPPORTED:
        raise StudioError(f"method '{name}' has no distributed.strategy=dataset form yet; it supports "
                          f"{', '.join(SUPPORTED)}; use distributed.strategy=samples (every rank holds the store)")


def build_sharded_denoiser(cfg, store: DatasetStore, device: torch.device, ranks: Ranks
                           ) -> tuple[Denoiser, float, ShardedDataset]:
    """The configured method over this rank's shard, merged with the others; its fit time; the sharded dataset
    (for the memorization records). Methods without a sharded form stop with one line (check_sharded_method)."""
    name, params = cfg.model.name, cfg.model.params
    check_sharded_method(name)
    started = time.perf_counter()
    dataset = ShardedDataset(store, ranks, device, getattr(params, "chunk_size", None))
    cache_dir = Path(cfg.paths.cache)
    cls = denoiser_class(name)
    if name == "nearest_dataset":
        denoiser: Denoiser = ShardedNearest(params, device, dataset)
    elif name in ("optimal", "scfdm"):
        denoiser = (ShardedOptimal if name == "optimal" else ShardedScfdm)(params, device, dataset)
    elif issubclass(cls, LocalPatchDenoiser):
        denoiser = cls(params, device).fit(dataset.shard)
        denoiser.merge = PatchMerge(dataset)
    elif name == "unet":  # no sum over the dataset: every rank runs the same network on the same x_t
        denoiser = cls(params, device).fit(store)
    else:
        share_statistics(store, dataset, cache_dir, device)
        cls = ShardedPcaLocality if name == "pca_locality" else cls
        denoiser = cls(params, device)
        denoiser.cache_dir = cache_dir
        denoiser.fit(store)  # reads the shared statistics; the images it sums over are the shard's (use_shard)
        if isinstance(denoiser, ShardedPcaLocality):
            denoiser.use_shard(dataset)
    synchronize(device)
    return denoiser, time.perf_counter() - started, dataset

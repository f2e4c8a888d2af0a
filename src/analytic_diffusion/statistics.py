"""Dataset mean and covariance eigendecomposition: the Gaussian model behind `wiener` and `pca_locality`.

One streaming pass over the store accumulates the mean and the centred second moment in float64, merging chunks
with Chan et al.'s pairwise update (no second pass, no catastrophic cancellation). The covariance
S = M2 / (N - 1) is decomposed as S = U diag(lam) U^T and the result is cached on disk under the store's
fingerprint, written atomically: a changed dataset or subset has another fingerprint and is recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import touch
from .data.store import DatasetStore
from .fileio import atomic_write

log = logging.getLogger(__name__)

STATISTICS_FORMAT = 1  # bump when the computation changes, so old cache files are never reused
CHUNK_BYTES = 64 << 20  # float64 bytes of one streamed chunk of images


@dataclass(frozen=True)
class DatasetStatistics:
    """Mean, per-pixel variance and eigenpairs of the covariance of a store's images (flattened, model space)."""

    fingerprint: str  # the store's fingerprint these were computed from
    num_images: int
    mean: torch.Tensor  # mu [n], float64
    pixel_variance: torch.Tensor  # diag(S) [n], float64: exactly 0 for pixels constant across the dataset
    eigenvalues: torch.Tensor  # lam [n], float64, descending, clamped at 0
    eigenvectors: torch.Tensor  # U [n, n], float64, column j belongs to eigenvalues[j]

    def rank(self, relative_tolerance: float | None = None) -> int:
        """How many eigenvalues exceed the numerical-zero level n * eps * lam_max (or the given tolerance)."""
        lam = self.eigenvalues
        tol = relative_tolerance if relative_tolerance is not None else lam.numel() * torch.finfo(lam.dtype).eps
        return int((lam > tol * lam[0].clamp_min(0)).sum()) if lam.numel() else 0


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred second moment M2 = sum_i (y_i - mu)(y_i - mu)^T of a set of images (float64): what
    two parts of a dataset merge exactly by Chan et al.'s formula (distributed/dataset.py merges shards so)."""

    count: int
    mean: torch.Tensor  # mu [n]
    m2: torch.Tensor  # M2 [n, n]


def compute_moments(store: DatasetStore, device: torch.device | str = "cpu") -> Moments:
    """Mean and centred second moment of the store's images, in one streaming pass in float64."""
    n, total = store.dim, store.num_images
    chunk = max(1, CHUNK_BYTES // (8 * n))
    count = 0
    mean = torch.zeros(n, dtype=torch.float64, device=device)
    m2 = torch.zeros(n, n, dtype=torch.float64, device=device)
    for start in range(0, total, chunk):
        block = store.model_space(start, start + chunk, device, torch.float64).reshape(-1, n)
        k = block.shape[0]
        block_mean = block.mean(0)
        centred = block - block_mean
        delta = block_mean - mean
        # Chan et al. (1979): M2 = M2_a + M2_b + delta delta^T * n_a n_b / (n_a + n_b)
        m2.addmm_(centred.T, centred).addr_(delta, delta, alpha=count * k / (count + k))
        mean += delta * (k / (count + k))
        count += k
    return Moments(count, mean, m2)


def statistics_from_moments(fingerprint: str, moments: Moments) -> DatasetStatistics:
    """Covariance S = M2 / (N - 1) and its symmetric eigendecomposition (M2 is overwritten)."""
    count = moments.count
    covariance = moments.m2.div_(max(count - 1, 1))  # one image: zero covariance, the model is that image
    variance = covariance.diagonal().clone()
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    del covariance
    return DatasetStatistics(
        fingerprint=fingerprint,
        num_images=count,
        mean=moments.mean.cpu(),
        pixel_variance=variance.cpu(),
        eigenvalues=eigenvalues.flip(0).clamp_min(0).cpu(),
        eigenvectors=eigenvectors.flip(1).cpu(),
    )


def compute_statistics(store: DatasetStore, device: torch.device | str = "cpu") -> DatasetStatistics:
    """Mean, covariance (divide by N - 1) and its symmetric eigendecomposition, in one pass over the store."""
    return statistics_from_moments(store.fingerprint, compute_moments(store, device))


def save_statistics(stats: DatasetStatistics, path: Path) -> None:
    """Write statistics to the cache file `path`, atomically."""
    atomic_write(path, lambda tmp: torch.save(vars(stats), tmp))


def statistics_path(cache_dir: Path, store: DatasetStore) -> Path:
    """Where the statistics of `store` are cached: one file per fingerprint and format."""
    return Path(cache_dir) / "statistics" / f"{store.name}-{store.fingerprint}-v{STATISTICS_FORMAT}.pt"


def dataset_statistics(
    store: DatasetStore, cache_dir: Path | None = None, device: torch.device | str = "cpu"
) -> DatasetStatistics:
    """The statistics of `store`: read from `cache_dir` when computed before for its fingerprint, else computed
    (on `device`) and cached. `cache_dir=None` computes without touching the disk."""
    path = statistics_path(cache_dir, store) if cache_dir is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == store.fingerprint:
            log.info("statistics of %s read from %s", store.name, path)
            touch(path)
            return DatasetStatistics(**saved)
    stats = compute_statistics(store, device)
    if path is not None:
        save_statistics(stats, path)
        log.info("statistics of %s written to %s", store.name, path)
    return stats

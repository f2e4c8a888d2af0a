"""Optional FAISS backend behind the same `search(queries, k) -> KnnResult` interface.

FAISS keeps its own float32 copy of the model-space images (4x a uint8 store). "Flat" is `IndexFlatL2`:
exhaustive, exact up to float32 rounding, no tie rule. Other `index_factory` strings (e.g. "IVF1024,Flat",
"HNSW32") are approximate and meant for very large sets. A CUDA device uses the GPU build when installed.
FAISS's own failures (C++ exceptions with a file:line prefix) become one-line StudioErrors, and its clustering
warning on stderr becomes one of the studio's log records.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..data.store import DatasetStore
from ..errors import StudioError
from .knn import KnnResult

ADD_BATCH_BYTES = 64 << 20  # float32 bytes converted per `add` call while the index is built
TRAIN_POINTS_PER_LIST = 64  # training sample of IVF-type indexes: this many images per inverted list
FAISS_MIN_POINTS_PER_LIST = 39  # below this many training points per centroid FAISS prints a warning on stderr

log = logging.getLogger("analytic_diffusion")


def faiss_reason(exc: Exception) -> str:
    """The sentence of a FAISS error without its C++ signature and file:line ('Error in void faiss::... at
    /project/faiss/Clustering.cpp:66: Error: 'nx >= k' failed: Number of training points ...')."""
    text = " ".join(str(exc).split())
    for marker in (" failed: ", "Error: ", ".cpp:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            if marker == ".cpp:":
                text = text.split(": ", 1)[-1]
    return text


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise StudioError(
            "model.params.backend=faiss needs the faiss package: pip install 'analytic-diffusion-studio[faiss]' "
            "(or a faiss-gpu build), or use backend=exact"
        ) from exc
    return faiss


class FaissIndex:
    """A FAISS index over the store's model-space images, built once."""

    def __init__(self, store: DatasetStore, factory: str = "Flat", nprobe: int = 8, device: torch.device | str = "cpu"):
        faiss = _import_faiss()
        try:
            index = faiss.index_factory(store.dim, factory, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise StudioError(f"faiss cannot parse model.params.faiss_index='{factory}' ({faiss_reason(exc)}); "
                              "see the faiss index_factory strings, e.g. Flat or IVF256,Flat") from None
        try:
            if not index.is_trained:
                self._quiet_clustering(faiss, index, store.num_images, factory)
                index.train(self._training_sample(store, index))
            step = max(1, ADD_BATCH_BYTES // (4 * store.dim))
            for start in range(0, store.num_images, step):
                index.add(self._rows(store, start, start + step))
        except RuntimeError as exc:
            lists = max(1, store.num_images // FAISS_MIN_POINTS_PER_LIST)
            raise StudioError(
                f"faiss cannot build index '{factory}' on {store.num_images} images: {faiss_reason(exc)}; use "
                f"model.params.faiss_index=Flat (exact) or fewer clusters (e.g. IVF{lists},Flat)"
            ) from None
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        device = torch.device(device)
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            self.resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.resources, device.index or 0, index)
        self.index = index

    @staticmethod
    def _quiet_clustering(faiss, index, num_images: int, factory: str) -> None:
        """FAISS prints 'WARNING clustering N points to K centroids' on stderr when an IVF index has fewer than
        39 training points per list; say it once in the studio's log instead, and switch FAISS's print off."""
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:  # not an IVF index
            return
        if ivf.nlist <= num_images < ivf.nlist * FAISS_MIN_POINTS_PER_LIST:  # more lists than images: train() fails
            log.warning("warning: faiss_index=%s has %d lists for %d images (FAISS asks for at least %d per list): its "
                        "lists are coarse and search is more approximate; faiss_index=Flat is exact and fast at this size",
                        factory, ivf.nlist, num_images, FAISS_MIN_POINTS_PER_LIST)
        ivf.cp.min_points_per_centroid = 0

    @staticmethod
    def _rows(store: DatasetStore, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(store.model_space(start, stop).reshape(-1, store.dim).numpy())

    @staticmethod
    def _training_sample(store: DatasetStore, index) -> np.ndarray:
        """Evenly spaced images (deterministic), about TRAIN_POINTS_PER_LIST per inverted list."""
        lists = getattr(index, "nlist", 256)
        count = min(store.num_images, max(lists * TRAIN_POINTS_PER_LIST, 1000))
        picks = torch.linspace(0, store.num_images - 1, count).long()
        return np.ascontiguousarray(store.gather(picks).reshape(count, -1).numpy())

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult:
        """The k nearest by FAISS's float32 squared distances, nearest first."""
        flat = queries.reshape(queries.shape[0], -1).detach().to("cpu", torch.float32)
        distances, indices = self.index.search(np.ascontiguousarray(flat.numpy()), k)
        distances = torch.from_numpy(distances).clamp_min_(0).sqrt_()
        return KnnResult(distances.to(queries.device), torch.from_numpy(indices).to(queries.device))

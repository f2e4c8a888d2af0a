"""Optional FAISS backend behind the same `search(queries, k) -> KnnResult` interface.

FAISS keeps its own float32 copy of the model-space images (4x a uint8 store). "Flat" is `IndexFlatL2`:
exhaustive, exact up to float32 rounding, no tie rule. Other `index_factory` strings (e.g. "IVF1024,Flat",
"HNSW32") are approximate and meant for very large sets. A CUDA device uses the GPU build when installed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.store import DatasetStore
from ..errors import StudioError
from .knn import KnnResult

ADD_BATCH_BYTES = 64 << 20  # float32 bytes converted per `add` call while the index is built
TRAIN_POINTS_PER_LIST = 64  # training sample of IVF-type indexes: this many images per inverted list


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
            raise StudioError(f"faiss cannot build index '{factory}': {str(exc).splitlines()[0]}") from exc
        if not index.is_trained:
            index.train(self._training_sample(store, index))
        step = max(1, ADD_BATCH_BYTES // (4 * store.dim))
        for start in range(0, store.num_images, step):
            index.add(self._rows(store, start, start + step))
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        device = torch.device(device)
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            self.resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.resources, device.index or 0, index)
        self.index = index

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

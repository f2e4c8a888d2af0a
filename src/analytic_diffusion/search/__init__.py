"""Search kernels over the dataset store, shared by every method that needs them."""

from .backends import BACKENDS, NeighbourIndex, build_index
from .knn import KnnIndex, KnnResult, knn_search

__all__ = ["BACKENDS", "KnnIndex", "KnnResult", "NeighbourIndex", "build_index", "knn_search"]

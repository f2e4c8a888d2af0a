"""Search kernels over the dataset store, shared by every method that needs them."""

from .knn import KnnResult, knn_search

__all__ = ["KnnResult", "knn_search"]

"""Datasets by name, decoded once into a fingerprinted, memory-mapped dataset store."""

from .sources import DATASETS, ImageSource, dataset_source
from .store import DatasetStore, load_or_build_store

__all__ = ["DATASETS", "DatasetStore", "ImageSource", "dataset_source", "load_or_build_store"]

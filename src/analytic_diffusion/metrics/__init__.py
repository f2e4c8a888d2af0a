"""Metrics of samples (DESIGN.md §8): pure functions of tensors, computed from the same tensors, never relabelled."""

"""Metrics of samples as pure functions of tensors (DESIGN.md §8): agreement with a trained backbone, memorization;
computed from the same tensors, never relabelled."""

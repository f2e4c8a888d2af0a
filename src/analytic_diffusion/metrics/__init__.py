"""Metrics as pure functions of tensors: agreement with a trained backbone (DESIGN.md §8)."""

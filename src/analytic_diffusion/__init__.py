"""Analytic Diffusion Studio: closed-form diffusion denoisers, sampled and compared from the same noise."""

__version__ = "0.1.0"

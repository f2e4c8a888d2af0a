"""Denoisers by name. Every module in this package registers its method on import; adding a method is
adding a file here (plus configs)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import DENOISERS, Denoised, Denoiser, NoiseLevel, denoiser_class, register_denoiser

__all__ = ["DENOISERS", "Denoised", "Denoiser", "NoiseLevel", "denoiser_class", "load_all", "register_denoiser"]


def load_all() -> None:
    """Import every method module of this package so that its @register_denoiser runs."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")

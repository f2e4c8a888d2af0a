"""Turn `experiment.device` into a torch.device, with a clear error when the requested one is absent."""

from __future__ import annotations

import torch

from .errors import StudioError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, else mps, else cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StudioError(f"experiment.device={name} but CUDA is not available here; use experiment.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StudioError(f"experiment.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise StudioError(f"experiment.device={name} but MPS is not available here; use experiment.device=cpu or auto")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Turn `experiment.device` into a torch.device, with a clear error when the requested one is absent; the
float32 precision guard of the exact kernels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def _precision_flags() -> list:
    """The per-backend float32 precision switches of torch >= 2.9 (matrix products and convolutions, CUDA and
    oneDNN); empty on older versions, which have only the legacy switches."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul,
                getattr(torch.backends.mkldnn, "conv", None))
    return [backend for backend in backends if hasattr(backend, "fp32_precision")]


@contextmanager
def full_precision() -> Iterator[None]:
    """Run float32 matrix products and convolutions in IEEE float32 inside the block, whatever the process set
    globally (TF32 or bfloat16 modes: torch.set_float32_matmul_precision("high"), torch.backends.cuda.matmul.
    allow_tf32 = True, the fp32_precision flags; cuDNN convolutions use TF32 by default). TF32 keeps 10 bits of
    mantissa, so a float32 product errs by ~1e-3 relative: the exact kernels (k-NN bounds, the optimal softmax, the
    analytic methods' 1e-5 agreement with float64) need the full 24. The previous settings come back on exit, read
    and written through the same API so that either API reads them afterwards as before. Process-global, like the
    switches themselves: not for threads that want another precision at the same time.
    """
    flags = _precision_flags()
    if flags:  # reading the legacy switches raises once the new ones were used, so only the new ones are touched
        saved = [flag.fp32_precision for flag in flags]
        try:
            for flag in flags:
                flag.fp32_precision = "ieee"
            yield
        finally:
            for flag, value in zip(flags, saved):
                flag.fp32_precision = value
        return
    saved_matmul, saved_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(saved_matmul)
        torch.backends.cudnn.allow_tf32 = saved_cudnn


def reduced_precision_matmul(device: torch.device) -> bool:
    """True if float32 matrix products on `device` may round their inputs now (TF32 / bfloat16 modes)."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    precision = getattr(backend, "fp32_precision", None)
    if precision is not None:  # torch >= 2.9; the legacy getters below may raise once this API was used
        return precision not in ("none", "ieee")
    if torch.get_float32_matmul_precision() != "highest":
        return True
    return device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32

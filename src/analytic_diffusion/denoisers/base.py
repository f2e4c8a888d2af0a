"""The denoiser contract shared by every method, and the registry that maps method names to classes.

A denoiser is fitted once on a dataset store and then called as `denoiser(x_t, level, noise) -> Denoised`,
with `x_t` of shape [B, C, H, W] in model space and `Denoised.x0_hat` the estimate of E[x_0 | x_t].
Discrete-timestep details live in `NoiseLevel`; the sampler never knows which method it drives.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..devices import full_precision
from ..errors import StudioError, unknown_name

if TYPE_CHECKING:
    from ..data.store import DatasetStore
    from ..noise import NoiseSource


def check_temperature(temperature: float) -> None:
    """model.params.temperature divides the logits: it must be positive and finite (NaN and inf refused)."""
    if not 0 < temperature < math.inf:
        raise StudioError(f"model.params.temperature must be a finite number > 0, got {temperature}")


def check_chunk_size(chunk_size: int | None) -> None:
    """model.params.chunk_size: images per streamed chunk, at least 1, or None to choose it from memory."""
    if chunk_size is not None and chunk_size < 1:
        raise StudioError(f"model.params.chunk_size must be at least 1 (or null), got {chunk_size}")


@dataclass(frozen=True)
class NoiseLevel:
    """One point of the forward process x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""

    timestep: int  # t in [0, 1000): the discrete training timestep (what a UNet is conditioned on)
    alpha_bar: float  # ab_t: cumulative product of (1 - beta) up to t

    @property
    def signal_scale(self) -> float:
        """sqrt(ab_t): how much of x_0 is left in x_t."""
        return math.sqrt(self.alpha_bar)

    @property
    def noise_variance(self) -> float:
        """1 - ab_t: the variance of the noise in x_t."""
        return 1.0 - self.alpha_bar


@dataclass
class Denoised:
    """A denoiser's answer: the estimate and optional per-sample diagnostics (each a tensor of shape [B])."""

    x0_hat: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class NoParams:
    """Parameters of a method that has none."""


class Denoiser:
    """Base class of every method: subclasses set `Params` and implement `fit` and `denoise`."""

    Params: ClassVar[type] = NoParams
    name: ClassVar[str] = ""
    cache_dir: Path | None = None  # where fit() may cache statistics (keyed by the store's fingerprint); None = off
    exact_float32: ClassVar[bool] = True  # calls run with TF32 / bfloat16 matmul modes off (devices.full_precision)

    def __init__(self, params: Any = None, device: torch.device | str = "cpu"):
        self.params = params if params is not None else self.Params()
        self.device = torch.device(device)

    def fit(self, store: DatasetStore) -> Denoiser:
        """Compute whatever the method needs from the dataset; returns self."""
        return self

    @classmethod
    def check_schedule(cls, params: Any, timesteps: list[int], sample_shape: tuple[int, int, int] | None) -> None:
        """Refuse parameters that cannot serve this schedule and image shape (e.g. one patch size per step, or a
        patch larger than the image); called before a run directory exists. `sample_shape` None: not known yet
        (a sweep checks every cell's schedule before it opens any store), so only the schedule is checked."""

    def use_schedule(self, timesteps: list[int]) -> None:
        """Told the timesteps sampling will visit, for methods whose parameters vary per step."""

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise: NoiseSource | None = None) -> Denoised:
        """Estimate x_0 from x_t at the given noise level."""
        raise NotImplementedError

    def __call__(self, x_t: torch.Tensor, level: NoiseLevel, noise: NoiseSource | None = None) -> Denoised:
        """denoise() under IEEE float32 products (exact_float32), whatever the process's global TF32 setting."""
        if not self.exact_float32:
            return self.denoise(x_t, level, noise)
        with full_precision():
            return self.denoise(x_t, level, noise)


DENOISERS: dict[str, type[Denoiser]] = {}


def register_denoiser(name: str):
    """Class decorator: make a method available under `model.name: <name>` in configs."""

    def wrap(cls: type[Denoiser]) -> type[Denoiser]:
        if name in DENOISERS:
            raise ValueError(f"denoiser '{name}' registered twice")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass")
        cls.name = name
        DENOISERS[name] = cls
        return cls

    return wrap


def denoiser_class(name: str) -> type[Denoiser]:
    """Look a method up by name; an unknown name raises a StudioError naming the closest one."""
    from . import load_all  # registration happens on import of the method modules

    load_all()
    if name not in DENOISERS:
        raise unknown_name("model", name, DENOISERS)
    return DENOISERS[name]

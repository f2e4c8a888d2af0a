"""The Wiener denoiser (DESIGN.md §3): the posterior mean of x_0 under a Gaussian model N(mu, S) of the data.

With S = U diag(lam) U^T and a = ab_t, the shrinkage is g = a lam / ((1 - a) + a lam), P_t = U diag(g) U^T and
x0_hat = P_t x_t / sqrt(a) + (I - P_t) mu = mu + U (g * (U^T (x_t / sqrt(a) - mu))), applied in that order
(O(B n r) per call for rank r) instead of forming P_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.store import DatasetStore
from ..statistics import DatasetStatistics, dataset_statistics
from .base import Denoised, Denoiser, NoiseLevel, register_denoiser


class GaussianModel:
    """Mean and the non-zero eigenpairs of the data covariance on one device, with the Wiener operators."""

    def __init__(self, stats: DatasetStatistics, device: torch.device):
        rank = stats.rank()
        self.stats = stats
        self.device = device
        self.mean = stats.mean.to(device)  # float64 [n]
        self.eigenvalues = stats.eigenvalues[:rank].to(device)  # float64 [r]
        self.eigenvectors = stats.eigenvectors[:, :rank].to(device)  # float64 [n, r]
        self._cast = {torch.float64: (self.mean, self.eigenvectors)}  # (mu, U) per dtype, see _in

    def shrinkage(self, alpha_bar: float) -> torch.Tensor:
        """g_j = a lam_j / ((1 - a) + a lam_j), float64 [r]."""
        scaled = alpha_bar * self.eigenvalues
        return scaled / ((1.0 - alpha_bar) + scaled)

    def projection(self, alpha_bar: float) -> torch.Tensor:
        """P_t = U diag(g) U^T as a dense float64 [n, n] matrix (pca_locality's masks are built from it)."""
        return (self.eigenvectors * self.shrinkage(alpha_bar)) @ self.eigenvectors.T

    def posterior_mean(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """x0_hat = mu + U (g * (U^T (x_t / sqrt(a) - mu))) for x_t [B, ...], computed in x_t's dtype."""
        mean, basis = self._in(x_t.dtype)
        flat = x_t.reshape(x_t.shape[0], -1)
        coefficients = (flat / level.signal_scale - mean) @ basis
        coefficients *= self.shrinkage(level.alpha_bar).to(x_t.dtype)
        return (mean + coefficients @ basis.T).reshape(x_t.shape)

    def _in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, U) in `dtype`, converted once per dtype."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.mean.to(dtype), self.eigenvectors.to(dtype))
        return self._cast[dtype]


@dataclass
class WienerParams:
    """The Wiener denoiser has no hyper-parameters: mean and covariance come from the dataset."""


@register_denoiser("wiener")
class Wiener(Denoiser):
    """The best linear denoiser: exact for Gaussian data, a smooth average of the training set otherwise."""

    Params = WienerParams

    def fit(self, store: DatasetStore) -> Wiener:
        self.model = GaussianModel(dataset_statistics(store, self.cache_dir, self.device), self.device)
        return self

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return Denoised(self.model.posterior_mean(x_t, level))

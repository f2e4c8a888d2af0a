"""Smoothed closed-form diffusion (SCFDM, arXiv 2310.12395; DESIGN.md §3): the optimal denoiser averaged over
Gaussian perturbations of its input, x0_hat = mean_m optimal(x_t + s e_m), e_m ~ N(0, I), m = 1..M.

The noise e [M, B, C, H, W] is one `noise.randn(M)` per call: under the default seed convention one draw from the
run's generator in sampling order (as the reference framework does), under per-sample seeds M draws from each
sample's own generator. With s = 0 the average is the optimal denoiser itself: nothing is drawn or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StudioError
from ..noise import NoiseSource
from .base import Denoised, NoiseLevel, register_denoiser
from .optimal import OptimalDenoiser, OptimalParams


@dataclass
class ScfdmParams(OptimalParams):
    num_noise: int = 10  # M: perturbations of x_t averaged per denoiser call
    smoothing_std: float = 1.0  # s: their standard deviation in model space; 0 = the optimal denoiser, no noise drawn

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_noise < 1:
            raise StudioError(f"model.params.num_noise must be at least 1, got {self.num_noise}")
        if not self.smoothing_std >= 0:
            raise StudioError(f"model.params.smoothing_std must be >= 0, got {self.smoothing_std}")


@register_denoiser("scfdm")
class SmoothedClosedFormDenoiser(OptimalDenoiser):
    """The optimal denoiser smoothed over M input perturbations; all M x B queries share one pass over the data.

    Diagnostics are those of the optimal denoiser per perturbed query, summarised per sample: effective_count and
    top_weight averaged over the M perturbations, top_index from the perturbation with the largest top weight.
    """

    Params = ScfdmParams

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise: NoiseSource | None = None) -> Denoised:
        if self.params.smoothing_std == 0:
            return self.posterior_mean(x_t, level)
        if noise is None:
            raise StudioError(
                "scfdm draws its perturbations from the run's noise: call denoise(x_t, level, noise) with a NoiseSource "
                "(the sampler passes the run's), or set model.params.smoothing_std=0 for the optimal denoiser"
            )
        num_noise, batch = self.params.num_noise, x_t.shape[0]
        perturbations = noise.randn(num_noise).to(device=x_t.device, dtype=x_t.dtype)
        perturbed = x_t.unsqueeze(0) + self.params.smoothing_std * perturbations
        each = self.posterior_mean(perturbed.reshape(num_noise * batch, *x_t.shape[1:]), level)
        x0_hat = each.x0_hat.reshape(num_noise, *x_t.shape).mean(0)
        per_draw = {name: value.reshape(num_noise, batch) for name, value in each.diagnostics.items()}
        strongest = per_draw["top_weight"].argmax(0, keepdim=True)
        diagnostics = {
            "effective_count": per_draw["effective_count"].mean(0),
            "top_weight": per_draw["top_weight"].mean(0),
            "top_index": per_draw["top_index"].gather(0, strongest)[0],
        }
        return Denoised(x0_hat, diagnostics)

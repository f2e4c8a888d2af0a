"""Agreement between a method's estimate `a` and a backbone's `u`, per sample over all n = C*H*W values (DESIGN.md §8).

Every function takes two tensors of the same shape [B, ...] (any trailing dimensions are flattened), computes in
float64 and returns one float32 value per sample [B]. NaN where the definition divides by zero (a constant or
zero reference). The names are the field's; they are different statistics and must never be relabelled as one
another (Kamb & Ganguli's figures say "r^2" for what is `pearson_r` here).
"""

from __future__ import annotations

import torch

NAMES = ("r2", "mse", "pearson_r", "explained_variance", "eps_cosine")


def _pair(a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != u.shape:
        raise ValueError(f"agreement metrics need tensors of one shape, got {list(a.shape)} and {list(u.shape)}")
    return a.flatten(1).double(), u.flatten(1).double()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, NaN where the denominator is 0."""
    safe = denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(denominator > 0, numerator / safe, torch.nan)


def r2(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """R^2 of the reference framework (Lukoianov et al., arXiv 2509.09672, their evaluation code): per sample
    `1 - sum (a - u)^2 / (n var(u))` with var the unbiased variance of u's n values (torch.var's default), so
    `n var(u) = n / (n - 1) * sum (u - mean u)^2`. 1 = identical; about 0 = no better than u's own mean value.
    The paper averages it over samples. Shape [B]; NaN where u is constant."""
    a, u = _pair(a, u)
    n = a.shape[1]
    return (1 - _ratio((a - u).square().sum(1), n * u.var(1, correction=1))).float()


def mse(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Mean squared difference `mean (a - u)^2` over the n values of each sample (model space [-1, 1]); shape [B]."""
    a, u = _pair(a, u)
    return (a - u).square().mean(1).float()


def pearson_r(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the n values of a and u (Kamb & Ganguli, arXiv 2412.20292, whose code and figures
    call it "r^2"): `sum (a - mean a)(u - mean u) / sqrt(sum (a - mean a)^2 sum (u - mean u)^2)`, in [-1, 1];
    they report the median over samples. Insensitive to a gain and offset of a. Shape [B]; NaN where a or u is
    constant."""
    a, u = _pair(a, u)
    a = a - a.mean(1, keepdim=True)
    u = u - u.mean(1, keepdim=True)
    return _ratio((a * u).sum(1), (a.square().sum(1) * u.square().sum(1)).sqrt()).float()


def explained_variance(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Fraction of the backbone's output explained (Wang & Vastola, "The unreasonable effectiveness of Gaussian
    score approximation", arXiv 2311.10892): `1 - ||a - u||^2 / ||u||^2`, uncentred (unlike r2). Shape [B]; NaN
    where u = 0."""
    a, u = _pair(a, u)
    return (1 - _ratio((a - u).square().sum(1), u.square().sum(1))).float()


def eps_cosine(eps_a: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `<eps_a, eps_u> / (||eps_a|| ||eps_u||)` of two noise predictions (equivalently of the
    scores), the criterion Kamb & Ganguli (arXiv 2412.20292) calibrate their patch size with (DESIGN.md §6). Pass
    the eps of each model, `(x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)` at its own x_t. Shape [B]; NaN where one is 0."""
    a, u = _pair(eps_a, eps_u)
    return _ratio((a * u).sum(1), (a.square().sum(1) * u.square().sum(1)).sqrt()).float()


def agreement(a: torch.Tensor, u: torch.Tensor, eps_a: torch.Tensor, eps_u: torch.Tensor) -> dict[str, torch.Tensor]:
    """All five metrics by name (NAMES order), x0 estimates `a` (method) and `u` (backbone) and their eps; each [B]."""
    return {
        "r2": r2(a, u),
        "mse": mse(a, u),
        "pearson_r": pearson_r(a, u),
        "explained_variance": explained_variance(a, u),
        "eps_cosine": eps_cosine(eps_a, eps_u),
    }

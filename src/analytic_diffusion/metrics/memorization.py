"""Memorization of samples against a training set, model-space l2 (DESIGN.md §8).

For a sample x with training images y_i (flattened to n = C*H*W values in [-1, 1]):
- `d1`, `d2`: ||x - y_i||_2 to the nearest and second-nearest training images, two different indices (a training
  image stored twice is two indices, so a sample next to it has d2 = d1);
- `ratio` = d1 / d2 and `memorized` = ratio < 1/3: the nearest-neighbour distance-ratio test of Gu et al.,
  "On Memorization in Diffusion Models", arXiv 2310.02664 (Sec. 3), after Yoon et al., "Diffusion Probabilistic
  Models Generalize when They Fail to Memorize" (ICML 2023 workshop);
- `nn_cosine`: the cosine between x and its nearest training image, each minus its own mean over its n values
  (Kadkhodaie et al., "Generalization in diffusion models arises from geometry-adaptive harmonic
  representations", arXiv 2310.02557, who compare samples with their nearest training images this way).
Inputs are the k >= 2 nearest neighbours from `analytic_diffusion.search.knn_search` (exact; ties to the
lowest index); everything here is a function of tensors.
"""

from __future__ import annotations

import torch

THRESHOLD = 1 / 3  # Gu et al.: memorized when d1 / d2 < 1/3
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def distance_ratio(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """d1 / d2 per sample (float64). Where d1 = d2 = 0 (a sample equal to a training image stored twice) the ratio
    is 1, the limit of d1 / d2 along d1 = d2; d2 > 0 = d1 gives 0."""
    d1, d2 = d1.to(torch.float64), d2.to(torch.float64)
    return torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(d1))


def memorized(ratio: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """bool per sample: ratio < threshold (Gu et al.'s test, threshold 1/3)."""
    return ratio < threshold


def nn_cosine(samples: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Cosine between each sample [B, ...] and its nearest training image [B, ...] (same shape), each centred on
    its own mean over its n values (Kadkhodaie et al.); float64 [B], rounding clamped to [-1, 1]. 0 where either
    is constant."""
    a = samples.flatten(1).to(torch.float64)
    b = nearest.flatten(1).to(torch.float64)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    cosine = (a * b).sum(1) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(norms > 0, cosine.clamp(-1, 1), torch.zeros_like(norms))


def memorization_metrics(
    samples: torch.Tensor,
    nearest_images: torch.Tensor,
    distances: torch.Tensor,
    indices: torch.Tensor,
    threshold: float = THRESHOLD,
) -> dict[str, torch.Tensor]:
    """Per-sample metrics from a k-NN result with k >= 2.

    samples [B, C, H, W]; nearest_images [B, C, H, W] (the training images at indices[:, 0], model space);
    distances [B, k] and indices [B, k], nearest first. Returns d1, d2, ratio, nn_cosine (float64 [B]),
    memorized (bool [B]), nearest_index and second_index (int64 [B]).
    """
    if distances.shape[1] < 2:
        raise ValueError(f"memorization needs the two nearest training images, got k = {distances.shape[1]}")
    d1, d2 = distances[:, 0].to(torch.float64), distances[:, 1].to(torch.float64)
    ratio = distance_ratio(d1, d2)
    return {
        "d1": d1,
        "d2": d2,
        "ratio": ratio,
        "memorized": memorized(ratio, threshold),
        "nn_cosine": nn_cosine(samples, nearest_images),
        "nearest_index": indices[:, 0],
        "second_index": indices[:, 1],
    }


def quantiles(values: torch.Tensor) -> dict[str, float]:
    """{"q00": min, "q05", "q25", "q50" (median), "q75", "q95", "q100": max} of a float tensor [B]."""
    found = torch.quantile(values.to(torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{round(100 * q):02d}": float(v) for q, v in zip(QUANTILES, found)}


def summarize(metrics: dict[str, torch.Tensor], threshold: float = THRESHOLD) -> dict:
    """The fraction memorized, the medians and quantiles of d1 and ratio, and nn_cosine's median, over samples
    (medians interpolated between the two middle values, as torch.quantile does)."""
    d1, ratio = quantiles(metrics["d1"]), quantiles(metrics["ratio"])
    return {
        "count": int(metrics["d1"].shape[0]),
        "threshold": threshold,
        "memorized_fraction": float(metrics["memorized"].to(torch.float64).mean()),
        "d1_median": d1["q50"],
        "ratio_median": ratio["q50"],
        "nn_cosine_median": quantiles(metrics["nn_cosine"])["q50"],
        "d1_quantiles": d1,
        "ratio_quantiles": ratio,
    }


def exclude_self(
    distances: torch.Tensor, indices: torch.Tensor, own: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out: the k - 1 nearest of each training image among the others, from its k nearest in the whole
    set (distances, indices [B, k], nearest first, ties to the lowest index; own [B] its index). Its own entry is
    dropped where present; where it is not (k or more exact copies of it with lower indices), the last column is.
    An exact duplicate of it stays a neighbour at distance 0: that is what a copy looks like."""
    k = indices.shape[1]
    is_own = indices == own[:, None]
    drop = torch.where(is_own.any(1), is_own.to(torch.int8).argmax(1), torch.full_like(own, k - 1))
    keep = torch.arange(k, device=indices.device)[None] != drop[:, None]
    return distances[keep].reshape(-1, k - 1), indices[keep].reshape(-1, k - 1)

"""The agreement metrics of DESIGN.md §8 against hand-computed values, textbook identities and themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analytic_diffusion.metrics import agreement
from analytic_diffusion.metrics.agreement import eps_cosine, explained_variance, mse, pearson_r, r2

# u: the backbone (reference), a: the method; one row per sample, n = 4 values each
U = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 0.0, 2.0], [1.0, -1.0, 2.0, 0.0]])
A = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, -2.0, 0.0]])


def test_each_metric_matches_hand_computed_values():
    # sample 0: SS_res = 1; mean u = 2.75, sum (u - mean)^2 = 8.75, unbiased var = 8.75 / 3 -> n var = 35 / 3
    #           centred a = [-1.5, -.5, .5, 1.5] (sum sq 5), centred u = [-1.75, -.75, .25, 2.25]: dot 6.5
    #           ||u||^2 = 39; <a, u> = 34, ||a||^2 = 30
    # sample 1: SS_res = 4, n var(u) = 4 * 4 / 3; a constant -> no correlation; ||u||^2 = 8; <a, u> = 4, ||a||^2 = 4
    # sample 2: a = -u: SS_res = 24, mean u = .5, sum (u - mean)^2 = 5 -> n var = 20 / 3; ||u||^2 = 6
    torch.testing.assert_close(r2(A, U), torch.tensor([1 - 3 / 35, 1 - 4 * 3 / 16, 1 - 24 * 3 / 20]))
    torch.testing.assert_close(mse(A, U), torch.tensor([0.25, 1.0, 6.0]))
    expected_r = torch.tensor([6.5 / math.sqrt(5 * 8.75), math.nan, -1.0])
    torch.testing.assert_close(pearson_r(A, U), expected_r, equal_nan=True)
    torch.testing.assert_close(explained_variance(A, U), torch.tensor([1 - 1 / 39, 1 - 4 / 8, 1 - 24 / 6]))
    torch.testing.assert_close(eps_cosine(A, U), torch.tensor([34 / math.sqrt(30 * 39), 4 / math.sqrt(4 * 8), -1.0]))


def test_metrics_flatten_images_and_agree_with_numpy():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, 4, 4, generator=generator)
    a = 0.8 * u + 0.3 * torch.randn(5, 3, 4, 4, generator=generator) + 0.1
    x, y = a.flatten(1).double().numpy(), u.flatten(1).double().numpy()
    n = x.shape[1]
    expected = {
        "r2": 1 - ((x - y) ** 2).sum(1) / (n * y.var(1, ddof=1)),
        "mse": ((x - y) ** 2).mean(1),
        "pearson_r": np.array([np.corrcoef(p, q)[0, 1] for p, q in zip(x, y)]),
        "explained_variance": 1 - ((x - y) ** 2).sum(1) / (y**2).sum(1),
        "eps_cosine": (x * y).sum(1) / np.sqrt((x**2).sum(1) * (y**2).sum(1)),
    }
    computed = agreement.agreement(a, u, a, u)
    assert tuple(computed) == agreement.NAMES
    for name, values in computed.items():
        assert values.shape == (5,) and values.dtype == torch.float32
        np.testing.assert_allclose(values.numpy(), expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_backbone_agrees_with_itself():
    u = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    scores = agreement.agreement(u, u.clone(), u, u.clone())
    for name, values in scores.items():
        torch.testing.assert_close(values, torch.full((4,), 0.0 if name == "mse" else 1.0), msg=name)


def test_invariances_tell_the_metrics_apart():
    """pearson_r ignores gain and offset, eps_cosine ignores gain only, r2 and explained_variance neither."""
    u = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    affine = 2 * u + 3
    torch.testing.assert_close(pearson_r(affine, u), torch.ones(3))
    torch.testing.assert_close(eps_cosine(2 * u, u), torch.ones(3))
    assert (eps_cosine(affine, u) < 0.999).all()
    assert (r2(2 * u, u) < 0.5).all() and (explained_variance(2 * u, u) == 0).all()


def test_undefined_values_are_nan_not_errors():
    zero, constant = torch.zeros(1, 4), torch.ones(1, 4)
    assert r2(zero, constant).isnan().all() and pearson_r(zero, constant).isnan().all()
    assert explained_variance(constant, zero).isnan().all() and eps_cosine(zero, constant).isnan().all()
    with pytest.raises(ValueError, match="one shape"):
        mse(torch.zeros(1, 4), torch.zeros(1, 5))

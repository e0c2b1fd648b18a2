"""FairGrad (Ban & Ji, ICML 2024): d = Σ w_i g_i with (G w)_i = w_i^{-1/α}."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from hf_mtl.methods import get_method

from ._helpers import assert_non_finite_input_propagates, random_jacobians, row_permutations

ALPHAS = [0.5, 1.0, 2.0, 5.0]


def _weights(jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    """FairGrad's weights on the exact float64 Gramian (``aggregate`` forms it in float32)."""
    return get_method("fairgrad", **kwargs).weights_from_gramian(jacobian @ jacobian.T)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_weights_solve_the_fairness_equation(alpha: float) -> None:
    for jacobian in random_jacobians(12):
        gram = jacobian @ jacobian.T
        weights = _weights(jacobian, alpha=alpha, reg_eps=0.0)
        assert torch.all(weights > 0)
        torch.testing.assert_close(gram @ weights, weights ** (-1 / alpha), rtol=1e-9, atol=0)
        # with the default regularisation: (G w)_i w_i^{1/α} = 1 - reg_eps · G_ii w_i^{1+1/α}
        weights = _weights(jacobian, alpha=alpha)
        torch.testing.assert_close(
            (gram @ weights) * weights ** (1 / alpha), torch.ones_like(weights), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_matches_the_reference_least_squares_solver(alpha: float) -> None:
    """The reference's own solver (scipy least_squares from 1/K, bounds [0, ∞)), tightened."""
    for jacobian in random_jacobians(8, seed=1):
        gram = (jacobian @ jacobian.T).numpy()
        num_tasks = gram.shape[0]
        reference = least_squares(
            lambda x, gram=gram: gram @ x - np.power(1 / x, 1 / alpha),
            np.ones(num_tasks) / num_tasks,
            bounds=(0, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        ).x
        np.testing.assert_allclose(_weights(jacobian, alpha=alpha, reg_eps=0.0).numpy(), reference, rtol=1e-6)


def test_alpha_one_is_nash_mtl() -> None:
    for jacobian in random_jacobians(8, seed=2):
        gram = jacobian @ jacobian.T
        nash = get_method("nash_mtl").weights_from_gramian(gram)
        torch.testing.assert_close(_weights(jacobian, alpha=1.0), nash, rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_global_scale_law(alpha: float) -> None:
    """J → sJ gives d → s^{(1-α)/(1+α)} d (scale-invariant only for α = 1)."""
    for jacobian in random_jacobians(6, seed=3):
        update = _weights(jacobian, alpha=alpha) @ jacobian
        for scale in (1e-3, 1e3):
            scaled = _weights(jacobian * scale, alpha=alpha) @ (jacobian * scale)
            torch.testing.assert_close(scaled, scale ** ((1 - alpha) / (1 + alpha)) * update, rtol=1e-8, atol=1e-12)


def test_worked_examples() -> None:
    # orthogonal rows: G_ii w_i = w_i^{-1/α}  ⇒  w_i = G_ii^{-α/(1+α)}
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    for alpha in ALPHAS:
        expected = torch.tensor([4.0, 0.25], dtype=torch.float64) ** (-alpha / (1 + alpha))
        torch.testing.assert_close(_weights(jacobian, alpha=alpha, reg_eps=0.0), expected, rtol=1e-9, atol=0)
    # K = 1: g_1·d = ||g||² w = w^{-1/α}
    row = torch.tensor([[3.0, 4.0]])
    for alpha in ALPHAS:
        expected = 25.0 ** (-alpha / (1 + alpha)) * row[0]
        torch.testing.assert_close(get_method("fairgrad", alpha=alpha).aggregate(row), expected)


def test_permuting_rows_keeps_the_update() -> None:
    for jacobian in random_jacobians(8, seed=4):
        weights = _weights(jacobian, alpha=2.0)
        for permutation in row_permutations(jacobian.shape[0], 5):
            permuted = _weights(jacobian[permutation], alpha=2.0)
            torch.testing.assert_close(permuted, weights[permutation], rtol=1e-9, atol=0)


def test_singular_gramians_are_regularised() -> None:
    row = torch.tensor([[1.0, -2.0, 0.5]])
    method = get_method("fairgrad", alpha=2.0)
    torch.testing.assert_close(method.aggregate(torch.cat([row, -row])), torch.zeros(3), atol=1e-5, rtol=0)
    other = torch.tensor([[0.5, 1.0, 1.0]])
    with_zero = method.aggregate(torch.cat([row, torch.zeros(1, 3), other]))
    assert method.last_weights[1] == 0
    torch.testing.assert_close(with_zero, method.aggregate(torch.cat([row, other])))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="`alpha` must be > 0"):
        get_method("fairgrad", alpha=0.0)
    with pytest.raises(ValueError, match="`reg_eps` must be >= 0"):
        get_method("fairgrad", reg_eps=-1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(bad: float) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    assert_non_finite_input_propagates(get_method("fairgrad"), bad)

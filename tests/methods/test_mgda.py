"""MGDA (docs/methods.md): the minimum-norm point of the convex hull of the rows."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

from hf_mtl.methods import get_method
from hf_mtl.methods._solvers import min_norm_weights

from ._helpers import assert_non_finite_input_propagates, random_jacobians, row_permutations


def _weights(method, jacobian: torch.Tensor) -> torch.Tensor:
    """The method's weights on the exact float64 Gramian (``aggregate`` forms it in float32)."""
    return method.weights_from_gramian(jacobian @ jacobian.T)


def _exact_min_norm(gram: np.ndarray) -> np.ndarray:
    """Independent solver: the simplex-constrained QP ``min wᵀ G w``, ``Σ w = 1``, ``w ≥ 0`` with quadprog."""
    num_tasks = gram.shape[0]
    matrix = gram / np.trace(gram) + 1e-12 * np.eye(num_tasks)
    constraints = np.hstack([np.ones((num_tasks, 1)), np.eye(num_tasks)])
    bounds = np.concatenate([[1.0], np.zeros(num_tasks)])
    return quadprog.solve_qp(matrix, np.zeros(num_tasks), constraints, bounds, meq=1)[0]


@pytest.mark.parametrize("index", range(10))
def test_minimum_norm_in_convex_hull_matches_exact_qp(index: int) -> None:
    jacobian = random_jacobians()[index]
    weights = _weights(get_method("mgda"), jacobian)
    assert torch.all(weights >= 0) and torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    exact = torch.from_numpy(_exact_min_norm((jacobian @ jacobian.T).numpy()))
    update, best = weights @ jacobian, exact @ jacobian
    assert update.norm() ** 2 <= best.norm() ** 2 * (1 + 1e-9) + 1e-15
    torch.testing.assert_close(update, best, rtol=1e-6, atol=1e-8 * jacobian.norm().item())


@pytest.mark.parametrize("index", range(10))
def test_equal_inner_products_for_active_tasks(index: int) -> None:
    """KKT of the min-norm problem: d·g_i ≥ ||d||² for all i, with equality where w_i > 0."""
    jacobian = random_jacobians()[index]
    weights = _weights(get_method("mgda"), jacobian)
    update = weights @ jacobian
    inner = jacobian @ update
    squared_norm = update @ update
    scale = (jacobian @ jacobian.T).trace()
    assert torch.all(inner >= squared_norm - 1e-10 * scale)
    active = weights > 1e-8
    torch.testing.assert_close(inner[active], squared_norm.expand(int(active.sum())), rtol=1e-8, atol=1e-10 * scale)


def test_two_task_closed_form_on_a_grid() -> None:
    """K = 2: w_1 = clip((g_2 - g_1)·g_2 / ||g_1 - g_2||², 0, 1), also the argmin of a fine grid."""
    generator = torch.Generator().manual_seed(3)
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for _ in range(8):
        jacobian = torch.randn(2, 12, generator=generator, dtype=torch.float64) + torch.randn(
            12, generator=generator, dtype=torch.float64
        )
        g1, g2 = jacobian
        gamma = ((g2 - g1) @ g2 / (g1 - g2).norm() ** 2).clamp(0, 1)
        weights = _weights(get_method("mgda"), jacobian)
        torch.testing.assert_close(weights, torch.stack([gamma, 1 - gamma]), rtol=0, atol=1e-12)
        norms = (grid[:, None] * g1 + (1 - grid[:, None]) * g2).norm(dim=1)
        assert abs(grid[norms.argmin()] - gamma) <= 1e-5


@pytest.mark.parametrize(
    ("rows", "expected_weights", "expected_update"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], [0.5, 0.5]),
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2], [0.8, 0.4]),
        # the paper's clip to [0, 1] (not the reference's [0.001, 0.999]): g_1 is dominated
        ([[1.0, 0.0], [2.0, 0.0]], [1.0, 0.0], [1.0, 0.0]),
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, 0.5, 0.0], [0.5, 0.5]),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]),
        ([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], [0.5, 0.5, 0.0], [0.0, 0.0]),  # Pareto-stationary
        # TorchJD's docstring example
        ([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], [0.6, 0.4], [0.0, 1.0, 1.0]),
    ],
)
def test_worked_examples(rows, expected_weights, expected_update) -> None:
    jacobian = torch.tensor(rows)
    method = get_method("mgda")
    update = method.aggregate(jacobian)
    torch.testing.assert_close(method.last_weights, torch.tensor(expected_weights), rtol=0, atol=1e-6)
    torch.testing.assert_close(update, torch.tensor(expected_update), rtol=0, atol=1e-6)


def test_single_task_returns_the_row() -> None:
    row = torch.randn(1, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_method("mgda").aggregate(row), row[0])


@pytest.mark.parametrize("index", [1, 2, 3, 6, 7])
def test_permuting_rows_permutes_weights_and_keeps_the_update(index: int) -> None:
    jacobian = random_jacobians()[index]
    method = get_method("mgda")
    weights = _weights(method, jacobian)
    for permutation in row_permutations(jacobian.shape[0], 6):
        permuted = _weights(method, jacobian[permutation])
        torch.testing.assert_close(permuted @ jacobian[permutation], weights @ jacobian, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(permuted, weights[permutation], rtol=0, atol=1e-8)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1e3, 1e8])
def test_global_scale_scales_the_update(scale: float) -> None:
    for jacobian in random_jacobians(6, seed=1):
        method = get_method("mgda")
        torch.testing.assert_close(
            _weights(method, jacobian * scale) @ (jacobian * scale), scale * (_weights(method, jacobian) @ jacobian)
        )


def test_degenerate_inputs() -> None:
    row = torch.tensor([[3.0, -1.0, 2.0]])
    method = get_method("mgda")
    # identical rows: any weights, the update is the row
    torch.testing.assert_close(method.aggregate(row.repeat(3, 1)), row[0])
    # a zero row is in the hull: zero update
    assert torch.equal(method.aggregate(torch.cat([row, -row + 1, torch.zeros(1, 3)])), torch.zeros(3))
    # all-zero matrix: uniform weights, zero update
    assert torch.equal(method.aggregate(torch.zeros(3, 4)), torch.zeros(4))
    torch.testing.assert_close(method.last_weights, torch.full((3,), 1 / 3))


def test_solver_reports_reference_iterations_and_finishes_exactly() -> None:
    """The reference iteration alone stops early; the active-set finish makes the point exact."""
    for jacobian in random_jacobians(12, seed=2):
        if jacobian.shape[0] < 3:
            continue
        gram = (jacobian @ jacobian.T).numpy()
        for max_iter in (0, 1, 250):
            weights, iterations = min_norm_weights(gram, max_iter=max_iter)
            assert iterations <= max_iter
            np.testing.assert_allclose(
                weights @ gram @ weights, (lambda w: w @ gram @ w)(_exact_min_norm(gram)), rtol=1e-9
            )


def test_l2_normalization_weights_normalised_rows_and_updates_raw_rows() -> None:
    jacobian = random_jacobians()[5]
    norms = jacobian.norm(dim=1)
    method = get_method("mgda", normalization="l2")
    weights = _weights(method, jacobian)
    # the weights are plain MGDA's on the unit rows ...
    torch.testing.assert_close(weights, _weights(get_method("mgda"), jacobian / norms[:, None]), rtol=0, atol=1e-9)
    # ... applied to the raw rows (the original training script backpropagates Σ w_i L_i)
    update = method.aggregate(jacobian.float())
    torch.testing.assert_close(update, (weights @ jacobian).float(), rtol=1e-4, atol=1e-5)
    # invariant to rescaling a task
    rescaled = jacobian * torch.tensor([10.0] + [1.0] * (jacobian.shape[0] - 1), dtype=torch.float64)[:, None]
    torch.testing.assert_close(_weights(method, rescaled), weights, rtol=0, atol=1e-9)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_loss_normalizations(normalization: str) -> None:
    jacobian = random_jacobians()[6]
    losses = torch.linspace(0.5, 2.0, jacobian.shape[0], dtype=torch.float64)
    divisor = losses if normalization == "loss" else losses * jacobian.norm(dim=1)
    method = get_method("mgda", normalization=normalization)
    weights = method.weights_from_gramian(jacobian @ jacobian.T, losses=losses)
    torch.testing.assert_close(weights, _weights(get_method("mgda"), jacobian / divisor[:, None]), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="`losses`"):
        method.aggregate(jacobian)
    with pytest.raises(ValueError, match="non-negative `losses`"):
        method.aggregate(jacobian, losses=-losses)
    with pytest.raises(ValueError, match="`losses` must have"):
        method.aggregate(jacobian, losses=losses[:1])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"`normalization` must be one of \['none', 'l2', 'loss', 'loss\+'\]"):
        get_method("mgda", normalization="norm")
    with pytest.raises(ValueError, match="`tol`"):
        get_method("mgda", tol=0.0)
    with pytest.raises(ValueError, match="`max_iter`"):
        get_method("mgda", max_iter=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(bad: float) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    assert_non_finite_input_propagates(get_method("mgda"), bad)

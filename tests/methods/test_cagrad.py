"""CAGrad (docs/methods.md): max_d min_i ⟨g_i, d⟩ subject to ||d - g₀|| ≤ c ||g₀||, via its dual."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hf_mtl.methods import get_method

from ._helpers import assert_non_finite_input_propagates, random_jacobians, row_permutations

C = 0.4


def _update(method, jacobian: torch.Tensor) -> torch.Tensor:
    """The update from the exact float64 Gramian (``aggregate`` forms it in float32)."""
    return method.weights_from_gramian(jacobian @ jacobian.T) @ jacobian


def _dual_objective(jacobian: np.ndarray, weights: np.ndarray, c: float = C) -> np.ndarray:
    """``g_wᵀ g₀ + c ||g₀|| ||g_w||`` for each row of ``weights``."""
    mean = jacobian.mean(axis=0)
    combined = weights @ jacobian
    return combined @ mean + c * np.linalg.norm(mean) * np.linalg.norm(combined, axis=-1)


def _primal_solution(jacobian: np.ndarray, c: float = C) -> np.ndarray:
    """Independent solver: the primal ``max t`` s.t. ``J d ≥ t``, ``||d - g₀||² ≤ c² ||g₀||²`` in parameter
    space, with SLSQP (smooth constraints, no square root)."""
    num_tasks, num_params = jacobian.shape
    mean = jacobian.mean(axis=0)
    radius_sq = (c * np.linalg.norm(mean)) ** 2
    constraints = [
        {
            "type": "ineq",
            "fun": lambda x: jacobian @ x[:num_params] - x[num_params],
            "jac": lambda x: np.hstack([jacobian, -np.ones((num_tasks, 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda x: radius_sq - np.sum((x[:num_params] - mean) ** 2),
            "jac": lambda x: np.concatenate([-2 * (x[:num_params] - mean), [0.0]]),
        },
    ]
    start = np.concatenate([mean, [(jacobian @ mean).min()]])
    result = minimize(
        lambda x: -x[num_params],
        start,
        jac=lambda x: np.concatenate([np.zeros(num_params), [-1.0]]),
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x[:num_params]


@pytest.mark.parametrize("index", range(8))
def test_constraint_holds_and_primal_matches_an_independent_solver(index: int) -> None:
    jacobian = random_jacobians()[index]
    method = get_method("cagrad")
    unscaled = _update(method, jacobian) * (1 + C**2)  # d₀, before the 1/(1+c²) rescale
    mean = jacobian.mean(dim=0)
    # d₀ lies on the ball's boundary (the constraint is active at the optimum)
    torch.testing.assert_close((unscaled - mean).norm(), C * mean.norm(), rtol=1e-10, atol=0)
    primal = torch.from_numpy(_primal_solution(jacobian.numpy()))
    assert (primal - mean).norm() <= C * mean.norm() * (1 + 1e-6)
    # CAGrad's d₀ is at least as good as the independent primal optimum, and is the same point
    worst, best = (jacobian @ unscaled).min(), (jacobian @ primal).min()
    assert worst >= best - 1e-6 * mean.norm() ** 2
    torch.testing.assert_close(unscaled, primal, rtol=0, atol=1e-5 * mean.norm().item())


@pytest.mark.parametrize("index", range(10))
def test_equal_inner_products_for_the_tasks_the_dual_uses(index: int) -> None:
    jacobian = random_jacobians()[index]
    method = get_method("cagrad")
    dual = method.dual_weights(jacobian @ jacobian.T)
    inner = jacobian @ (_update(method, jacobian) * (1 + C**2))
    active = dual > 1e-6
    scale = jacobian.mean(dim=0).norm() ** 2
    torch.testing.assert_close(
        inner[active], inner[active].min().expand(int(active.sum())), rtol=0, atol=1e-5 * scale.item()
    )
    assert torch.all(inner >= inner[active].min() - 1e-5 * scale)  # the tasks left out improve more


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_dual_weights_are_optimal_against_a_simplex_grid(num_tasks: int) -> None:
    generator = torch.Generator().manual_seed(num_tasks)
    step = 1e-4 if num_tasks == 2 else 2e-3
    ticks = np.arange(0.0, 1.0 + step / 2, step)
    if num_tasks == 2:
        grid = np.stack([ticks, 1 - ticks], axis=1)
    else:
        first, second = np.meshgrid(ticks, ticks, indexing="ij")
        keep = first + second <= 1 + 1e-12
        grid = np.stack([first[keep], second[keep], np.clip(1 - first[keep] - second[keep], 0, None)], axis=1)
    method = get_method("cagrad")
    for _ in range(6):
        jacobian = (
            torch.randn(num_tasks, 15, generator=generator, dtype=torch.float64)
            * torch.rand(num_tasks, 1, generator=generator, dtype=torch.float64)
            * 3
            + torch.randn(15, generator=generator, dtype=torch.float64) * 0.3
        )
        dual = method.dual_weights(jacobian @ jacobian.T).numpy()
        assert np.all(dual >= 0) and np.isclose(dual.sum(), 1.0)
        values = _dual_objective(jacobian.numpy(), grid)
        solved = _dual_objective(jacobian.numpy(), dual[None])[0]
        assert solved <= values.min() + 1e-9 * abs(values.min())
        # and the grid's best point is next to it
        assert np.abs(grid[values.argmin()] - dual).max() <= 2 * step


def test_orthogonal_unit_rows_worked_by_hand() -> None:
    """g = e₁, e₂: w* = (½, ½) by symmetry and g_w = g₀, so d₀ = (1 + c) g₀, d = (1 + c) / (1 + c²) g₀."""
    jacobian = torch.eye(2)
    method = get_method("cagrad")
    update = method.aggregate(jacobian)
    torch.testing.assert_close(method.dual_weights(jacobian @ jacobian.T), torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(update, torch.full((2,), 0.5 * (1 + C) / (1 + C**2)))
    torch.testing.assert_close(method.last_weights, torch.full((2,), 0.5 * (1 + C) / (1 + C**2)))


def test_torchjd_golden_value() -> None:
    """TorchJD's docstring example: ``CAGrad(c=0.5)``, no rescale."""
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    update = get_method("cagrad", c=0.5, rescale=0).aggregate(jacobian)
    torch.testing.assert_close(update, torch.tensor([0.1835, 1.2041, 1.2041]), rtol=0, atol=1e-4)


def test_single_task_and_zero_radius() -> None:
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_method("cagrad").aggregate(row), row[0] * (1 + C) / (1 + C**2))
    jacobian = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(get_method("cagrad", c=0.0).aggregate(jacobian), jacobian.mean(dim=0))


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1 + C**2), (2, 1 + C)])
def test_rescale_options(rescale: int, divisor: float) -> None:
    jacobian = random_jacobians()[3]
    base = _update(get_method("cagrad", rescale=0), jacobian)
    torch.testing.assert_close(_update(get_method("cagrad", rescale=rescale), jacobian), base / divisor)


def test_permuting_rows_keeps_the_update() -> None:
    method = get_method("cagrad")
    for jacobian in random_jacobians(8, seed=1):
        update = _update(method, jacobian)
        for permutation in row_permutations(jacobian.shape[0], 4):
            permuted = _update(method, jacobian[permutation])
            torch.testing.assert_close(permuted, update, rtol=0, atol=1e-6 * update.norm().item())


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_global_scale_scales_the_update(scale: float) -> None:
    method = get_method("cagrad")
    for jacobian in random_jacobians(6, seed=2):
        expected = scale * _update(method, jacobian)
        torch.testing.assert_close(
            _update(method, jacobian * scale), expected, rtol=0, atol=1e-6 * expected.norm().item()
        )


def test_degenerate_inputs() -> None:
    row = torch.tensor([[1.0, 2.0, -1.0]])
    method = get_method("cagrad")
    # opposite rows: g₀ = 0, the ball is a point
    assert torch.equal(method.aggregate(torch.cat([row, -row])), torch.zeros(3))
    # identical rows: the same as one task
    torch.testing.assert_close(method.aggregate(row.repeat(3, 1)), row[0] * (1 + C) / (1 + C**2))
    # 0 in the hull with g₀ ≠ 0 (opposite pair plus a third row): g_w* = 0, the update falls back to g₀
    third = torch.tensor([[0.0, 1.0, 2.0]])
    torch.testing.assert_close(method.aggregate(torch.cat([row, -row, third])), third[0] / 3 / (1 + C**2))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"`rescale` must be one of \[0, 1, 2\]"):
        get_method("cagrad", rescale=3)
    with pytest.raises(ValueError, match="`c` must be >= 0"):
        get_method("cagrad", c=-0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(bad: float) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    assert_non_finite_input_propagates(get_method("cagrad"), bad)

"""DualProj (TorchJD; GEM Eq. 11): the mean of the rows projected onto the dual cone {x : J x ≥ 0}."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import quadprog
import torch

from hf_mtl.methods import get_method


def _random_jacobians(count: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Seeded float64 matrices, K = 2..5, P in [10, 50], with a shared component and unequal scales."""
    generator = torch.Generator().manual_seed(seed)
    jacobians = []
    for index in range(count):
        num_tasks = 2 + index % 4
        num_params = int(torch.randint(10, 51, (1,), generator=generator))
        scales = torch.logspace(-1, 1, num_tasks, dtype=torch.float64)[torch.randperm(num_tasks, generator=generator)]
        rows = torch.randn(num_tasks, num_params, generator=generator, dtype=torch.float64) * scales[:, None]
        shared = torch.randn(num_params, generator=generator, dtype=torch.float64) * float(index % 3)
        jacobians.append(rows + shared)
    return jacobians


def _weights(jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    return get_method("dualproj", **kwargs).weights_from_gramian(jacobian @ jacobian.T)


def _projection_of_the_mean(jacobian: torch.Tensor) -> torch.Tensor:
    """Independent definition: ``argmin_x ||x - g₀||²`` s.t. ``J x ≥ 0``, a P-variable QP (the primal)."""
    matrix = jacobian.numpy()
    num_params = matrix.shape[1]
    solution = quadprog.solve_qp(np.eye(num_params), matrix.mean(axis=0), matrix.T.copy(), np.zeros(matrix.shape[0]))[0]
    return torch.from_numpy(solution)


@pytest.mark.parametrize("index", range(10))
def test_update_is_in_the_dual_cone(index: int) -> None:
    jacobian = _random_jacobians()[index]
    trace = (jacobian @ jacobian.T).trace()
    weights = _weights(jacobian)
    # default regularisation: d·g_i ≥ -reg_eps · trace(G) · v_i
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-4 * trace * weights - 1e-12 * trace)
    weights = _weights(jacobian, regularization="per_task")
    norms = jacobian.norm(dim=1)
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-4 * norms**2 * weights - 1e-12 * trace)
    weights = _weights(jacobian, reg_eps=1e-12)
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-9 * trace)


@pytest.mark.parametrize("index", range(10))
def test_update_is_the_projection_of_the_mean(index: int) -> None:
    jacobian = _random_jacobians()[index]
    expected = _projection_of_the_mean(jacobian)
    scale = jacobian.norm().item()
    for regularization in ("trace", "per_task"):
        update = _weights(jacobian, reg_eps=1e-12, regularization=regularization) @ jacobian
        torch.testing.assert_close(update, expected, rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(
        _weights(jacobian, regularization="per_task") @ jacobian, expected, rtol=0, atol=1e-3 * scale
    )
    # it is the closest point of the cone: closer to g₀ than any other feasible point we can name
    mean = jacobian.mean(dim=0)
    update = _weights(jacobian, reg_eps=1e-12) @ jacobian
    for other in (expected, torch.zeros_like(mean)):
        assert (update - mean).norm() <= (other - mean).norm() + 1e-9 * scale


def test_mean_without_conflict_is_kept() -> None:
    generator = torch.Generator().manual_seed(1)
    for num_tasks in (2, 3, 5):
        jacobian = torch.rand(num_tasks, 20, generator=generator, dtype=torch.float64)  # non-negative: no conflict
        torch.testing.assert_close(
            _weights(jacobian, reg_eps=1e-12), torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
        )


def test_worked_examples() -> None:
    # TorchJD's docstring example
    update = get_method("dualproj").aggregate(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    torch.testing.assert_close(update, torch.tensor([0.5563, 1.1109, 1.1109]), rtol=0, atol=1e-4)
    # by hand: g1 = (1, 0), g2 = (-3, 1): g₀ = (-1, 1/2) conflicts with g1 only, so d = g₀ projected onto
    # g1·x = 0, i.e. (0, 1/2), which does not conflict with g2
    jacobian = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        _weights(jacobian, reg_eps=1e-12) @ jacobian, torch.tensor([0.0, 0.5], dtype=torch.float64)
    )


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
@pytest.mark.parametrize("scale", [1e-1, 1e3, 1e6])
def test_global_scale_scales_the_update(scale: float, regularization: str) -> None:
    for jacobian in _random_jacobians(8, seed=2):
        expected = scale * (_weights(jacobian, regularization=regularization) @ jacobian)
        scaled = _weights(jacobian * scale, regularization=regularization) @ (jacobian * scale)
        torch.testing.assert_close(scaled, expected, rtol=1e-9, atol=1e-12 * expected.norm().item())


def test_below_norm_eps_the_update_is_the_mean() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64) * 1e-3  # trace 1.1e-5 < 1e-4
    torch.testing.assert_close(_weights(jacobian), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(
        _weights(jacobian, norm_eps=0.0, reg_eps=1e-12) @ jacobian, torch.tensor([0.0, 5e-4], dtype=torch.float64)
    )


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
def test_single_task_returns_the_row(regularization: str) -> None:
    row = torch.randn(1, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_method("dualproj", regularization=regularization).aggregate(row), row[0])


def test_permuting_rows_keeps_the_update() -> None:
    for jacobian in _random_jacobians(8, seed=3):
        update = _weights(jacobian) @ jacobian
        for permutation in itertools.islice(itertools.permutations(range(jacobian.shape[0])), 1, 5):
            permuted = _weights(jacobian[list(permutation)]) @ jacobian[list(permutation)]
            torch.testing.assert_close(permuted, update, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
def test_degenerate_inputs(regularization: str) -> None:
    row = torch.tensor([[1.0, 2.0, -1.0]])
    method = get_method("dualproj", regularization=regularization)
    assert torch.equal(method.aggregate(torch.cat([row, -row])), torch.zeros(3))  # the mean is 0
    torch.testing.assert_close(method.aggregate(row.repeat(3, 1)), row[0])
    torch.testing.assert_close(method.aggregate(torch.cat([row, torch.zeros(1, 3)])), row[0] / 2)
    assert torch.equal(method.aggregate(torch.zeros(2, 4)), torch.zeros(4))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="`reg_eps` must be > 0"):
        get_method("dualproj", reg_eps=0.0)
    with pytest.raises(ValueError, match=r"`regularization` must be one of \['trace', 'per_task'\]"):
        get_method("dualproj", regularization="identity")


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(bad: float, regularization: str) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    jacobian[1, 2] = bad
    update = get_method("dualproj", regularization=regularization).aggregate(jacobian)
    assert not torch.isfinite(update[2]) and torch.isfinite(update[[0, 1, 3, 4]]).all()

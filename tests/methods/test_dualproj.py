"""DualProj (TorchJD; GEM Eq. 11): the mean of the rows projected onto the dual cone {x : J x ≥ 0}.

The properties DualProj shares with UPGrad (no conflict, scale, permutations, K = 1, arguments,
non-finite input) are tested for both in ``test_dual_cone.py``."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import project_onto_dual_cone, random_jacobians


def _weights(jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    return get_method("dualproj", **kwargs).weights_from_gramian(jacobian @ jacobian.T)


def _projection_of_the_mean(jacobian: torch.Tensor) -> torch.Tensor:
    """Independent definition: ``argmin_x ||x - g₀||²`` s.t. ``J x ≥ 0``, a P-variable QP (the primal)."""
    matrix = jacobian.numpy()
    return torch.from_numpy(project_onto_dual_cone(matrix, matrix.mean(axis=0)))


@pytest.mark.parametrize("index", range(10))
def test_update_is_the_projection_of_the_mean(index: int) -> None:
    jacobian = random_jacobians()[index]
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


def test_below_norm_eps_the_update_is_the_mean() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64) * 1e-3  # trace 1.1e-5 < 1e-4
    torch.testing.assert_close(_weights(jacobian), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(
        _weights(jacobian, norm_eps=0.0, reg_eps=1e-12) @ jacobian, torch.tensor([0.0, 5e-4], dtype=torch.float64)
    )


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
def test_degenerate_inputs(regularization: str) -> None:
    row = torch.tensor([[1.0, 2.0, -1.0]])
    method = get_method("dualproj", regularization=regularization)
    assert torch.equal(method.aggregate(torch.cat([row, -row])), torch.zeros(3))  # the mean is 0
    torch.testing.assert_close(method.aggregate(row.repeat(3, 1)), row[0])
    torch.testing.assert_close(method.aggregate(torch.cat([row, torch.zeros(1, 3)])), row[0] / 2)
    assert torch.equal(method.aggregate(torch.zeros(2, 4)), torch.zeros(4))

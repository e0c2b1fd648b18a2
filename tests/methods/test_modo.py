"""MoDo (LibMTL ``MoDo.py``) and the simplex helpers it shares with SDMGrad and MoCo."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method
from hf_mtl.methods._simplex import project_onto_simplex


def libmtl_projection2simplex(y: torch.Tensor) -> torch.Tensor:
    """LibMTL's ``MoDo._projection2simplex``, line by line."""
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum = 0.0
    tmax_f = (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.max(y - tmax_f, torch.zeros(m, dtype=y.dtype))


def test_projection_onto_simplex() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 3, 7):
        for scale in (0.1, 1.0, 30.0):
            vector = torch.randn(size, generator=generator, dtype=torch.float64) * scale
            projected = project_onto_simplex(vector)
            assert (projected >= 0).all() and torch.isclose(projected.sum(), torch.tensor(1.0, dtype=torch.float64))
            assert torch.allclose(projected, libmtl_projection2simplex(vector))
            # the projection's characterisation: (v - p) · (u - p) <= 0 for every u in the simplex
            others = torch.distributions.Dirichlet(torch.ones(size, dtype=torch.float64)).sample((20,))
            assert ((others - projected) @ (vector - projected) <= 1e-12).all()


def test_matches_libmtl_loop_with_one_jacobian() -> None:
    generator = torch.Generator().manual_seed(1)
    gamma, rho = 0.05, 0.1
    method = get_method("modo", gamma=gamma, rho=rho)
    lambd = torch.full((4,), 0.25, dtype=torch.float64)
    for _ in range(6):
        jacobian = torch.randn(4, 9, generator=generator, dtype=torch.float64)
        grads = torch.stack([jacobian, jacobian, jacobian])  # LibMTL's three samples, here one Jacobian
        lambd = libmtl_projection2simplex(
            lambd - gamma * (grads[0] @ (torch.transpose(grads[1], 0, 1) @ lambd) + rho * lambd)
        )
        update = method.aggregate(jacobian)
        assert torch.allclose(method.last_weights.double(), lambd, atol=1e-6)
        assert torch.allclose(update, lambd @ grads[2], atol=1e-5)


def test_cross_gramian_of_two_batches() -> None:
    generator = torch.Generator().manual_seed(2)
    first, second = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    method = get_method("modo", gamma=0.1, rho=0.0)
    weights = method.weights_from_gramian(first @ second.T)
    expected = libmtl_projection2simplex(torch.full((3,), 1 / 3) - 0.1 * (first @ (second.T @ torch.full((3,), 1 / 3))))
    assert torch.allclose(weights, expected, atol=1e-6)


def test_tracks_the_min_norm_weights() -> None:
    # on a fixed J, the iterates converge to MGDA's min-norm point; for two rows it has a closed form
    g1, g2 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([-1.0, 1.5, 0.5])
    closed_form = float(((g2 - g1) @ g2) / (g1 - g2).norm() ** 2)
    method = get_method("modo", gamma=0.05, rho=0.0)
    for _ in range(500):
        method.aggregate(torch.stack([g1, g2]))
    assert torch.allclose(method.last_weights, torch.tensor([closed_form, 1 - closed_form]), atol=1e-4)


def test_subset_keeps_absent_share_and_round_trips_without_num_tasks() -> None:
    method = get_method("modo", num_tasks=3, gamma=0.5)
    method.aggregate(torch.eye(3))
    before = method.task_weights.clone()
    method.aggregate(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), task_ids=torch.tensor([0, 2]))
    assert method.task_weights[1] == before[1]
    assert torch.isclose(method.task_weights.sum(), torch.tensor(1.0, dtype=torch.float64))

    lazy = get_method("modo")
    lazy.aggregate(torch.eye(2))
    restored = get_method("modo")
    restored.load_state_dict(lazy.state_dict())
    assert restored.num_tasks == 2
    assert torch.equal(lazy.aggregate(torch.eye(2)), restored.aggregate(torch.eye(2)))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`gamma`"):
        get_method("modo", gamma=0.0)
    with pytest.raises(ValueError, match="`rho`"):
        get_method("modo", rho=-1.0)
    with pytest.raises(ValueError, match="`num_tasks`"):
        get_method("modo").aggregate(torch.eye(2), task_ids=torch.tensor([0, 1]))

"""UPGrad (docs/methods.md): the mean of the rows projected onto the dual cone {x : J x ≥ 0}.

The properties UPGrad shares with DualProj (no conflict, scale, permutations, K = 1, arguments,
non-finite input) are tested for both in ``test_dual_cone.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import project_onto_dual_cone, random_jacobians


def _weights(jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    return get_method("upgrad", **kwargs).weights_from_gramian(jacobian @ jacobian.T)


def _definition(jacobian: torch.Tensor) -> torch.Tensor:
    """Independent definition: the mean of the rows' projections, each a P-variable QP."""
    matrix = jacobian.numpy()
    return torch.from_numpy(np.mean([project_onto_dual_cone(matrix, row) for row in matrix], axis=0))


@pytest.mark.parametrize("index", range(10))
def test_equals_the_definition_computed_in_parameter_space(index: int) -> None:
    jacobian = random_jacobians()[index]
    expected = _definition(jacobian)
    scale = jacobian.norm().item()
    for regularization in ("trace", "per_task"):
        torch.testing.assert_close(
            _weights(jacobian, reg_eps=1e-12, regularization=regularization) @ jacobian,
            expected,
            rtol=0,
            atol=1e-7 * scale,
        )
    # per-task regularisation with the default reg_eps moves the update by ~1e-4 relative
    torch.testing.assert_close(
        _weights(jacobian, regularization="per_task") @ jacobian, expected, rtol=0, atol=1e-3 * scale
    )


def test_default_trace_regularisation_can_conflict_with_a_small_task() -> None:
    """Pins the documented caveat of TorchJD's ``G / trace + 1e-4 I``: a task whose gradient is ~1 % of
    the other's is conflicted; ``regularization="per_task"`` is not."""
    jacobian = random_jacobians()[0]
    norms = jacobian.norm(dim=1)
    assert norms.max() / norms.min() > 50
    cosines = {}
    for regularization in ("trace", "per_task"):
        update = _weights(jacobian, regularization=regularization) @ jacobian
        cosines[regularization] = ((jacobian @ update) / norms / update.norm()).min()
    assert cosines["trace"] < -0.05
    assert cosines["per_task"] >= -1e-6


def test_per_task_regularisation_keeps_small_tasks_unconflicted() -> None:
    """Row norms spread over 1e-3..1e3: the per-task variant conflicts with no task, at any spread."""
    generator = torch.Generator().manual_seed(6)
    for jacobian in random_jacobians(8, seed=4):
        task_scales = 10 ** (6 * torch.rand(jacobian.shape[0], generator=generator, dtype=torch.float64) - 3)
        scaled = jacobian * task_scales[:, None]
        weights = _weights(scaled, regularization="per_task")
        update = weights @ scaled
        norms = scaled.norm(dim=1)
        # the KKT slack is relative to each task's own squared norm ...
        assert torch.all(scaled @ update >= -1e-4 * norms**2 * weights * (1 + 1e-9))
        # ... so no cosine drops below ~-1e-4, whatever the spread (the trace variant reaches -0.15)
        assert torch.all((scaled @ update) / norms / update.norm() >= -1e-3)


def test_below_norm_eps_the_update_is_the_mean() -> None:
    """TorchJD's ``normalize``: a trace below ``norm_eps`` zeroes the Gramian, so the weights are 1/K."""
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64) * 1e-3  # trace 3e-6 < 1e-4
    torch.testing.assert_close(_weights(jacobian), torch.full((2,), 0.5, dtype=torch.float64))
    # with norm_eps = 0 the projection happens at every scale
    weights = _weights(jacobian, norm_eps=0.0)
    torch.testing.assert_close(weights, _weights(jacobian * 1e6, norm_eps=0.0))
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-4 * (jacobian @ jacobian.T).trace() * weights)


def test_worked_examples() -> None:
    # TorchJD's docstring example
    update = get_method("upgrad").aggregate(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    torch.testing.assert_close(update, torch.tensor([0.2929, 1.9004, 1.9004]), rtol=0, atol=1e-4)
    # by hand: g1 = (1, 0), g2 = (-1, 1). π(g1) = g1 - (g1·g2/||g2||²) g2 = (1/2, 1/2) (conflicts with g2 only);
    # g2 conflicts with g1, π(g2) = (0, 1). d = mean = (1/4, 3/4).
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        _weights(jacobian, reg_eps=1e-12) @ jacobian, torch.tensor([0.25, 0.75], dtype=torch.float64)
    )


@pytest.mark.parametrize("regularization", ["trace", "per_task"])
def test_degenerate_inputs(regularization: str) -> None:
    row = torch.tensor([[1.0, 2.0, -1.0]])
    method = get_method("upgrad", regularization=regularization)
    # opposite rows: the dual cone is the hyperplane g·x = 0 and both projections are 0
    torch.testing.assert_close(method.aggregate(torch.cat([row, -row])), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(method.aggregate(row.repeat(3, 1)), row[0], rtol=1e-3, atol=0)
    assert torch.equal(method.aggregate(torch.zeros(2, 4)), torch.zeros(4))

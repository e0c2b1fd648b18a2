"""UPGrad and DualProj (docs/methods.md, "UPGrad"): the properties they share as projections onto the
dual cone {x : J x ≥ 0} with the same preprocessing (``hf_mtl/methods/_dual_cone.py``). Each method's
own definition, worked examples and caveats are in ``test_upgrad.py`` and ``test_dualproj.py``."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import assert_non_finite_input_propagates, random_jacobians, row_permutations

NAMES = ["upgrad", "dualproj"]


def _weights(name: str, jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    return get_method(name, **kwargs).weights_from_gramian(jacobian @ jacobian.T)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("index", range(10))
def test_no_task_conflicts_with_the_update(name: str, index: int) -> None:
    jacobian = random_jacobians()[index]
    trace = (jacobian @ jacobian.T).trace()
    # default regularisation: d·g_i ≥ -reg_eps · trace(G) · w_i (the QP's KKT conditions)
    weights = _weights(name, jacobian)
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-4 * trace * weights - 1e-12 * trace)
    # tiny regularisation: no conflict up to rounding
    weights = _weights(name, jacobian, reg_eps=1e-12)
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-9 * trace)
    # per-task regularisation: d·g_i ≥ -reg_eps ||g_i|| y_i with y_i = ||g_i|| w_i, a slack relative to each task
    weights = _weights(name, jacobian, regularization="per_task")
    norms = jacobian.norm(dim=1)
    assert torch.all(jacobian @ (weights @ jacobian) >= -1e-4 * norms**2 * weights - 1e-12 * trace)


@pytest.mark.parametrize("name", NAMES)
def test_rows_without_conflict_give_the_mean(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    for num_tasks in (2, 3, 5):
        jacobian = torch.rand(num_tasks, 20, generator=generator, dtype=torch.float64)  # non-negative: no conflict
        torch.testing.assert_close(
            _weights(name, jacobian, reg_eps=1e-12), torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
        )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("regularization", ["trace", "per_task"])
@pytest.mark.parametrize("scale", [1e-1, 1e3, 1e6])
def test_global_scale_scales_the_update(name: str, scale: float, regularization: str) -> None:
    for jacobian in random_jacobians(8, seed=2):
        expected = scale * (_weights(name, jacobian, regularization=regularization) @ jacobian)
        scaled = _weights(name, jacobian * scale, regularization=regularization) @ (jacobian * scale)
        torch.testing.assert_close(scaled, expected, rtol=1e-9, atol=1e-12 * expected.norm().item())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("regularization", ["trace", "per_task"])
def test_single_task_returns_the_row(name: str, regularization: str) -> None:
    row = torch.randn(1, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_method(name, regularization=regularization).aggregate(row), row[0])


@pytest.mark.parametrize("name", NAMES)
def test_permuting_rows_keeps_the_update(name: str) -> None:
    for jacobian in random_jacobians(8, seed=3):
        update = _weights(name, jacobian) @ jacobian
        for permutation in row_permutations(jacobian.shape[0], 5):
            permuted = _weights(name, jacobian[permutation]) @ jacobian[permutation]
            torch.testing.assert_close(permuted, update, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_arguments(name: str) -> None:
    with pytest.raises(ValueError, match="`reg_eps` must be > 0"):
        get_method(name, reg_eps=0.0)
    with pytest.raises(ValueError, match="`norm_eps` must be >= 0"):
        get_method(name, norm_eps=-1.0)
    with pytest.raises(ValueError, match=r"`regularization` must be one of \['trace', 'per_task'\]"):
        get_method(name, regularization="identity")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("regularization", ["trace", "per_task"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(name: str, bad: float, regularization: str) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    assert_non_finite_input_propagates(get_method(name, regularization=regularization), bad)

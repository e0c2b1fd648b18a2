"""ConFIG (docs/methods.md, "ConFIG"): equal cosines with every task, the projection length rule."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def _config(jacobian: torch.Tensor) -> torch.Tensor:
    return get_method("config").weights_from_gramian(jacobian @ jacobian.T) @ jacobian


def _cosines(update: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    return jacobian @ update / (jacobian.norm(dim=1) * update.norm())


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_equal_cosine_with_every_task(num_tasks: int) -> None:
    generator = torch.Generator().manual_seed(num_tasks)
    for _ in range(10):
        jacobian = torch.randn(num_tasks, 10, generator=generator, dtype=torch.float64)
        cosines = _cosines(_config(jacobian), jacobian)
        torch.testing.assert_close(cosines, cosines.mean().expand(num_tasks))
        assert cosines.mean() > 0  # the update helps every task


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_length_is_the_sum_of_the_projections(num_tasks: int) -> None:
    jacobian = torch.randn(num_tasks, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    update = _config(jacobian)
    direction = update / update.norm()
    torch.testing.assert_close(update.norm(), (jacobian @ direction).sum())


def test_two_task_closed_form() -> None:
    # the reference's ConFIG_update_double: b = o1 / (u2·o1) + o2 / (u1·o2), with o1 the unit part of
    # g2 orthogonal to u1 and o2 that of g1 orthogonal to u2 (so that u1·b = u2·b = 1)
    g1, g2 = torch.randn(2, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    o1 = g2 - (g2 @ u1) * u1
    o2 = g1 - (g1 @ u2) * u2
    o1, o2 = o1 / o1.norm(), o2 / o2.norm()
    best = o1 / (u2 @ o1) + o2 / (u1 @ o2)
    unit = best / best.norm()
    expected = (g1 @ unit + g2 @ unit) * unit
    torch.testing.assert_close(_config(torch.stack([g1, g2])), expected)


def test_orthogonal_rows_by_hand() -> None:
    # u = e1, e2: b = (1, 1), b̂ = (1, 1)/√2; projections 3/√2 + 4/√2 -> d = 7/2 (1, 1)
    update = _config(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([3.5, 3.5], dtype=torch.float64))


def test_direction_invariant_to_task_scales_and_length_follows_them() -> None:
    jacobian = torch.randn(3, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    scales = torch.tensor([[1e-3], [1.0], [1e3]], dtype=torch.float64)
    update, scaled = _config(jacobian), _config(scales * jacobian)
    torch.testing.assert_close(scaled / scaled.norm(), update / update.norm())
    torch.testing.assert_close(scaled.norm(), (scales * jacobian @ (update / update.norm())).sum())
    torch.testing.assert_close(_config(4.0 * jacobian), 4.0 * update)  # a common scale: linear


def test_degenerate_rows() -> None:
    # identical rows: b̂ = u, and the projection length is 3 ||g||
    row = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(_config(row.repeat(3, 1)), 3.0 * row[0])
    # opposite rows: no direction has equal positive cosines; the update is 0
    torch.testing.assert_close(_config(torch.cat([row, -row])), torch.zeros(3, dtype=torch.float64))
    # a zero row has no direction and weight 0: the others are combined as without it
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    weights = get_method("config").weights_from_gramian(jacobian @ jacobian.T)
    assert weights[2] == 0
    torch.testing.assert_close(weights @ jacobian, torch.tensor([3.5, 3.5], dtype=torch.float64))


def test_float32_scale_spread() -> None:
    base = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    jacobian = base * torch.tensor([[1e3], [1e-3], [1.0]])
    update = get_method("config").aggregate(jacobian).double()
    cosines = _cosines(update, jacobian.double())
    torch.testing.assert_close(cosines, cosines.mean().expand(3), rtol=1e-4, atol=0)

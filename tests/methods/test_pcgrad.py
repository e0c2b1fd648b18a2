"""PCGrad (docs/methods.md, "PCGrad"): projections worked by hand, and the properties they imply."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import assert_private_generator_resumes


def _pcgrad_reference(jacobian: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad on the rows themselves (LibMTL's loop), drawing the orders as hf_mtl does."""
    rows = jacobian.to(torch.float64)
    projected = rows.clone()
    for i in range(rows.shape[0]):
        for j in torch.randperm(rows.shape[0], generator=generator).tolist():
            inner = projected[i] @ rows[j]
            if inner < 0:
                projected[i] -= inner / (rows[j] @ rows[j]) * rows[j]
    return projected.sum(dim=0)


@pytest.fixture
def fixed_order(monkeypatch: pytest.MonkeyPatch):
    """Replaces the random order by a fixed one (``order`` tasks), for hand-worked examples."""

    def install(order: list[int]) -> None:
        monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: torch.tensor(order[:n]))

    return install


def test_two_tasks_by_hand() -> None:
    # g1·g2 = -1 < 0:  g1 - (-1/2) g2 = (0.5, 0.5),  g2 - (-1/1) g1 = (0, 1),  sum (0.5, 1.5)
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    for seed in range(4):  # with two tasks the order does not matter
        update = get_method("pcgrad").aggregate(jacobian, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(update, torch.tensor([0.5, 1.5]))


def test_two_tasks_closed_form_and_no_conflict_left() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        g1, g2 = torch.randn(2, 6, generator=generator, dtype=torch.float64)
        inner = g1 @ g2
        expected = g1 + g2
        if inner < 0:
            expected = expected - inner * (g1 / (g1 @ g1) + g2 / (g2 @ g2))
        weights = get_method("pcgrad").weights_from_gramian(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T)
        update = weights @ torch.stack([g1, g2])
        torch.testing.assert_close(update, expected)
        # the projected rows no longer conflict, so neither does their sum with either task
        assert update @ g1 >= -1e-12 and update @ g2 >= -1e-12


def test_three_tasks_by_hand_with_a_fixed_order(fixed_order) -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, -2.0], [-2.0, -1.0]])
    # order (1, 2, 3) for every task:
    #   g1: project on g2 (g1·g2 = -2, |g2|² = 8) -> (0.5, -0.5); on g3 (-0.5, |g3|² = 5) -> (0.3, -0.6)
    #   g2: project on g1 (-2) -> (0, -2); then g3 agrees                               -> (0, -2)
    #   g3: project on g1 (-2) -> (0, -1); then g2 agrees                               -> (0, -1)
    fixed_order([0, 1, 2])
    torch.testing.assert_close(get_method("pcgrad").aggregate(jacobian), torch.tensor([0.3, -3.6]))
    # order (3, 2, 1): g1 first meets g3 (-2) -> (0.2, -0.4), which then agrees with g2: the order matters
    fixed_order([2, 1, 0])
    torch.testing.assert_close(get_method("pcgrad").aggregate(jacobian), torch.tensor([0.2, -3.4]))


def test_projects_on_the_original_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    for seed in range(10):
        jacobian = torch.randn(4, 5, generator=generator, dtype=torch.float64)
        weights = get_method("pcgrad").weights_from_gramian(
            jacobian @ jacobian.T, generator=torch.Generator().manual_seed(seed)
        )
        expected = _pcgrad_reference(jacobian, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(weights @ jacobian, expected)


def test_sum_when_nothing_conflicts() -> None:
    jacobian = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(get_method("pcgrad").aggregate(jacobian), jacobian.sum(dim=0))


def test_zero_row_and_opposite_rows() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(get_method("pcgrad").aggregate(jacobian), torch.tensor([1.0, 2.0]))
    # opposite rows: each is projected onto the other's orthogonal complement, i.e. to zero
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    torch.testing.assert_close(get_method("pcgrad").aggregate(opposite), torch.zeros(2))


def test_positively_homogeneous() -> None:
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    update = get_method("pcgrad").aggregate(jacobian, generator=torch.Generator().manual_seed(0))
    scaled = get_method("pcgrad").aggregate(7.0 * jacobian, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled, 7.0 * update)


def test_order_comes_from_the_generator() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, -2.0], [-2.0, -1.0]])
    updates = {
        tuple(get_method("pcgrad").aggregate(jacobian, generator=torch.Generator().manual_seed(s)).tolist())
        for s in range(20)
    }
    assert len(updates) > 1  # the order matters on this example, and the generator chooses it


def test_seeded_generator_survives_a_checkpoint() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, -2.0], [-2.0, -1.0]])
    assert_private_generator_resumes("pcgrad", jacobian, seed=3, restored_seed=99, calls=3, checks=5)


def test_bad_seed() -> None:
    with pytest.raises(ValueError, match="`seed`"):
        get_method("pcgrad", seed="1")

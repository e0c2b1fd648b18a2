"""Krum / Multi-Krum (TorchJD ``KrumWeighting``, Blanchard et al. 2017)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def reference_krum(jacobian: torch.Tensor, n_byzantine: int, n_selected: int) -> torch.Tensor:
    """Krum by its definition, row by row with explicit distances."""
    rows = jacobian.double()
    num_rows = rows.shape[0]
    scores = []
    for i in range(num_rows):
        distances = sorted(float((rows[i] - rows[j]).norm()) for j in range(num_rows) if j != i)
        scores.append(sum(distances[: num_rows - n_byzantine - 2]))
    chosen = sorted(range(num_rows), key=lambda i: scores[i])[:n_selected]
    return rows[chosen].mean(dim=0)


@pytest.mark.parametrize(("n_byzantine", "n_selected"), [(0, 1), (1, 1), (2, 3), (1, 4)])
def test_matches_definition_on_random_matrices(n_byzantine: int, n_selected: int) -> None:
    generator = torch.Generator().manual_seed(n_byzantine * 10 + n_selected)
    method = get_method("krum", n_byzantine=n_byzantine, n_selected=n_selected)
    for _ in range(5):
        jacobian = torch.randn(7, 11, generator=generator, dtype=torch.float64)
        expected = reference_krum(jacobian, n_byzantine, n_selected)
        assert torch.allclose(method.aggregate(jacobian), expected, atol=1e-6)  # J is combined in float32


def test_hand_worked_cluster_and_outlier() -> None:
    # three rows near (1, 0), one far away; each row's score sums its 2 nearest distances:
    # 0.1 + 0.1 for the central row, 0.1 + 0.2 for the two others, > 70 for the outlier
    jacobian = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [50.0, -50.0]])
    method = get_method("krum")
    assert torch.allclose(method.aggregate(jacobian), torch.tensor([1.0, 0.0]))
    assert torch.equal(method.last_weights, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_outliers_cannot_move_the_update() -> None:
    # the property the paper claims: f arbitrary rows do not pull the update out of the honest cluster
    generator = torch.Generator().manual_seed(3)
    honest = 1.0 + 0.05 * torch.randn(6, 20, generator=generator)
    byzantine = 1e6 * torch.randn(2, 20, generator=generator)
    update = get_method("krum", n_byzantine=2, n_selected=3).aggregate(torch.cat([byzantine, honest]))
    assert (update - honest.mean(dim=0)).norm() < 0.5


def test_ties_are_averaged_so_row_order_does_not_matter() -> None:
    row = torch.tensor([[1.0, -2.0, 3.0]])
    assert torch.equal(get_method("krum").aggregate(torch.cat([row, -row])), torch.zeros(3))
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(5, 4, generator=generator)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    method = get_method("krum", n_byzantine=1, n_selected=2)
    assert torch.allclose(method.aggregate(jacobian), method.aggregate(jacobian[permutation]))


def test_too_few_rows_lower_the_byzantine_count() -> None:
    # K = 4 < f + 3 = 5: f is lowered to 1 for this call, i.e. Krum with n_byzantine=1
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(4, 3, generator=generator)
    lowered = get_method("krum", n_byzantine=2).aggregate(jacobian)
    assert torch.allclose(lowered, get_method("krum", n_byzantine=1).aggregate(jacobian))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`n_byzantine`"):
        get_method("krum", n_byzantine=-1)
    with pytest.raises(ValueError, match="`n_selected`"):
        get_method("krum", n_selected=0)

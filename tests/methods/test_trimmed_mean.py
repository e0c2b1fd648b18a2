"""Coordinate-wise trimmed mean (TorchJD ``TrimmedMean``, Yin et al. 2018)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def reference_trimmed_mean(jacobian: torch.Tensor, trim: int) -> torch.Tensor:
    """Column by column: drop the ``trim`` smallest and largest values, average the rest."""
    columns = []
    for column in jacobian.T.tolist():
        kept = sorted(column)[trim : len(column) - trim]
        columns.append(sum(kept) / len(kept))
    return torch.tensor(columns, dtype=jacobian.dtype)


def test_hand_worked() -> None:
    jacobian = torch.tensor([[1.0, 10.0], [2.0, -4.0], [100.0, 0.0], [3.0, 1.0], [-50.0, 2.0]])
    # column 0 sorted: -50 1 2 3 100 -> mean(1, 2, 3) = 2; column 1: -4 0 1 2 10 -> 1
    assert torch.allclose(get_method("trimmed_mean").aggregate(jacobian), torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("trim", [0, 1, 2, 3])
def test_matches_column_loop(trim: int) -> None:
    generator = torch.Generator().manual_seed(trim)
    jacobian = torch.randn(7, 9, generator=generator, dtype=torch.float64)
    update = get_method("trimmed_mean", trim_number=trim).aggregate(jacobian)
    assert torch.allclose(update, reference_trimmed_mean(jacobian, trim))


def test_bounded_by_honest_values_under_outliers() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(5, 8, generator=generator)
    outliers = torch.tensor([[1e8] * 8, [-1e8] * 8])
    update = get_method("trimmed_mean", trim_number=2).aggregate(torch.cat([outliers, honest]))
    assert (update >= honest.min(dim=0).values).all() and (update <= honest.max(dim=0).values).all()


def test_zero_trim_is_the_mean_and_few_rows_lower_the_trim() -> None:
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(4, 3, generator=generator)
    assert torch.allclose(get_method("trimmed_mean", trim_number=0).aggregate(jacobian), jacobian.mean(dim=0))
    # 4 rows, trim 5 -> (4 - 1) // 2 = 1
    assert torch.allclose(
        get_method("trimmed_mean", trim_number=5).aggregate(jacobian), reference_trimmed_mean(jacobian, 1)
    )
    assert torch.allclose(get_method("trimmed_mean").aggregate(jacobian[:2]), jacobian[:2].mean(dim=0))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`trim_number`"):
        get_method("trimmed_mean", trim_number=-1)

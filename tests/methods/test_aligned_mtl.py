"""Aligned-MTL (docs/methods.md, "Aligned-MTL"): the aligned rows are orthogonal with equal norm."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

SCALE_MODES = ["min", "median", "rmse"]


def _scale(eigenvalues: torch.Tensor, mode: str) -> torch.Tensor:
    return {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[mode]


@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_aligned_rows_are_orthogonal_with_equal_norm(mode: str, num_tasks: int) -> None:
    generator = torch.Generator().manual_seed(num_tasks)
    for _ in range(5):
        jacobian = torch.randn(num_tasks, 8, generator=generator, dtype=torch.float64)
        gramian = jacobian @ jacobian.T
        transform = get_method("aligned_mtl", scale_mode=mode).balance_transformation(gramian)
        aligned = transform @ jacobian
        expected = _scale(torch.linalg.eigvalsh(gramian), mode)
        torch.testing.assert_close(aligned @ aligned.T, expected * torch.eye(num_tasks, dtype=torch.float64))


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_update_is_the_sum_of_the_aligned_rows(mode: str) -> None:
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    method = get_method("aligned_mtl", scale_mode=mode)
    weights = method.weights_from_gramian(jacobian @ jacobian.T)
    aligned = method.balance_transformation(jacobian @ jacobian.T) @ jacobian
    torch.testing.assert_close(weights @ jacobian, aligned.sum(dim=0))


def test_two_orthogonal_rows_by_hand() -> None:
    # G = diag(1, 4): "min" scales both to norm 1, "rmse" to sqrt(2.5); the update sums the unit rows
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    minimum = get_method("aligned_mtl").weights_from_gramian(gramian) @ jacobian
    torch.testing.assert_close(minimum, torch.tensor([1.0, 1.0], dtype=torch.float64))
    rmse = get_method("aligned_mtl", scale_mode="rmse").weights_from_gramian(gramian) @ jacobian
    torch.testing.assert_close(rmse, 2.5**0.5 * torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_task_scales_do_not_break_the_alignment(mode: str) -> None:
    # however the tasks are scaled, the aligned system has condition number 1: no task dominates
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scaled = torch.tensor([[30.0], [1.0], [0.1]], dtype=torch.float64) * jacobian
    aligned = get_method("aligned_mtl", scale_mode=mode).balance_transformation(scaled @ scaled.T) @ scaled
    norms = aligned.norm(dim=1)
    torch.testing.assert_close(norms, norms.mean().expand(3))


def test_scale_behaviour() -> None:
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    method = get_method("aligned_mtl")
    update = method.weights_from_gramian(jacobian @ jacobian.T) @ jacobian
    # a common scale c: the transform is unchanged and the update is multiplied by c
    torch.testing.assert_close(
        method.weights_from_gramian(9.0 * jacobian @ jacobian.T) @ (3.0 * jacobian), 3.0 * update
    )
    # orthogonal rows: the direction is Σ u_i whatever the task scales
    orthogonal = torch.linalg.qr(jacobian.T).Q.T * torch.tensor([[5.0], [1.0], [0.2]], dtype=torch.float64)
    direction = method.weights_from_gramian(orthogonal @ orthogonal.T) @ orthogonal
    units = orthogonal / orthogonal.norm(dim=1, keepdim=True)
    torch.testing.assert_close(direction / direction.norm(), units.sum(dim=0) / units.sum(dim=0).norm())


def test_rank_deficient_rows_are_aligned_in_their_span() -> None:
    # rank 2 out of 3 rows: the small eigenvalue is dropped and the aligned Gram matrix is
    # λ_min times the projector onto the range of G
    base = torch.randn(2, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    jacobian = torch.cat([base, base[:1] + base[1:]])
    gramian = jacobian @ jacobian.T
    transform = get_method("aligned_mtl").balance_transformation(gramian)
    aligned = transform @ jacobian
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
    kept = eigenvectors[:, 1:]
    torch.testing.assert_close(aligned @ aligned.T, eigenvalues[1] * kept @ kept.T)


def test_zero_gramian_gives_zero_update() -> None:
    assert torch.equal(get_method("aligned_mtl").aggregate(torch.zeros(2, 4)), torch.zeros(4))


def test_bad_scale_mode() -> None:
    with pytest.raises(ValueError, match="`scale_mode` must be one of"):
        get_method("aligned_mtl", scale_mode="mean")

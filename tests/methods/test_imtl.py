"""IMTL (docs/methods.md, "IMTL"): IMTL-G's equal projections and closed form, IMTL-L's transform."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def _imtl_g(jacobian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, update) of pure IMTL-G in float64."""
    method = get_method("imtl", loss_balancing=False)
    weights = method.weights_from_gramian(jacobian @ jacobian.T)
    return weights, weights @ jacobian


def _closed_form(jacobian: torch.Tensor) -> torch.Tensor:
    """The paper's α: D = [g1 - gt], U = [u1 - ut], α_{2:K} = g1 Uᵀ (D Uᵀ)⁻¹, α1 = 1 - Σ α_{2:K}."""
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    differences = jacobian[:1] - jacobian[1:]
    unit_differences = units[:1] - units[1:]
    rest = jacobian[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    return torch.cat([1.0 - rest.sum(dim=0, keepdim=True), rest])


@pytest.mark.parametrize("shape", [(2, 5), (3, 6), (4, 9)])
def test_equal_projections_on_every_unit_gradient(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    for _ in range(10):
        jacobian = torch.randn(*shape, generator=generator, dtype=torch.float64)
        weights, update = _imtl_g(jacobian)
        projections = jacobian @ update / jacobian.norm(dim=1)
        torch.testing.assert_close(projections, projections.mean().expand_as(projections))
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_equals_the_papers_closed_form(num_tasks: int) -> None:
    generator = torch.Generator().manual_seed(num_tasks)
    for _ in range(10):
        jacobian = torch.randn(num_tasks, 8, generator=generator, dtype=torch.float64)
        weights, _ = _imtl_g(jacobian)
        torch.testing.assert_close(weights, _closed_form(jacobian))


def test_two_tasks_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 2): d = a g1 + (1 - a) g2 with d·u1 = d·u2  ->  a = 2 (1 - a)  ->  a = 2/3
    weights, update = _imtl_g(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_direction_invariant_to_task_scales() -> None:
    # the direction depends on the unit gradients only; Σα = 1 sets the length
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    _, update = _imtl_g(jacobian)
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    _, scaled_update = _imtl_g(scales[:, None] * jacobian)
    cosine = update @ scaled_update / (update.norm() * scaled_update.norm())
    torch.testing.assert_close(cosine, torch.tensor(1.0, dtype=torch.float64))
    assert not torch.allclose(update.norm(), scaled_update.norm())
    # a common scale c multiplies the update by c (the weights are unchanged)
    _, doubled = _imtl_g(2.0 * jacobian)
    torch.testing.assert_close(doubled, 2.0 * update)


def test_degenerate_rows() -> None:
    # a zero row gets weight 0 and the others are balanced among themselves
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    weights, _ = _imtl_g(jacobian)
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    # opposite rows: only the zero update has equal projections
    _, update = _imtl_g(torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64))
    torch.testing.assert_close(update, torch.zeros(2, dtype=torch.float64))


def test_loss_balancing_transform_and_its_gradient() -> None:
    method = get_method("imtl", num_tasks=3)
    with torch.no_grad():
        method.s.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0, 0.5])
    transformed = method.transform_losses(losses)
    expected = torch.exp(method.s.detach()) * losses - method.s.detach()
    torch.testing.assert_close(transformed, expected)
    transformed.sum().backward()
    torch.testing.assert_close(method.s.grad, torch.exp(method.s.detach()) * losses - 1.0)


def test_loss_balancing_optimum_is_minus_log_loss() -> None:
    # d/ds (e^s L - s) = 0 at s = -log L, where the scaled loss e^s L is 1 for every task
    method = get_method("imtl", num_tasks=2)
    losses = torch.tensor([0.01, 100.0])
    with torch.no_grad():
        method.s.copy_(-losses.log())
    transformed = method.transform_losses(losses)
    transformed.sum().backward()
    torch.testing.assert_close(method.s.grad, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.exp(method.s.detach()) * losses, torch.ones(2))


def test_loss_balancing_with_a_task_subset() -> None:
    method = get_method("imtl", num_tasks=3)
    with torch.no_grad():
        method.s.copy_(torch.tensor([0.1, 0.2, 0.3]))
    losses = torch.tensor([1.0, 2.0])
    transformed = method.transform_losses(losses, task_ids=torch.tensor([2, 0]))
    s = torch.tensor([0.3, 0.1])
    torch.testing.assert_close(transformed, torch.exp(s) * losses - s)
    with pytest.raises(ValueError, match="task_ids"):
        method.transform_losses(losses, task_ids=torch.tensor([0, 3]))


def test_pure_imtl_g_has_no_parameters() -> None:
    method = get_method("imtl", num_tasks=3, loss_balancing=False)
    assert list(method.parameters()) == []
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert method.transform_losses(losses) is losses


def test_equal_projections_survive_a_1e6_scale_spread() -> None:
    # float32 rows whose norms differ by 1e6: the balance must not depend on float32's resolution
    base = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    jacobian = base * torch.tensor([[1e3], [1e-3], [1.0]])
    method = get_method("imtl", loss_balancing=False)
    update = method.aggregate(jacobian).double()
    projections = jacobian.double() @ update / jacobian.double().norm(dim=1)
    torch.testing.assert_close(projections, projections.mean().expand(3), rtol=1e-4, atol=0)
    torch.testing.assert_close(method.last_weights.sum(), torch.tensor(1.0))


def test_same_direction_as_config() -> None:
    # equal projections on the unit gradients = equal cosines: IMTL-G and ConFIG differ only in length
    jacobian = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, update = _imtl_g(jacobian)
    config = get_method("config").weights_from_gramian(jacobian @ jacobian.T) @ jacobian
    cosine = update @ config / (update.norm() * config.norm())
    torch.testing.assert_close(cosine.abs(), torch.tensor(1.0, dtype=torch.float64))

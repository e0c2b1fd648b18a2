"""UW (docs/methods.md, "Uncertainty weighting"): weights 1/(2 e^s) and the optimum s = log L."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mtl.methods import get_method


def test_initial_weights_and_combined_loss() -> None:
    method = get_method("uw", num_tasks=2)
    losses = torch.tensor([2.0, 4.0])
    combined = method.combine_losses(losses)
    # s = -0.5 (LibMTL): L = Σ L_i / (2 e^{-0.5}) + (-0.5) / 2
    expected = (losses / (2 * math.exp(-0.5))).sum() - 0.5
    torch.testing.assert_close(combined, expected)
    torch.testing.assert_close(method.last_weights, torch.full((2,), 0.5 * math.exp(0.5)))
    torch.testing.assert_close(method.loss_weights(losses), torch.full((2,), 0.5 * math.exp(0.5)))


def test_gradient_of_the_log_variances() -> None:
    method = get_method("uw", num_tasks=3, init_log_variance=0.0)  # nash-mtl's start
    with torch.no_grad():
        method.log_variance.copy_(torch.tensor([0.0, 1.0, -1.0]))
    losses = torch.tensor([1.0, 3.0, 0.2])
    method.combine_losses(losses).backward()
    s = method.log_variance.detach()
    torch.testing.assert_close(method.log_variance.grad, 0.5 - losses / (2 * torch.exp(s)))


def test_optimum_is_the_log_of_the_loss() -> None:
    losses = torch.tensor([0.01, 1.0, 50.0])
    method = get_method("uw", num_tasks=3)
    with torch.no_grad():
        method.log_variance.copy_(losses.log())
    method.combine_losses(losses).backward()
    torch.testing.assert_close(method.log_variance.grad, torch.zeros(3), atol=1e-6, rtol=0)
    # and gradient descent gets there from the default start
    method = get_method("uw", num_tasks=3)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for _ in range(400):
        optimizer.zero_grad()
        method.combine_losses(losses).backward()
        optimizer.step()
    torch.testing.assert_close(method.log_variance.detach(), losses.log(), atol=1e-3, rtol=0)


def test_at_the_optimum_the_weighted_losses_ignore_the_loss_scale() -> None:
    # with s = log L every weighted loss L_i / (2 e^{s_i}) is 1/2, whatever the scale of L_i (Elich et al. §4)
    losses = torch.tensor([0.01, 1.0, 50.0])
    method = get_method("uw", num_tasks=3)
    for scale in (1.0, 1e4):
        with torch.no_grad():
            method.log_variance.copy_((scale * losses).log())
        torch.testing.assert_close(method.loss_weights(scale * losses) * scale * losses, torch.full((3,), 0.5))


def test_task_subset_uses_the_present_log_variances() -> None:
    method = get_method("uw", num_tasks=3)
    with torch.no_grad():
        method.log_variance.copy_(torch.tensor([0.0, 1.0, 2.0]))
    losses = torch.tensor([1.0, 1.0])
    method.combine_losses(losses, task_ids=torch.tensor([2, 0])).backward()
    torch.testing.assert_close(method.last_weights, 0.5 * torch.exp(-torch.tensor([2.0, 0.0])))
    assert method.log_variance.grad[1] == 0


def test_aggregate_matches_the_weights() -> None:
    jacobian = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    method = get_method("uw", num_tasks=2)
    update = method.aggregate(jacobian, losses=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(update, 0.5 * math.exp(0.5) * jacobian.sum(dim=0))


def test_errors() -> None:
    with pytest.raises(ValueError, match="`num_tasks` is required"):
        get_method("uw")
    with pytest.raises(ValueError, match="`init_log_variance`"):
        get_method("uw", num_tasks=2, init_log_variance=float("nan"))

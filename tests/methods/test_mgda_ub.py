"""MGDA-UB (docs/methods.md, "MGDA"): MGDA on the gradients with respect to the shared representation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_mtl.methods import get_method

from ._helpers import assert_non_finite_input_propagates


def test_declares_representation_level() -> None:
    method = get_method("mgda_ub")
    assert method.requires_representation is True
    assert method.requires_jacobian is True
    assert get_method("mgda").requires_representation is False


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_on_a_plain_matrix_it_is_mgda_on_the_rows(normalization: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for num_tasks in (1, 2, 3, 5):
        rows = torch.randn(num_tasks, 24, generator=generator) + torch.randn(24, generator=generator)
        losses = torch.linspace(0.5, 1.5, num_tasks)
        expected = get_method("mgda", normalization=normalization).aggregate(rows, losses=losses)
        method = get_method("mgda_ub", normalization=normalization)
        update = method.aggregate(rows, losses=losses, representation=torch.randn(24, generator=generator))
        torch.testing.assert_close(update, expected, rtol=0, atol=0)


def test_returned_representation_gradient_gives_the_weighted_parameter_gradient() -> None:
    """The documented contract: backpropagating Σ w_i ∇_z L_i through the encoder once gives the shared
    parameters Σ w_i g_i, with the weights of the upper bound."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    heads = [nn.Linear(6, 1) for _ in range(3)]
    inputs, targets = torch.randn(10, 5), torch.randn(3, 10, 1)
    shared = list(encoder.parameters())

    representation = encoder(inputs)
    detached = representation.detach().requires_grad_(True)
    losses = [nn.functional.mse_loss(head(detached), target) for head, target in zip(heads, targets, strict=True)]
    rows = torch.stack([torch.autograd.grad(loss, detached)[0].reshape(-1) for loss in losses])

    method = get_method("mgda_ub", num_tasks=3)
    representation_grad = method.aggregate(rows, representation=detached.detach().reshape(-1))
    assert representation_grad.shape == (representation.numel(),)
    parameter_update = torch.autograd.grad(
        representation, shared, grad_outputs=representation_grad.view_as(representation)
    )

    weights = method.last_weights
    assert torch.all(weights >= 0) and torch.isclose(weights.sum(), torch.tensor(1.0))
    task_losses = [
        nn.functional.mse_loss(head(encoder(inputs)), target) for head, target in zip(heads, targets, strict=True)
    ]
    weighted = torch.autograd.grad(sum(w * loss for w, loss in zip(weights, task_losses, strict=True)), shared)
    for got, expected in zip(parameter_update, weighted, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_without_raising(bad: float) -> None:
    """An overflowed gradient is not solved: uniform weights, so the trainer's overflow check sees it."""
    assert_non_finite_input_propagates(get_method("mgda_ub"), bad)

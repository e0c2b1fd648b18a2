"""FAMO (docs/methods.md, "FAMO"): the gradient weights and the logit update, by hand and against Adam."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_gradient_weights() -> None:
    method = get_method("famo", num_tasks=3)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    losses = torch.tensor([1.0, 2.0, 4.0])
    weights = method.loss_weights(losses)
    z = torch.softmax(method.logits, dim=0)
    c = 1.0 / (z / (losses + 1e-8)).sum()
    torch.testing.assert_close(weights, c * z / (losses + 1e-8))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    # at ξ = 0 the weights are 1/ℓ_i normalised to sum 1
    fresh = get_method("famo", num_tasks=2)
    torch.testing.assert_close(fresh.loss_weights(torch.tensor([1.0, 3.0])), torch.tensor([0.75, 0.25]))


def test_min_losses_shift() -> None:
    method = get_method("famo", num_tasks=2, min_losses=[-1.0, 0.5])
    # ℓ = L - ℓ* + ε = (2, 1.5)
    torch.testing.assert_close(method.loss_weights(torch.tensor([1.0, 2.0])), torch.tensor([1.5, 2.0]) / 3.5)


def test_one_logit_update_by_hand() -> None:
    method = get_method("famo", num_tasks=3, gamma=0.01)
    xi = torch.tensor([0.2, -0.1, 0.0])
    with torch.no_grad():
        method.logits.copy_(xi)
    before, after = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.8, 4.4])
    method.after_optimizer_step(before, after)
    decrease = (before + 1e-8).log() - (after + 1e-8).log()
    z = torch.softmax(xi, dim=0)
    delta = z * (decrease - (z * decrease).sum())  # J_softmax(ξ)ᵀ Δ
    grad = delta + 0.01 * xi
    # Adam's first step: m̂ = g, v̂ = g², ξ ← ξ - lr g / (|g| + eps)
    torch.testing.assert_close(method.logits, xi - 0.025 * grad / (grad.abs() + 1e-8))


def test_logit_updates_match_torch_adam() -> None:
    method = get_method("famo", num_tasks=3, gamma=0.001)
    reference = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([reference], lr=0.025, weight_decay=0.001)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (0.8 + 0.4 * torch.rand(3, generator=generator))
        method.after_optimizer_step(before, after)
        # Cranial-XIX/FAMO famo.py: the gradient of softmax(ξ) against the log-loss decrease
        decrease = (before + 1e-8).log() - (after + 1e-8).log()
        (grad,) = torch.autograd.grad(torch.softmax(reference, dim=0), reference, grad_outputs=decrease)
        optimizer.zero_grad()
        reference.grad = grad
        optimizer.step()
        torch.testing.assert_close(method.logits, reference.detach())


def test_task_subset_updates_only_the_present_logits() -> None:
    method = get_method("famo", num_tasks=3)
    method.after_optimizer_step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), task_ids=torch.tensor([2, 0]))
    assert method.logits[1] == 0 and method.adam_steps.tolist() == [1.0, 0.0, 1.0]
    # the task that improved more (task 2) loses weight
    assert method.logits[2] < 0 < method.logits[0]


def test_negative_losses_below_the_bound_stay_finite() -> None:
    method = get_method("famo", num_tasks=2)
    weights = method.loss_weights(torch.tensor([-1.0, 1.0]))
    assert torch.isfinite(weights).all()
    method.after_optimizer_step(torch.tensor([-1.0, 1.0]), torch.tensor([-2.0, 0.5]))
    assert torch.isfinite(method.logits).all()


def test_state_round_trip_continues_adam() -> None:
    method = get_method("famo", num_tasks=2)
    method.after_optimizer_step(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.9]))
    restored = get_method("famo", num_tasks=2)
    restored.load_state_dict(method.state_dict())
    for m in (method, restored):
        m.after_optimizer_step(torch.tensor([0.5, 1.9]), torch.tensor([0.45, 1.5]))
    assert torch.equal(method.logits, restored.logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "`num_tasks`"),
        ({"num_tasks": 2, "w_lr": 0.0}, "`w_lr`"),
        ({"num_tasks": 2, "gamma": -1.0}, "`gamma`"),
        ({"num_tasks": 2, "min_losses": [0.0, 0.0, 0.0]}, "`min_losses`"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("famo", **kwargs)

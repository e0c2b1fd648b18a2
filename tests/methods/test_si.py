"""SI: the sum of the log-losses (nash-mtl ``ScaleInvariantLinearScalarization``)."""

from __future__ import annotations

import torch

from hf_mtl.methods import get_method


def test_hand_worked_weights_are_inverse_losses() -> None:
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    method = get_method("si")
    update = method.aggregate(jacobian, losses=torch.tensor([0.5, 3.0]))
    assert torch.allclose(update, torch.tensor([4.0, 1.0]))
    assert torch.allclose(method.last_weights, torch.tensor([2.0, 1.0 / 3.0]))


def test_matches_nash_mtl_formula() -> None:
    losses = torch.tensor([0.3, 1.7, 4.0, 0.01])
    reference = losses.clone().requires_grad_(True)
    torch.sum(torch.log(reference) * torch.ones(4)).backward()
    probe = losses.clone().requires_grad_(True)
    get_method("si").combine_losses(probe).backward()
    assert torch.allclose(probe.grad, reference.grad)


def test_update_is_invariant_to_loss_scales() -> None:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 5, generator=generator)
    losses = torch.tensor([0.2, 1.0, 7.0])
    scale = torch.tensor([1e-3, 1.0, 1e4])
    base = get_method("si").aggregate(jacobian, losses=losses)
    scaled = get_method("si").aggregate(jacobian * scale[:, None], losses=losses * scale)
    assert torch.allclose(scaled, base, rtol=1e-4, atol=1e-6)


def test_zero_loss_is_finite() -> None:
    method = get_method("si")
    assert torch.isfinite(method.aggregate(torch.eye(2), losses=torch.tensor([0.0, 2.0]))).all()
    assert method.last_weights[0] == 0.0

"""GLS: the geometric mean of the losses (LibMTL ``GLS.py``)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_hand_worked_two_tasks() -> None:
    # C = sqrt(1 * 4) = 2, ∂C/∂L_i = C / (K L_i) = (1, 0.25)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    method = get_method("gls")
    update = method.aggregate(jacobian, losses=torch.tensor([1.0, 4.0]))
    assert torch.allclose(update, torch.tensor([1.0, 0.25]))
    assert torch.allclose(method.last_weights, torch.tensor([1.0, 0.25]))


def test_matches_libmtl_product_form() -> None:
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(5, generator=generator) * 3 + 0.1
    reference = losses.clone().requires_grad_(True)
    torch.pow(reference.prod(), 1.0 / 5).backward()  # LibMTL: torch.pow(losses.prod(), 1./task_num)
    probe = losses.clone().requires_grad_(True)
    combined = get_method("gls").combine_losses(probe)
    combined.backward()
    assert torch.allclose(combined, torch.pow(losses.prod(), 1.0 / 5))
    assert torch.allclose(probe.grad, reference.grad)


def test_direction_does_not_depend_on_loss_scales() -> None:
    # scaling task j's loss by c scales its gradient by c too; the update only scales by c^(1/K)
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(3, 6, generator=generator)
    losses = torch.tensor([0.5, 2.0, 1.5])
    scale = torch.tensor([1.0, 100.0, 1.0])
    base = get_method("gls").aggregate(jacobian, losses=losses)
    scaled = get_method("gls").aggregate(jacobian * scale[:, None], losses=losses * scale)
    assert torch.allclose(scaled, base * 100.0 ** (1 / 3), rtol=1e-5)


def test_zero_loss_gives_finite_update() -> None:
    method = get_method("gls")
    update = method.aggregate(torch.eye(2), losses=torch.tensor([0.0, 1.0]))
    assert torch.isfinite(update).all()
    assert method.last_weights[0] == 0.0


def test_rejects_bad_eps() -> None:
    with pytest.raises(ValueError, match="`eps`"):
        get_method("gls", eps=0.0)

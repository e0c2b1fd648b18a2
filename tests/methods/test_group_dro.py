"""GroupDRO over tasks (``yifei-he/ExcessMTL`` ``GroupDRO.py``)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_matches_reference_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    step_size = 0.3
    loss_weight = torch.tensor([1.0] * 4)  # the reference, line by line
    method = get_method("group_dro", num_tasks=4, robust_step_size=step_size)
    for _ in range(6):
        losses = torch.rand(4, generator=generator) * 3
        loss_weight = loss_weight * torch.exp(losses * step_size)
        loss_weight = loss_weight / loss_weight.sum() * 4
        jacobian = torch.randn(4, 5, generator=generator)
        update = method.aggregate(jacobian, losses=losses)
        assert torch.allclose(method.last_weights, loss_weight, rtol=1e-5)
        assert torch.allclose(update, loss_weight @ jacobian, rtol=1e-5, atol=1e-6)


def test_worst_task_gains_weight() -> None:
    method = get_method("group_dro", num_tasks=3, robust_step_size=0.1)
    for _ in range(50):
        method.combine_losses(torch.tensor([0.1, 2.0, 0.5]))
    assert method.last_weights.argmax() == 1
    assert torch.isclose(method.last_weights.sum(), torch.tensor(3.0))


def test_absent_task_keeps_its_weight() -> None:
    method = get_method("group_dro", num_tasks=3, robust_step_size=1.0)
    method.combine_losses(torch.tensor([1.0, 2.0, 3.0]))
    before = method.weights.clone()
    method.combine_losses(torch.tensor([5.0, 0.0]), task_ids=torch.tensor([0, 2]))
    assert method.weights[1] == before[1]
    assert torch.isclose(method.weights.sum(), torch.tensor(3.0))
    assert method.weights[0] > before[0]


def test_huge_losses_do_not_overflow() -> None:
    method = get_method("group_dro", num_tasks=2, robust_step_size=1.0)
    method.combine_losses(torch.tensor([1e4, 1.0]))
    assert torch.allclose(method.last_weights, torch.tensor([2.0, 0.0]))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`num_tasks`"):
        get_method("group_dro")
    with pytest.raises(ValueError, match="`robust_step_size`"):
        get_method("group_dro", num_tasks=2, robust_step_size=-1.0)

"""GroupDRO over tasks (``yifei-he/ExcessMTL`` ``GroupDRO.py``).

The method is driven as the engine drives it: per optimizer step, ``combine_losses`` (or the
``aggregate`` probe) reads q, then ``observe_losses`` updates q once with the step's mean losses.
"""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_matches_reference_loop_one_step_behind() -> None:
    """The reference updates q with a batch's losses and then weighs that batch; hf_mtl weighs step t
    with the q of the reference's step t - 1 and updates it after (docstring, "Deviation")."""
    generator = torch.Generator().manual_seed(0)
    step_size = 0.3
    loss_weight = torch.tensor([1.0] * 4)  # the reference, line by line
    method = get_method("group_dro", num_tasks=4, robust_step_size=step_size)
    for _ in range(6):
        losses = torch.rand(4, generator=generator) * 3
        jacobian = torch.randn(4, 5, generator=generator)
        # the step is weighted by q before this step's update
        update = method.aggregate(jacobian, losses=losses)
        assert torch.allclose(method.last_weights, loss_weight, rtol=1e-5)
        assert torch.allclose(update, loss_weight @ jacobian, rtol=1e-5, atol=1e-6)
        probe = losses.clone().requires_grad_(True)
        method.combine_losses(probe).backward()
        assert torch.allclose(probe.grad, loss_weight, rtol=1e-5)
        method.observe_losses(losses)
        loss_weight = loss_weight * torch.exp(losses * step_size)
        loss_weight = loss_weight / loss_weight.sum() * 4
        assert torch.allclose(method.weights, loss_weight, rtol=1e-5)


def test_combine_losses_and_aggregate_only_read_q() -> None:
    method = get_method("group_dro", num_tasks=3, robust_step_size=1.0)
    for _ in range(4):  # micro-batches, SAM's ascent, the aggregate probe: q does not move
        method.combine_losses(torch.tensor([1.0, 2.0, 3.0]))
        method.aggregate(torch.eye(3), losses=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(method.weights, torch.ones(3))


def test_worst_task_gains_weight() -> None:
    method = get_method("group_dro", num_tasks=3, robust_step_size=0.1)
    losses = torch.tensor([0.1, 2.0, 0.5])
    for _ in range(50):
        method.combine_losses(losses)
        method.observe_losses(losses)
    method.combine_losses(losses)
    assert method.last_weights.argmax() == 1
    assert torch.isclose(method.last_weights.sum(), torch.tensor(3.0))
    # q after 50 steps in closed form: K softmax(50 η L)
    assert torch.allclose(method.last_weights, 3 * torch.softmax(50 * 0.1 * losses, dim=0), rtol=1e-5)


def test_absent_task_keeps_its_weight() -> None:
    method = get_method("group_dro", num_tasks=3, robust_step_size=1.0)
    method.observe_losses(torch.tensor([1.0, 2.0, 3.0]))
    before = method.weights.clone()
    method.observe_losses(torch.tensor([5.0, 0.0]), task_ids=torch.tensor([0, 2]))
    assert method.weights[1] == before[1]
    assert torch.isclose(method.weights.sum(), torch.tensor(3.0))
    assert method.weights[0] > before[0]
    # the present tasks share the mass they had, in the ratio q_i e^{η L_i}
    mass = before[0] + before[2]
    expected = torch.stack([before[0] * torch.exp(torch.tensor(5.0)), before[2]])
    assert torch.allclose(method.weights[[0, 2]], expected / expected.sum() * mass, rtol=1e-5)
    combined = method.combine_losses(torch.tensor([1.0, 1.0]), task_ids=torch.tensor([0, 2]))
    assert torch.allclose(combined, method.weights[[0, 2]].sum())


def test_huge_losses_do_not_overflow() -> None:
    method = get_method("group_dro", num_tasks=2, robust_step_size=1.0)
    method.observe_losses(torch.tensor([1e4, 1.0]))
    method.combine_losses(torch.tensor([1e4, 1.0]))
    assert torch.allclose(method.last_weights, torch.tensor([2.0, 0.0]))


def test_non_finite_loss_adds_no_increment() -> None:
    method = get_method("group_dro", num_tasks=2, robust_step_size=1.0)
    method.observe_losses(torch.tensor([float("nan"), 0.0]))
    assert torch.equal(method.weights, torch.ones(2))
    method.observe_losses(torch.tensor([float("inf"), 1.0]))
    assert torch.allclose(method.weights, 2 * torch.softmax(torch.tensor([0.0, 1.0]), dim=0))


def test_state_round_trip() -> None:
    method = get_method("group_dro", num_tasks=2, robust_step_size=0.5)
    method.observe_losses(torch.tensor([1.0, 3.0]))
    restored = get_method("group_dro", num_tasks=2, robust_step_size=0.5)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.weights, method.weights)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`num_tasks`"):
        get_method("group_dro")
    with pytest.raises(ValueError, match="`robust_step_size`"):
        get_method("group_dro", num_tasks=2, robust_step_size=-1.0)

"""ExcessMTL (LibMTL / ``yifei-he/ExcessMTL`` ``ExcessMTL.py``)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


class ReferenceExcessMTL:
    """The reference ``ExcessMTL.backward`` transcribed line by line (returns the update)."""

    def __init__(self, task_num: int) -> None:
        self.task_num = task_num
        self.loss_weight = torch.tensor([1.0] * task_num, dtype=torch.float64)
        self.grad_sum = None
        self.first_epoch = True

    def backward(self, grads: torch.Tensor, robust_step_size: float) -> torch.Tensor:
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        w = torch.zeros(self.task_num, dtype=torch.float64)
        for i in range(self.task_num):
            self.grad_sum[i] += grads[i] ** 2
            grad_i = grads[i]
            h_i = torch.sqrt(self.grad_sum[i] + 1e-7)
            w[i] = grad_i * (1 / h_i) @ grad_i.t()
        if self.first_epoch:
            self.initial_w = w
            self.first_epoch = False
        else:
            w = w / self.initial_w
            self.loss_weight = self.loss_weight * torch.exp(w * robust_step_size)
            self.loss_weight = self.loss_weight / self.loss_weight.sum() * self.task_num
        return self.loss_weight @ grads


def test_matches_reference_over_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = ReferenceExcessMTL(3)
    method = get_method("excess_mtl", robust_step_size=0.5)
    for step in range(6):
        jacobian = torch.randn(3, 7, generator=generator, dtype=torch.float64) * (1 + step)
        expected = reference.backward(jacobian, 0.5)
        assert torch.allclose(method.aggregate(jacobian), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(method.last_weights.double(), reference.loss_weight, rtol=1e-5)


def test_first_call_is_the_sum_and_losses_are_ignored() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    method = get_method("excess_mtl")
    assert torch.allclose(method.aggregate(jacobian), jacobian.sum(dim=0))
    # the weights come from gradients only: an irreducible (large) loss does not attract weight
    a, b = get_method("excess_mtl"), get_method("excess_mtl")
    for scale in (1.0, 0.5, 0.25):
        update_a = a.aggregate(jacobian * scale, losses=torch.tensor([1.0, 1.0]))
        update_b = b.aggregate(jacobian * scale, losses=torch.tensor([100.0, 1.0]))
        assert torch.equal(update_a, update_b)


def test_task_still_far_from_its_optimum_gains_weight() -> None:
    # task 0's gradient keeps its size (large excess risk), task 1's shrinks (near its optimum)
    method = get_method("excess_mtl", robust_step_size=0.5)
    for step in range(20):
        method.aggregate(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.7**step, 0.7**step]]))
    assert method.last_weights[0] > method.last_weights[1]
    assert torch.isclose(method.last_weights.sum(), torch.tensor(2.0))


def test_zero_first_gradient_and_subset() -> None:
    method = get_method("excess_mtl", num_tasks=3)
    method.aggregate(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), task_ids=torch.tensor([0, 1]))
    update = method.aggregate(torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    assert torch.isfinite(update).all()
    assert torch.isclose(method.task_weights.sum(), torch.tensor(3.0))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`robust_step_size`"):
        get_method("excess_mtl", robust_step_size=0.0)
    method = get_method("excess_mtl")
    method.aggregate(torch.eye(2))
    with pytest.raises(ValueError, match=r"`jacobian` does not fit .* has shape \(2, 2\), this call needs \(2, 3\)"):
        method.aggregate(torch.ones(2, 3))

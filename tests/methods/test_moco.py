"""MoCo (LibMTL ``MoCo.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_mtl.methods import get_method


class ReferenceMoCo:
    """LibMTL's ``MoCo.backward`` transcribed line by line (rows of ``grads`` are tasks)."""

    def __init__(
        self,
        num_tasks: int,
        grad_dim: int,
        beta: float,
        beta_sigma: float,
        gamma: float,
        gamma_sigma: float,
        rho: float,
    ) -> None:
        self.task_num = num_tasks
        self.step = 0
        self.y = torch.zeros(num_tasks, grad_dim, dtype=torch.float64)
        self.lambd = torch.ones([num_tasks], dtype=torch.float64) / num_tasks
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = beta, beta_sigma, gamma, gamma_sigma, rho

    def backward(self, grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        self.step += 1
        grads = grads.clone()
        for tn in range(self.task_num):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]
        self.y = self.y - (self.beta / self.step**self.beta_sigma) * (self.y - grads)
        self.lambd = F.softmax(
            self.lambd
            - (self.gamma / self.step**self.gamma_sigma)
            * (self.y @ self.y.t() + self.rho * torch.eye(self.task_num, dtype=torch.float64))
            @ self.lambd,
            -1,
        )
        return self.y.t() @ self.lambd


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_matches_libmtl_over_steps(rho: float) -> None:
    generator = torch.Generator().manual_seed(0)
    settings = dict(beta=0.5, beta_sigma=0.5, gamma=0.3, gamma_sigma=0.5, rho=rho)
    reference = ReferenceMoCo(3, 6, **settings)
    method = get_method("moco", **settings)
    for _ in range(6):
        jacobian = torch.randn(3, 6, generator=generator, dtype=torch.float64)
        losses = torch.rand(3, generator=generator, dtype=torch.float64) + 0.5
        expected = reference.backward(jacobian, losses)
        assert torch.allclose(method.aggregate(jacobian, losses=losses), expected, atol=1e-5)
        assert torch.allclose(method.last_weights.double(), reference.lambd, atol=1e-6)


def test_tracking_removes_the_bias_on_a_fixed_problem() -> None:
    # with the same gradients every step, Y converges to the rescaled gradients L_i g_i / ||g_i||
    jacobian = torch.tensor([[3.0, 0.0, 0.0], [0.0, -0.5, 0.5]])
    losses = torch.tensor([2.0, 1.0])
    method = get_method("moco")
    for _ in range(200):
        method.aggregate(jacobian, losses=losses)
    target = jacobian / jacobian.norm(dim=1, keepdim=True) * losses[:, None]
    assert torch.allclose(method.tracked, target, atol=1e-3)
    assert torch.isclose(method.last_weights.sum(), torch.tensor(1.0))


def test_does_not_depend_on_the_scale_of_the_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(3, 4, generator=generator)
    scaled = jacobian * torch.tensor([[1e4], [1.0], [1e-2]])  # the 1e-8 in the norm matters below
    first, second = get_method("moco"), get_method("moco")
    for _ in range(3):
        assert torch.allclose(first.aggregate(jacobian), second.aggregate(scaled), atol=1e-5)


def test_subset_and_lazy_state_round_trip() -> None:
    method = get_method("moco", num_tasks=3)
    method.aggregate(torch.eye(3))
    before = method.tracked[1].clone()
    method.aggregate(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), task_ids=torch.tensor([0, 2]))
    assert torch.equal(method.tracked[1], before)

    lazy = get_method("moco")
    lazy.aggregate(torch.eye(2))
    restored = get_method("moco")
    restored.load_state_dict(lazy.state_dict())
    assert torch.equal(lazy.aggregate(torch.eye(2)), restored.aggregate(torch.eye(2)))
    with pytest.raises(ValueError, match=r"`jacobian` does not fit .* has shape \(2, 2\), this call needs \(2, 3\)"):
        restored.aggregate(torch.eye(3)[:2])


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`gamma_sigma`"):
        get_method("moco", gamma_sigma=-0.5)

"""GradNorm (docs/methods.md, "GradNorm"): the balancing loss's gradient by hand, its fixed point."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

# two orthogonal rows of norms 3 and 4
JACOBIAN = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])


def _aggregate(method, jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    """``aggregate``, then what the engine does with the method's auxiliary loss: backpropagate it into the
    logits (their gradients accumulate)."""
    update = method.aggregate(jacobian, **kwargs)
    if method.auxiliary_loss is not None:
        method.auxiliary_loss.backward()
        method.auxiliary_loss = None
    return update


def _train(method, jacobian: torch.Tensor, losses: torch.Tensor, lr: float, steps: int) -> None:
    """``steps`` Adam steps on the weight logits, each after one ``aggregate`` and the backward of its auxiliary
    loss, on the same Jacobian and losses."""
    optimizer = torch.optim.Adam(method.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        _aggregate(method, jacobian, losses=losses)
        optimizer.step()


def test_aggregate_writes_no_gradient_and_leaves_the_balance_loss() -> None:
    method = get_method("gradnorm", num_tasks=2)
    method.aggregate(JACOBIAN, losses=torch.tensor([1.0, 2.0]))
    assert method.logits.grad is None
    # s = 0: λ = (1, 1), G = (3, 4), Ḡ = 3.5, r = 1: L_grad = |3 - 3.5| + |4 - 3.5| = 1
    torch.testing.assert_close(method.auxiliary_loss.detach(), torch.tensor(1.0))


def test_update_is_the_weighted_sum() -> None:
    method = get_method("gradnorm", num_tasks=2)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.5, -0.5]))
    update = _aggregate(method, JACOBIAN, losses=torch.tensor([1.0, 1.0]))
    weights = 2 * torch.softmax(torch.tensor([0.5, -0.5]), dim=0)
    torch.testing.assert_close(method.last_weights, weights)
    torch.testing.assert_close(update, weights @ JACOBIAN)
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))


def test_gradient_of_the_logits_by_hand() -> None:
    # s = 0: λ = (1, 1), G = (3, 4), Ḡ = 3.5; ∂λ_i/∂s_j = δ_ij - 1/2 (K = 2, softmax at 1/2)
    method = get_method("gradnorm", num_tasks=2)
    # first call: L(0) = L, r = (1, 1), target 3.5: sign(G - T) = (-1, +1), ∂L_grad/∂λ = (-3, 4)
    _aggregate(method, JACOBIAN, losses=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(method.initial_losses, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(method.logits.grad, torch.tensor([-3.5, 3.5]))
    # second call: L/L(0) = (0.5, 1), r = (2/3, 4/3), T = 3.5 r^1.5 = (1.905, 5.389):
    # sign(G - T) = (+1, -1), ∂L_grad/∂λ = (3, -4), ∂L_grad/∂s = (3 + 0.5, -4 + 0.5)
    method.logits.grad = None
    _aggregate(method, JACOBIAN, losses=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(method.logits.grad, torch.tensor([3.5, -3.5]))
    # without a reset the gradients add up
    _aggregate(method, JACOBIAN, losses=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(method.logits.grad, torch.tensor([7.0, -7.0]))


def test_fixed_point_balances_the_weighted_norms() -> None:
    # α = 0 asks for equal weighted gradient norms: λ1 · 1 = λ2 · 10
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    method = get_method("gradnorm", num_tasks=2, alpha=0.0)
    _train(method, jacobian, torch.tensor([1.0, 1.0]), lr=0.02, steps=300)
    weights = method.last_weights
    torch.testing.assert_close(weights[0] / weights[1], torch.tensor(10.0), rtol=0.05, atol=0)


def test_slower_task_gets_the_larger_norm() -> None:
    # equal unit rows; task 0's loss has not moved while task 1's fell to a quarter
    jacobian = torch.eye(2)
    method = get_method("gradnorm", num_tasks=2)
    _aggregate(method, jacobian, losses=torch.tensor([1.0, 1.0]))
    _train(method, jacobian, torch.tensor([1.0, 0.25]), lr=0.05, steps=200)
    # r = (1.6, 0.4), Ḡ = mean λ = 1, targets T = r^1.5 = (2.02, 0.25); with λ1 = 2 - λ0 the balancing
    # loss |λ0 - 2.02| + |1.75 - λ0| is smallest for λ0 in [1.75, 2)
    weights = method.last_weights
    assert 1.74 <= weights[0] < 2.0, weights


def test_first_epoch_baseline() -> None:
    method = get_method("gradnorm", num_tasks=2, initial_loss="first_epoch")
    for losses in ([1.0, 2.0], [3.0, 4.0]):
        update = _aggregate(method, JACOBIAN, losses=torch.tensor(losses))
        torch.testing.assert_close(update, JACOBIAN.sum(dim=0))  # λ = 1, as LibMTL's epoch 0
        assert method.logits.grad is None
    method.on_epoch_end(0)
    torch.testing.assert_close(method.initial_losses, torch.tensor([2.0, 3.0]))
    # L/L(0) = (1, 1): r = 1, the same gradient as the first call of the default mode
    _aggregate(method, JACOBIAN, losses=torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(method.logits.grad, torch.tensor([-3.5, 3.5]))
    method.on_epoch_end(1)  # later epochs leave the baseline alone
    torch.testing.assert_close(method.initial_losses, torch.tensor([2.0, 3.0]))


def test_without_losses_only_the_norms_are_balanced() -> None:
    method = get_method("gradnorm", num_tasks=2)
    _aggregate(method, JACOBIAN)
    torch.testing.assert_close(method.logits.grad, torch.tensor([-3.5, 3.5]))
    assert torch.isnan(method.initial_losses).all()


def test_task_subset() -> None:
    method = get_method("gradnorm", num_tasks=3)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, 5.0, -0.3]))
    update = _aggregate(method, JACOBIAN, losses=torch.tensor([1.0, 2.0]), task_ids=torch.tensor([0, 2]))
    weights = 2 * torch.softmax(torch.tensor([0.3, -0.3]), dim=0)
    torch.testing.assert_close(update, weights @ JACOBIAN)
    assert method.logits.grad[1] == 0 and method.logits.grad[[0, 2]].abs().sum() > 0
    assert torch.isnan(method.initial_losses[1]) and method.initial_losses[2] == 2.0


def test_state_loads_into_a_fresh_instance() -> None:
    method = get_method("gradnorm", num_tasks=2, initial_loss="first_epoch")
    _aggregate(method, JACOBIAN, losses=torch.tensor([1.0, 2.0]))
    method.on_epoch_end(0)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.1, -0.2]))
    restored = get_method("gradnorm", num_tasks=2, initial_loss="first_epoch")
    restored.load_state_dict(method.state_dict())
    assert not restored.warming_up
    for m in (method, restored):
        _aggregate(m, JACOBIAN, losses=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(restored.logits.grad, method.logits.grad)


def test_zero_and_non_finite_losses_stay_finite() -> None:
    method = get_method("gradnorm", num_tasks=2)
    _aggregate(method, JACOBIAN, losses=torch.tensor([0.0, 1.0]))  # a zero baseline: ratio 1
    _aggregate(method, JACOBIAN, losses=torch.tensor([float("nan"), 0.0]))
    assert torch.isfinite(method.logits.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "`num_tasks`"),
        ({"num_tasks": 2, "alpha": -1.0}, "`alpha`"),
        ({"num_tasks": 2, "initial_loss": "epoch"}, "`initial_loss`"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("gradnorm", **kwargs)

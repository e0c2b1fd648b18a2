"""DB-MTL (docs/methods.md, "DB-MTL"): log losses, the gradient EMA, rescaling to the largest norm."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_log_transform_and_its_gradient() -> None:
    method = get_method("db_mtl")
    losses = torch.tensor([0.5, 2.0, 10.0], requires_grad=True)
    transformed = method.transform_losses(losses)
    torch.testing.assert_close(transformed, torch.log(losses.detach() + 1e-8))
    transformed.sum().backward()
    torch.testing.assert_close(losses.grad, 1.0 / (losses.detach() + 1e-8))


def test_two_steps_by_hand() -> None:
    method = get_method("db_mtl", num_tasks=2)
    # step 1: ĝ = g + 0.9 (0 - g) = 0.1 g = ((0.3, 0), (0, 0.1)); α = 0.3 / (0.3, 0.1) = (1, 3)
    update = method.aggregate(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(method.last_weights, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(update, torch.tensor([0.3, 0.3]))
    # step 2 with g = I: ĝ = I + 0.9 (ĝ - I) = ((0.37, 0), (0, 0.19)); α = (1, 0.37 / 0.19)
    update = method.aggregate(torch.eye(2))
    torch.testing.assert_close(method.grad_ema, torch.tensor([[0.37, 0.0], [0.0, 0.19]]))
    torch.testing.assert_close(method.last_weights, torch.tensor([1.0, 0.37 / 0.19]))
    torch.testing.assert_close(update, torch.tensor([0.37, 0.37]))


def test_beta_decays_with_the_step() -> None:
    method = get_method("db_mtl", beta_sigma=1.0)
    method.aggregate(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # step 1: factor 0.9 / 1
    method.aggregate(torch.eye(2))  # step 2: factor 0.9 / 2 = 0.45: ĝ = I + 0.45 (0.1 g - I)
    torch.testing.assert_close(method.grad_ema, torch.tensor([[0.685, 0.0], [0.0, 0.595]]))


def test_every_task_gets_the_largest_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    method = get_method("db_mtl")
    for _ in range(3):
        jacobian = torch.randn(4, 6, generator=generator) * torch.tensor([[1e3], [1.0], [1e-2], [5.0]])
        method.aggregate(jacobian)
        contributions = method.last_weights[:, None] * method.grad_ema
        norms = contributions.norm(dim=1)
        torch.testing.assert_close(norms, method.grad_ema.norm(dim=1).max().expand(4), rtol=1e-5, atol=0)


def test_direction_invariant_to_task_scales_without_smoothing() -> None:
    # β = 0: d = max_j ||g_j|| Σ_i u_i, so the direction depends on the unit gradients only
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    update = get_method("db_mtl", beta=0.0).aggregate(jacobian)
    scaled = get_method("db_mtl", beta=0.0).aggregate(
        torch.tensor([[1e3], [1.0], [1e-3]], dtype=torch.float64) * jacobian
    )
    torch.testing.assert_close(scaled / scaled.norm(), update / update.norm())
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    torch.testing.assert_close(update, jacobian.norm(dim=1).max() * units.sum(dim=0))


def test_zero_rows() -> None:
    method = get_method("db_mtl", beta=0.0)
    update = method.aggregate(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(method.last_weights, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(update, torch.tensor([3.0, 4.0]))
    assert torch.equal(get_method("db_mtl").aggregate(torch.zeros(2, 3)), torch.zeros(3))


def test_absent_tasks_keep_their_average() -> None:
    method = get_method("db_mtl", num_tasks=3)
    method.aggregate(torch.ones(3, 2))
    method.aggregate(torch.tensor([[2.0, 0.0], [0.0, 4.0]]), task_ids=torch.tensor([2, 0]))
    torch.testing.assert_close(method.grad_ema[1], torch.full((2,), 0.1))
    torch.testing.assert_close(method.grad_ema[2], 0.1 * torch.tensor([2.0, 0.0]) + 0.9 * 0.1 * torch.ones(2))
    assert method.steps.tolist() == [2.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="`num_tasks` is required"):
        get_method("db_mtl").aggregate(torch.ones(2, 2), task_ids=torch.tensor([0, 1]))


def test_state_loads_into_a_fresh_instance() -> None:
    generator = torch.Generator().manual_seed(2)
    method = get_method("db_mtl")
    for _ in range(2):
        method.aggregate(torch.randn(3, 4, generator=generator))
    restored = get_method("db_mtl")
    restored.load_state_dict(method.state_dict())
    jacobian = torch.randn(3, 4, generator=generator)
    assert torch.equal(restored.aggregate(jacobian), method.aggregate(jacobian))
    with pytest.raises(ValueError, match=r"`grad_ema` has shape \(3, 4\), this call needs \(3, 5\)"):
        restored.aggregate(torch.randn(3, 5))


def test_reduced_precision_keeps_a_float32_average() -> None:
    method = get_method("db_mtl")
    update = method.aggregate(torch.randn(2, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16))
    assert update.dtype == torch.bfloat16 and method.grad_ema.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 1.0}, "`beta`"), ({"beta_sigma": -1.0}, "`beta_sigma`"), ({"eps": 0.0}, "`eps`")],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("db_mtl", **kwargs)

"""Nash-MTL (docs/methods.md): d = Σ α_i g_i with G α = 1/α, i.e. d·g_i = 1/α_i."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import assert_non_finite_input_propagates, random_jacobians, row_permutations


def _alpha(jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    """A fresh method's α on the exact float64 Gramian (``aggregate`` forms it in float32)."""
    return get_method("nash_mtl", **kwargs).weights_from_gramian(jacobian @ jacobian.T)


@pytest.mark.parametrize("index", range(10))
def test_update_satisfies_the_bargaining_condition(index: int) -> None:
    jacobian = random_jacobians()[index]
    # the exact equation (reg_eps=0: these Gramians are positive definite)
    alpha = _alpha(jacobian, reg_eps=0.0)
    update = alpha @ jacobian
    assert torch.all(alpha > 0)
    torch.testing.assert_close(jacobian @ update, 1 / alpha, rtol=1e-9, atol=0)
    torch.testing.assert_close(update.norm() ** 2, torch.tensor(float(jacobian.shape[0]), dtype=torch.float64))
    # the default regularisation perturbs it by reg_eps · G_ii α_i² (relative ~1e-6)
    alpha = _alpha(jacobian)
    torch.testing.assert_close(alpha * (jacobian @ (alpha @ jacobian)), torch.ones_like(alpha), rtol=0, atol=1e-4)


def test_float32_aggregate_satisfies_the_condition() -> None:
    for jacobian in random_jacobians(8, seed=1):
        method = get_method("nash_mtl")
        update = method.aggregate(jacobian.float())
        torch.testing.assert_close(
            method.last_weights * (jacobian.float() @ update), torch.ones(jacobian.shape[0]), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_global_scale_leaves_the_update_unchanged(scale: float) -> None:
    for jacobian in random_jacobians(8, seed=2):
        update = _alpha(jacobian) @ jacobian
        torch.testing.assert_close(_alpha(jacobian * scale) @ (jacobian * scale), update, rtol=1e-8, atol=1e-10)


def test_rescaling_a_task_leaves_the_update_unchanged() -> None:
    generator = torch.Generator().manual_seed(4)
    for jacobian in random_jacobians(8, seed=3):
        task_scales = 10 ** (6 * torch.rand(jacobian.shape[0], generator=generator, dtype=torch.float64) - 3)
        update = _alpha(jacobian) @ jacobian
        alpha = _alpha(jacobian * task_scales[:, None])
        torch.testing.assert_close(alpha * task_scales, _alpha(jacobian), rtol=1e-8, atol=0)
        torch.testing.assert_close(alpha @ (jacobian * task_scales[:, None]), update, rtol=1e-8, atol=1e-10)


def test_permuting_rows_permutes_alpha_and_keeps_the_update() -> None:
    for jacobian in random_jacobians(8, seed=5):
        alpha = _alpha(jacobian)
        for permutation in row_permutations(jacobian.shape[0], 5):
            permuted = _alpha(jacobian[permutation])
            torch.testing.assert_close(permuted, alpha[permutation], rtol=1e-9, atol=0)
            torch.testing.assert_close(permuted @ jacobian[permutation], alpha @ jacobian, rtol=1e-9, atol=1e-12)


def test_worked_examples() -> None:
    # orthogonal rows: G is diagonal, α_i = 1/||g_i||, d = Σ g_i/||g_i||
    method = get_method("nash_mtl")
    update = method.aggregate(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(method.last_weights, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(update, torch.tensor([1.0, 1.0]))
    # K = 1: the unit row
    row = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(get_method("nash_mtl").aggregate(row), torch.tensor([0.6, 0.8]))
    # identical rows: d = sqrt(K) ĝ
    torch.testing.assert_close(get_method("nash_mtl").aggregate(row.repeat(3, 1)), 3**0.5 * torch.tensor([0.6, 0.8]))
    # TorchJD's docstring example, whose update is clipped to norm 1 (max_norm): the same direction, norm sqrt(2)
    update = get_method("nash_mtl").aggregate(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    torch.testing.assert_close(update / 2**0.5, torch.tensor([0.0542, 0.7061, 0.7061]), rtol=0, atol=1e-4)


def test_singular_gramians_are_regularised() -> None:
    row = torch.tensor([[1.0, -2.0, 0.5]])
    # opposite rows: no positive solution; the regularised one is symmetric and gives d = 0
    torch.testing.assert_close(
        get_method("nash_mtl").aggregate(torch.cat([row, -row])), torch.zeros(3), atol=1e-6, rtol=0
    )
    # a zero row gets weight 0 and the others are solved as if it were absent
    other = torch.tensor([[0.5, 1.0, 1.0]])
    method = get_method("nash_mtl")
    with_zero = method.aggregate(torch.cat([row, torch.zeros(1, 3), other]))
    assert method.last_weights[1] == 0
    torch.testing.assert_close(with_zero, get_method("nash_mtl").aggregate(torch.cat([row, other])))
    # all-zero matrix
    assert torch.equal(get_method("nash_mtl").aggregate(torch.zeros(2, 4)), torch.zeros(4))


def test_warm_start_is_saved_and_restored() -> None:
    jacobians = random_jacobians(8, seed=6)
    method = get_method("nash_mtl", num_tasks=3)
    first = next(j for j in jacobians if j.shape[0] == 3)
    method.weights_from_gramian(first @ first.T)
    cold_iterations = method.last_iterations
    nearby = first + 1e-2 * torch.randn(first.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    warm = method.weights_from_gramian(nearby @ nearby.T)
    assert method.last_iterations < cold_iterations
    torch.testing.assert_close(warm, _alpha(nearby), rtol=1e-9, atol=0)
    state = method.state_dict()
    assert state["_extra_state"]["step"] == 2
    torch.testing.assert_close(state["alpha"], warm)
    restored = get_method("nash_mtl", num_tasks=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.weights_from_gramian(first @ first.T), method.weights_from_gramian(first @ first.T))


def test_update_weights_every_reuses_alpha_between_updates() -> None:
    generator = torch.Generator().manual_seed(7)
    jacobians = [torch.randn(3, 10, generator=generator, dtype=torch.float64) for _ in range(5)]
    method = get_method("nash_mtl", num_tasks=3, update_weights_every=2)
    alphas = [method.weights_from_gramian(j @ j.T) for j in jacobians]
    torch.testing.assert_close(alphas[0], _alpha(jacobians[0]), rtol=1e-9, atol=0)
    assert torch.equal(alphas[1], alphas[0])  # reused
    torch.testing.assert_close(alphas[2], _alpha(jacobians[2]), rtol=1e-9, atol=0)  # recomputed
    assert torch.equal(alphas[3], alphas[2])
    # a run resumed from step 3 repeats the rest of the uninterrupted one
    resumed = get_method("nash_mtl", num_tasks=3, update_weights_every=2)
    replay = get_method("nash_mtl", num_tasks=3, update_weights_every=2)
    for j in jacobians[:3]:
        replay.weights_from_gramian(j @ j.T)
    resumed.load_state_dict(replay.state_dict())
    assert torch.equal(resumed.weights_from_gramian(jacobians[3] @ jacobians[3].T), alphas[3])
    assert torch.equal(resumed.weights_from_gramian(jacobians[4] @ jacobians[4].T), alphas[4])


def test_subsets_of_tasks_keep_their_own_alpha() -> None:
    generator = torch.Generator().manual_seed(8)
    full = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    method = get_method("nash_mtl", num_tasks=4, update_weights_every=2)
    subset = torch.tensor([3, 1])
    first = method.weights_from_gramian(full[subset] @ full[subset].T, task_ids=subset)
    stored = method.state_dict()["alpha"]
    torch.testing.assert_close(stored[subset], first)
    assert torch.isnan(stored[[0, 2]]).all()
    # the next step would reuse α, but tasks 0 and 2 were never solved for: it solves instead
    second = method.weights_from_gramian(full @ full.T)
    torch.testing.assert_close(second, _alpha(full), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="`num_tasks` is required"):
        get_method("nash_mtl").weights_from_gramian(full[subset] @ full[subset].T, task_ids=subset)


def test_without_num_tasks_another_number_of_rows_starts_afresh() -> None:
    generator = torch.Generator().manual_seed(9)
    method = get_method("nash_mtl", update_weights_every=2)
    three = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    two = torch.randn(2, 12, generator=generator, dtype=torch.float64)
    method.weights_from_gramian(three @ three.T)
    # a reuse step, but with another K: the stored α does not apply, so it is solved and replaced
    torch.testing.assert_close(method.weights_from_gramian(two @ two.T), _alpha(two), rtol=1e-9, atol=0)
    assert method.alpha.shape == (2,)
    # a fresh instance takes K from a loaded state
    restored = get_method("nash_mtl", update_weights_every=2)
    restored.load_state_dict(method.state_dict())
    assert restored.num_tasks == 2 and torch.equal(restored.alpha, method.alpha)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="`update_weights_every` must be a positive integer"):
        get_method("nash_mtl", update_weights_every=0)
    with pytest.raises(ValueError, match="`reg_eps` must be >= 0"):
        get_method("nash_mtl", reg_eps=-1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_and_keeps_the_warm_start(bad: float) -> None:
    method = get_method("nash_mtl", num_tasks=3)
    method.aggregate(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))  # the helper's, unbroken
    alpha = method.state_dict()["alpha"].clone()
    assert_non_finite_input_propagates(method, bad)
    assert torch.equal(method.state_dict()["alpha"], alpha)

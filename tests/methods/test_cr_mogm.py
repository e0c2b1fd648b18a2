"""CR-MOGM: a moving average of another method's weights (TorchJD ``CRMOGMWeighting``)."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def _hard_inputs() -> dict[str, torch.Tensor]:
    """The hard inputs of ``test_all_methods.py``, run here with bases other than the default."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 7, generator=generator)
    rank1 = torch.randn(1, 7, generator=generator)
    return {
        "random": base,
        "zero_row": torch.cat([base[:2], torch.zeros(1, 7)]),
        "identical_rows": base[:1].repeat(3, 1),
        "opposite_rows": torch.cat([base[:1], -base[:1]]),
        "single_task": base[:1],
        "rank_deficient": torch.cat([rank1, 2 * rank1, -0.5 * rank1]),
        "scale_1e6": torch.cat([base[:1] * 1e3, base[1:2] * 1e-3, base[2:3]]),
        "all_zero": torch.zeros(2, 7),
    }


def _aggregate(method, jacobian: torch.Tensor, seed: int = 0) -> torch.Tensor:
    losses = torch.linspace(1.0, 2.0, jacobian.shape[0])
    return method.aggregate(jacobian, losses=losses, generator=torch.Generator().manual_seed(seed))


BASES = [("imtl", {"loss_balancing": False}), ("pcgrad", {}), ("aligned_mtl", {})]


def test_hand_worked_average() -> None:
    base = get_method("imtl", loss_balancing=False)
    method = get_method("cr_mogm", base="imtl", base_kwargs={"loss_balancing": False}, alpha=0.75)
    first, second = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [-1.0, 3.0]])
    w1 = base.weights_from_gramian(first @ first.T)
    w2 = base.weights_from_gramian(second @ second.T)
    assert torch.allclose(method.aggregate(first), w1 @ first)  # λ_0 = λ̂_1
    expected = 0.75 * w1 + 0.25 * w2
    assert torch.allclose(method.aggregate(second), expected @ second)
    assert torch.allclose(method.last_weights, expected)


def test_alpha_limits() -> None:
    generator = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=generator) for _ in range(4)]
    plain, unsmoothed = get_method("aligned_mtl"), get_method("cr_mogm", base="aligned_mtl", alpha=0.0)
    frozen = get_method("cr_mogm", base="aligned_mtl", alpha=1.0)
    first_weights = None
    for jacobian in jacobians:
        assert torch.allclose(unsmoothed.aggregate(jacobian), plain.aggregate(jacobian))
        frozen.aggregate(jacobian)
        first_weights = frozen.last_weights if first_weights is None else first_weights
        assert torch.equal(frozen.last_weights, first_weights)


def test_subset_starts_new_tasks_at_their_base_weight() -> None:
    method = get_method("cr_mogm", num_tasks=3, base="aligned_mtl", alpha=0.5)
    method.aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), task_ids=torch.tensor([0, 1]))
    assert torch.isnan(method.averaged[2])
    method.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), task_ids=torch.tensor([1, 2]))
    assert not torch.isnan(method.averaged).any()


@pytest.mark.parametrize(("base", "kwargs"), BASES)
@pytest.mark.parametrize("case", list(_hard_inputs()))
def test_hard_inputs_with_each_base(base: str, kwargs: dict, case: str) -> None:
    jacobian = _hard_inputs()[case]
    method = get_method("cr_mogm", num_tasks=jacobian.shape[0], base=base, base_kwargs=kwargs)
    for _ in range(2):
        update = _aggregate(method, jacobian)
    assert update.shape == jacobian.shape[1:] and torch.isfinite(update).all()


@pytest.mark.parametrize(("base", "kwargs"), BASES)
def test_state_round_trip_includes_the_base(base: str, kwargs: dict) -> None:
    jacobian = _hard_inputs()["random"]
    method = get_method("cr_mogm", num_tasks=3, base=base, base_kwargs=kwargs)
    for seed in range(3):
        _aggregate(method, jacobian * (seed + 1), seed=seed)
    restored = get_method("cr_mogm", num_tasks=3, base=base, base_kwargs=kwargs)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(_aggregate(method, jacobian, seed=9), _aggregate(restored, jacobian, seed=9))


def test_forwards_the_base_hooks_and_randomness() -> None:
    method = get_method("cr_mogm", num_tasks=2, base="imtl")
    losses = torch.tensor([1.0, 2.0])
    assert torch.equal(method.transform_losses(losses), method.base.transform_losses(losses))
    assert get_method("cr_mogm", base="pcgrad").is_random


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`base` must be one of .*pcgrad"):
        get_method("cr_mogm", base="ew")
    with pytest.raises(ValueError, match="`alpha`"):
        get_method("cr_mogm", base="pcgrad", alpha=1.5)

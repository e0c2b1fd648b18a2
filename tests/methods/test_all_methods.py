"""One matrix that every registered gradient method runs through (docs/STYLE.md, PEFT-style).

Hard inputs from the method-catalogue issue: a zero row, identical rows, opposite rows, K = 1,
a rank-deficient J, rows differing by 1e6 in scale, float16 and bfloat16 input. Each method must
return a finite update of shape (P,) and the input's dtype, reproducibly from a seed, and its
state must survive a ``state_dict`` round trip.
"""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method, list_methods

P = 7


def _hard_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, P, generator=g, dtype=torch.float64).float()
    rank1 = torch.randn(1, P, generator=g).float()
    return {
        "random": base,
        "zero_row": torch.cat([base[:2], torch.zeros(1, P)]),
        "identical_rows": base[:1].repeat(3, 1),
        "opposite_rows": torch.cat([base[:1], -base[:1]]),
        "single_task": base[:1],
        "rank_deficient": torch.cat([rank1, 2 * rank1, -0.5 * rank1]),
        "scale_1e6": torch.cat([base[:1] * 1e3, base[1:2] * 1e-3, base[2:3]]),
        "all_zero": torch.zeros(2, P),
    }


def _build(name: str, num_tasks: int):
    return get_method(name, num_tasks=num_tasks)


def _aggregate(method, jacobian: torch.Tensor, seed: int = 0) -> torch.Tensor:
    losses = torch.linspace(1.0, 2.0, jacobian.shape[0])
    generator = torch.Generator().manual_seed(seed)
    return method.aggregate(jacobian, losses=losses, generator=generator)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("case", list(_hard_inputs()))
def test_hard_inputs_give_finite_updates(name: str, case: str) -> None:
    jacobian = _hard_inputs()[case]
    method = _build(name, jacobian.shape[0])
    update = _aggregate(method, jacobian)
    assert update.shape == (P,)
    assert update.dtype == jacobian.dtype
    assert torch.isfinite(update).all(), f"{name} on {case}: {update}"


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input(name: str, dtype: torch.dtype) -> None:
    jacobian = _hard_inputs()["random"]
    reference = _aggregate(_build(name, 3), jacobian)
    update = _aggregate(_build(name, 3), jacobian.to(dtype))
    assert update.dtype == dtype
    assert torch.isfinite(update).all()
    # reduced precision changes the inputs by ~1e-2 relative; the update must follow, not blow up
    assert torch.allclose(update.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


@pytest.mark.parametrize("name", list_methods())
def test_reproducible_from_seed(name: str) -> None:
    jacobian = _hard_inputs()["random"]
    first = _aggregate(_build(name, 3), jacobian, seed=123)
    second = _aggregate(_build(name, 3), jacobian, seed=123)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", list_methods())
def test_state_dict_round_trip(name: str) -> None:
    jacobian = _hard_inputs()["random"]
    method = _build(name, 3)
    for seed in range(3):  # let stateful methods accumulate some state
        _aggregate(method, jacobian * (seed + 1), seed=seed)
    restored = _build(name, 3)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(_aggregate(method, jacobian, seed=9), _aggregate(restored, jacobian, seed=9))


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names are: .*pcgrad"):
        get_method("pcgrd")

"""One matrix that every registered gradient method runs through (docs/extending.md, PEFT-style).

Hard inputs from the method-catalogue issue: a zero row, identical rows, opposite rows, K = 1,
a rank-deficient J, rows differing by 1e6 in scale, float16 and bfloat16 input. Each method must
return a finite update of shape (P,) and the input's dtype, reproducibly from a seed, and its
state must survive a ``state_dict`` round trip.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch

from hf_mtl.methods import METHODS, LossWeightingMethod, get_method, list_methods

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


def _engine_step(method, jacobian: torch.Tensor, seed: int) -> torch.Tensor:
    """One optimizer step in the engine's order: ``observe_losses`` with the step's mean losses, then
    ``aggregate`` on the Jacobian."""
    losses = torch.linspace(1.0, 2.0, jacobian.shape[0]) * (1 + seed)
    method.observe_losses(losses)
    return method.aggregate(jacobian, losses=losses, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list_methods())
def test_state_dict_round_trip(name: str) -> None:
    jacobian = _hard_inputs()["random"]
    method = _build(name, 3)
    for seed in range(3):  # let stateful methods accumulate some state
        _engine_step(method, jacobian * (seed + 1), seed=seed)
    restored = _build(name, 3)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(_engine_step(method, jacobian, seed=9), _engine_step(restored, jacobian, seed=9))


def _same(first, second) -> bool:
    """Deep equality of two state dicts (tensors bitwise, NaN equal to NaN)."""
    if isinstance(first, torch.Tensor):
        if not isinstance(second, torch.Tensor) or first.shape != second.shape or first.dtype != second.dtype:
            return False
        if not first.is_floating_point():
            return torch.equal(first, second)
        both_nan = torch.isnan(first) & torch.isnan(second)
        return torch.equal(torch.isnan(first), torch.isnan(second)) and bool((both_nan | (first == second)).all())
    if isinstance(first, dict):
        if not isinstance(second, dict) or first.keys() != second.keys():
            return False
        return all(_same(first[key], second[key]) for key in first)
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))
    return first == second


def _build_seeded(name: str, num_tasks: int):
    """The method with a private generator where it has one (its state must not advance either)."""
    try:
        return get_method(name, num_tasks=num_tasks, seed=0)
    except ValueError:
        return get_method(name, num_tasks=num_tasks)


@pytest.mark.parametrize("name", list_methods())
def test_per_micro_step_hooks_only_read_state(name: str) -> None:
    """``transform_losses`` and ``combine_losses`` run per micro-step on each rank's own losses (and
    ``combine_losses`` again as the ``aggregate`` probe and for SAM), and a representation method's
    ``aggregate`` runs per micro-step too: none of them may change the method's state."""
    jacobian = _hard_inputs()["random"]
    method = _build_seeded(name, 3)
    for seed in range(2):  # some state first
        _engine_step(method, jacobian * (seed + 1), seed=seed)
    before = copy.deepcopy(method.state_dict())
    losses = torch.tensor([0.7, 1.9, 1.3])
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        method.transform_losses(losses.clone().requires_grad_(True))
        if isinstance(method, LossWeightingMethod):
            last_weights = method.last_weights
            method.loss_weights(losses, generator=generator)
            assert method.last_weights is last_weights  # the probe restores it
            method.combine_losses(losses.clone().requires_grad_(True), generator=generator)
        if method.requires_representation:
            method.aggregate(jacobian, losses=losses, generator=generator)
    assert _same(method.state_dict(), before), f"{name} changed its state in a per-micro-step hook"


@pytest.mark.parametrize("name", list_methods())
def test_float64_input_stays_float64(name: str) -> None:
    """The Gramian and the update of a float64 Jacobian are computed in float64 (not through float32)."""
    g = torch.Generator().manual_seed(1)
    jacobian = torch.randn(3, P, generator=g, dtype=torch.float64)
    update = _aggregate(_build(name, 3), jacobian)
    assert update.dtype == torch.float64
    # a perturbation far below float32's resolution must reach the update of linear methods
    nudged = _aggregate(_build(name, 3), jacobian + 1e-12 * torch.ones_like(jacobian))
    if name in {"ew", "ls", "trimmed_mean"}:
        assert not torch.equal(update, nudged)


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names are: .*pcgrad"):
        get_method("pcgrd")


def test_docs_table_lists_every_method_with_its_defaults() -> None:
    """``docs/methods.md`` has one row per registered method, whose defaults match the constructor."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    rows = {match[0]: match[1] for match in re.findall(r"^\| `(\w+)` \|(.*)$", text, flags=re.MULTILINE)}
    assert sorted(rows) == list_methods()
    for name, row in rows.items():
        parameters = inspect.signature(METHODS.get(name).__init__).parameters.values()
        defaults = ", ".join(f"`{p.name}={p.default!r}`" for p in parameters if p.name not in ("self", "num_tasks"))
        assert f"| {defaults or '—'} |" in row, (name, defaults)

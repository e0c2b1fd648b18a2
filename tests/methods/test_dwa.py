"""DWA (docs/methods.md, "DWA"): weights from a loss history worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mtl.methods import get_method


def _softmax_weights(ratios: list[float], temperature: float = 2.0) -> torch.Tensor:
    exps = [math.exp(r / temperature) for r in ratios]
    return torch.tensor([len(ratios) * e / sum(exps) for e in exps])


def _epoch(method, steps: list[list[float]]) -> None:
    for losses in steps:
        method.observe_losses(torch.tensor(losses))
    method.on_epoch_end(0)


def test_weights_from_a_hand_computed_history() -> None:
    method = get_method("dwa", num_tasks=2)
    losses = torch.tensor([1.0, 1.0])
    _epoch(method, [[2.0, 4.0], [4.0, 4.0]])  # averages (3, 4)
    method.combine_losses(losses)
    torch.testing.assert_close(method.last_weights, torch.ones(2))  # λ = 1 for the first two epochs
    _epoch(method, [[1.5, 4.0], [1.5, 2.0]])  # averages (1.5, 3): w = (0.5, 0.75)
    combined = method.combine_losses(torch.tensor([2.0, 3.0]))
    expected = _softmax_weights([0.5, 0.75])
    torch.testing.assert_close(method.last_weights, expected)
    torch.testing.assert_close(combined, expected @ torch.tensor([2.0, 3.0]))  # a sum, as LibMTL
    _epoch(method, [[3.0, 3.0]])  # averages (3, 3): w = (3 / 1.5, 3 / 3) = (2, 1)
    method.combine_losses(losses)
    torch.testing.assert_close(method.last_weights, _softmax_weights([2.0, 1.0]))
    torch.testing.assert_close(method.last_weights.sum(), torch.tensor(2.0))


def test_temperature() -> None:
    method = get_method("dwa", num_tasks=3, temperature=0.5)
    _epoch(method, [[1.0, 1.0, 1.0]])
    _epoch(method, [[0.5, 1.0, 2.0]])
    method.combine_losses(torch.ones(3))
    torch.testing.assert_close(method.last_weights, _softmax_weights([0.5, 1.0, 2.0], temperature=0.5))


def test_combining_does_not_record() -> None:
    method = get_method("dwa", num_tasks=2, window=1)
    for _ in range(5):
        method.combine_losses(torch.tensor([1.0, 9.0]))
    assert method.num_periods == 0 and method.period_count.sum() == 0


def test_window_of_steps() -> None:
    method = get_method("dwa", num_tasks=2, window=2)
    for losses in ([2.0, 4.0], [4.0, 4.0], [1.5, 4.0], [1.5, 2.0]):
        method.observe_losses(torch.tensor(losses))
    method.on_epoch_end(0)  # ignored in window mode
    assert method.num_periods == 2
    method.combine_losses(torch.ones(2))
    torch.testing.assert_close(method.last_weights, _softmax_weights([0.5, 0.75]))


def test_absent_task_counts_as_unchanged() -> None:
    method = get_method("dwa", num_tasks=3)
    _epoch(method, [[2.0, 2.0, 2.0]])
    # task 2 is absent from the second epoch: it keeps its average, ratio 1
    method.observe_losses(torch.tensor([1.0, 4.0]), task_ids=torch.tensor([0, 1]))
    method.on_epoch_end(1)
    method.combine_losses(torch.ones(2), task_ids=torch.tensor([2, 0]))
    torch.testing.assert_close(method.last_weights, _softmax_weights([0.5, 2.0, 1.0])[[2, 0]])


def test_state_round_trip_mid_history() -> None:
    method = get_method("dwa", num_tasks=2)
    _epoch(method, [[2.0, 4.0]])
    method.observe_losses(torch.tensor([1.0, 1.0]))
    restored = get_method("dwa", num_tasks=2)
    restored.load_state_dict(method.state_dict())
    for m in (method, restored):
        m.on_epoch_end(1)
        m.combine_losses(torch.ones(2))
    torch.testing.assert_close(restored.last_weights, method.last_weights)
    torch.testing.assert_close(method.last_weights, _softmax_weights([0.5, 0.25]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "`num_tasks`"),
        ({"num_tasks": 2, "temperature": 0}, "`temperature`"),
        ({"num_tasks": 2, "window": 0}, "`window`"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("dwa", **kwargs)

"""The CAGrad / Nash-MTL 2-D toy (docs/toy_pareto.md) and a short run of `examples/toy_pareto.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from toy_pareto import run_method  # noqa: E402
from toy_problem import distance_to_pareto_segment, toy_losses  # noqa: E402


def test_minimum_of_the_mean() -> None:
    losses = toy_losses(torch.tensor([0.0, -8.3551], dtype=torch.float64))
    assert losses.tolist() == pytest.approx([-15.0916, -15.0916], abs=1e-3)


@pytest.mark.parametrize("task, x1", [(0, 7.0), (1, -7.0)])
def test_single_task_minima(task: int, x1: float) -> None:
    point = torch.tensor([x1, -8.4345], dtype=torch.float64)
    assert toy_losses(point)[task].item() == pytest.approx(-19.989, abs=1e-3)
    # a local check that it is a minimum of that task: no neighbour on a small grid is lower
    offsets = torch.cartesian_prod(*(torch.linspace(-0.05, 0.05, 5, dtype=torch.float64),) * 2)
    assert toy_losses(point + offsets)[:, task].min().item() >= toy_losses(point)[task].item() - 1e-9


def test_the_mean_is_minimal_on_the_pareto_segment() -> None:
    x1 = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
    x2 = torch.linspace(-8.6, -8.1, 51, dtype=torch.float64)
    grid = torch.cartesian_prod(x1, x2)
    mean = toy_losses(grid).mean(dim=1)
    best = grid[mean.argmin()]
    assert best.tolist() == pytest.approx([0.0, -8.35], abs=0.02)
    assert distance_to_pareto_segment(best).item() < 0.02


def test_scale_multiplies_f1_only() -> None:
    points = torch.tensor([[-8.5, 7.5], [0.0, 0.0], [9.0, -1.0], [1.0, -8.0]])
    plain, scaled = toy_losses(points), toy_losses(points, 0.1)
    torch.testing.assert_close(scaled[:, 0], 0.1 * plain[:, 0])
    torch.testing.assert_close(scaled[:, 1], plain[:, 1])


def test_distance_to_pareto_segment() -> None:
    points = torch.tensor([[0.0, -8.3552], [9.0, -8.3552], [3.0, -7.3552]])
    torch.testing.assert_close(distance_to_pareto_segment(points), torch.tensor([0.0, 2.0, 1.0]))


@pytest.mark.parametrize("method", ["ew", "mgda"])
def test_a_short_run_decreases_the_losses(method: str) -> None:
    result = run_method(method, steps=200, lr=1e-2)
    assert result["error"] is None
    runs = result["runs"]
    assert len(runs) == 8 and all(run["error"] is None for run in runs)
    for run in runs:
        start = toy_losses(torch.tensor(run["init"]), 1.0 if run["problem"] == "cagrad" else 0.1)
        assert sum(run["final_losses"]) < start.sum().item()
        assert run["trajectory"].shape[-1] == 2

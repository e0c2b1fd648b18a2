"""EW (docs/methods.md, "EW / LS"): the mean of the task losses."""

from __future__ import annotations

import torch

from hf_mtl.methods import get_method


def test_weights_are_one_over_k() -> None:
    method = get_method("ew")
    losses = torch.tensor([1.0, 4.0, 7.0, 0.5])
    torch.testing.assert_close(method.combine_losses(losses), losses.mean())
    torch.testing.assert_close(method.last_weights, torch.full((4,), 0.25))
    torch.testing.assert_close(method.loss_weights(losses), torch.full((4,), 0.25))


def test_aggregate_is_the_mean_row() -> None:
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(get_method("ew").aggregate(jacobian), jacobian.mean(dim=0))


def test_task_subset_averages_the_present_tasks() -> None:
    method = get_method("ew", num_tasks=4)
    losses = torch.tensor([2.0, 6.0])
    torch.testing.assert_close(method.combine_losses(losses, task_ids=torch.tensor([3, 1])), torch.tensor(4.0))


def test_linear_in_the_rows() -> None:
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    scales = torch.tensor([[10.0], [1.0], [0.1]])
    torch.testing.assert_close(get_method("ew").aggregate(scales * jacobian), (scales * jacobian).mean(dim=0))

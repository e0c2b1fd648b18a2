"""LS (docs/methods.md, "EW / LS"): fixed weights, the plain sum by default."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def test_default_is_the_sum() -> None:
    method = get_method("ls")
    losses = torch.tensor([1.0, 2.0, 3.5])
    torch.testing.assert_close(method.combine_losses(losses), torch.tensor(6.5))
    torch.testing.assert_close(method.loss_weights(losses), torch.ones(3))
    jacobian = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method.aggregate(jacobian), jacobian.sum(dim=0))


def test_user_weights() -> None:
    method = get_method("ls", weights=[0.5, 2.0, 0.0])
    assert method.num_tasks == 3
    losses = torch.tensor([4.0, 1.0, 100.0])
    torch.testing.assert_close(method.combine_losses(losses), torch.tensor(4.0))
    torch.testing.assert_close(method.loss_weights(losses), torch.tensor([0.5, 2.0, 0.0]))
    jacobian = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(method.aggregate(jacobian), 0.5 * jacobian[0] + 2.0 * jacobian[1])


def test_task_subset_picks_its_weights() -> None:
    method = get_method("ls", weights=[1.0, 2.0, 3.0])
    method.combine_losses(torch.tensor([1.0, 1.0]), task_ids=torch.tensor([2, 0]))
    torch.testing.assert_close(method.last_weights, torch.tensor([3.0, 1.0]))


def test_weights_are_configuration_not_state() -> None:
    assert "weights" not in get_method("ls", weights=[1.0, 2.0]).state_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1.0, -1.0]}, "`weights` must be finite and >= 0"),
        ({"weights": [1.0, float("inf")]}, "`weights` must be finite and >= 0"),
        ({"weights": []}, "`weights` must be a non-empty list"),
        ({"num_tasks": 3, "weights": [1.0, 2.0]}, "one entry per task"),
    ],
)
def test_bad_weights(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("ls", **kwargs)

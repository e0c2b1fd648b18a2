"""GradDrop (docs/methods.md, "GradDrop"): sign purity, the masks, the batch sum, the leak."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method

from ._helpers import assert_draws_come_from_the_generator, assert_private_generator_resumes


def test_masks_by_hand_on_jacobian_rows() -> None:
    jacobian = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-1.0, -1.0, 1.0, 2.0]])
    # purity P per column: 0.5 (mixed), 0 (all negative), 1 (all positive), 1 (positive and zero)
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(3))
    update = get_method("graddrop").aggregate(jacobian, generator=torch.Generator().manual_seed(3))
    first = 1.0 if uniform[0] < 0.5 else -1.0  # keep the positive entry when P > U, else the negative one
    torch.testing.assert_close(update, torch.tensor([first, -3.0, 4.0, 2.0]))


def test_keeps_one_sign_per_coordinate() -> None:
    jacobian = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    update = get_method("graddrop").aggregate(jacobian, generator=torch.Generator().manual_seed(1))
    positive = jacobian.clamp(min=0).sum(dim=0)
    negative = jacobian.clamp(max=0).sum(dim=0)
    assert ((update == positive) | (update == negative)).all()
    assert (update == positive).any() and (update == negative).any()


def test_positive_sign_kept_with_probability_purity() -> None:
    # every column holds (3, -1): P = ½ (1 + 2/4) = 0.75
    jacobian = torch.tensor([[3.0], [-1.0]]).repeat(1, 4000)
    update = get_method("graddrop").aggregate(jacobian, generator=torch.Generator().manual_seed(2))
    assert set(update.unique().tolist()) == {3.0, -1.0}
    assert abs((update == 3.0).float().mean().item() - 0.75) < 0.03


def test_flattened_representation_signs() -> None:
    # per coordinate, sign(z) flips every G_i at once: P -> 1 - P and the kept sign follows
    jacobian = torch.tensor([[3.0, 3.0], [-1.0, -1.0]])
    representation = torch.tensor([1.0, -1.0])
    uniform = torch.rand(2, generator=torch.Generator().manual_seed(4))
    update = get_method("graddrop").aggregate(
        jacobian, representation=representation, generator=torch.Generator().manual_seed(4)
    )
    expected = torch.tensor([3.0 if 0.75 > uniform[0] else -1.0, 3.0 if 0.25 < uniform[1] else -1.0])
    torch.testing.assert_close(update, expected)
    # z = 0 (e.g. a ReLU that is off): no sign, the gradients there are dropped
    zero = get_method("graddrop").aggregate(jacobian, representation=torch.zeros(2))
    torch.testing.assert_close(zero, torch.zeros(2))


def test_batch_sum_with_a_shaped_representation() -> None:
    # z of shape (batch 2, features 2); rows are the per-task gradients of z flattened the same way
    representation = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    jacobian = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-2.0, 1.0, 1.0, 1.0]])
    # G_0 = Σ_b ∇z L_0 ⊙ sign z = (1 - 3, -2 - 1) = (-2, -3);  G_1 = (-2 - 1, -1 + 1) = (-3, 0)
    # feature 0: P = 0, both tasks kept; feature 1: P = 0, only task 0 (G_1 = 0) kept; for every sample
    update = get_method("graddrop").aggregate(jacobian, representation=representation)
    torch.testing.assert_close(update, torch.tensor([-1.0, 2.0, 4.0, -1.0]))


def test_leak() -> None:
    jacobian = torch.randn(2, 50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(get_method("graddrop", leak=1.0).aggregate(jacobian), jacobian.sum(dim=0))
    # task 0 leaks fully, task 1 is masked: the difference to the plain sum is task 1's dropped entries
    update = get_method("graddrop", num_tasks=2, leak=[1.0, 0.0]).aggregate(
        jacobian, generator=torch.Generator().manual_seed(6)
    )
    kept = update - jacobian[0]
    assert ((kept == 0) | torch.isclose(kept, jacobian[1])).all()
    assert (kept == 0).any() and (kept != 0).any()
    # with a subset, the leak follows the task ids
    swapped = get_method("graddrop", num_tasks=3, leak=[1.0, 0.0, 0.0]).aggregate(
        jacobian.flip(0), task_ids=torch.tensor([1, 0]), generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(swapped, update)


def test_reproducible_and_seeded() -> None:
    jacobian = torch.randn(3, 40, generator=torch.Generator().manual_seed(7))
    assert_draws_come_from_the_generator("graddrop", jacobian, seed=1, other_seed=2)
    assert_private_generator_resumes("graddrop", jacobian, seed=3, restored_seed=None, calls=1, checks=1)


def test_contract() -> None:
    method = get_method("graddrop")
    assert method.requires_representation and method.is_random
    method.aggregate(torch.randn(2, 3))
    assert method.last_weights is None
    with pytest.raises(ValueError, match="`representation` must have one element per column"):
        method.aggregate(torch.randn(2, 3), representation=torch.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leak": 1.5}, "`leak`"),
        ({"leak": [0.0, 0.1]}, "`leak`"),
        ({"num_tasks": 2, "leak": [0.0, 0.1, 0.2]}, "one entry per task"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_method("graddrop", **kwargs).aggregate(torch.randn(3, 2))

"""RLW (docs/methods.md, "RLW"): softmax of a fresh normal draw, on the simplex, reproducible."""

from __future__ import annotations

import torch

from hf_mtl.methods import get_method

from ._helpers import assert_draws_come_from_the_generator


def test_weights_are_softmax_of_a_normal_draw() -> None:
    method = get_method("rlw")
    losses = torch.tensor([1.0, 2.0, 3.0])
    combined = method.combine_losses(losses, generator=torch.Generator().manual_seed(5))
    expected = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(5)), dim=0)
    torch.testing.assert_close(method.last_weights, expected)
    torch.testing.assert_close(combined, expected @ losses)


def test_weights_on_the_simplex() -> None:
    method = get_method("rlw")
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([method.loss_weights(torch.ones(4), generator=generator) for _ in range(500)])
    assert (draws > 0).all()
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(500))
    # a fresh draw at every call, symmetric in the tasks
    assert len({tuple(row.tolist()) for row in draws}) == 500
    torch.testing.assert_close(draws.mean(dim=0), torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_reproducible_from_the_generator() -> None:
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    assert_draws_come_from_the_generator("rlw", jacobian, seed=7, other_seed=8)


def test_seeded_sequence_survives_a_checkpoint() -> None:
    losses = torch.ones(3)
    method = get_method("rlw", seed=11)
    for _ in range(3):
        method.combine_losses(losses)
    restored = get_method("rlw")
    restored.load_state_dict(method.state_dict())
    for _ in range(3):
        method.combine_losses(losses)
        restored.combine_losses(losses)
        assert torch.equal(method.last_weights, restored.last_weights)

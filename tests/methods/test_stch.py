"""STCH: smooth Tchebycheff scalarisation with a nadir from a warm-up (``Xi-L/STCH`` / LibMTL).

The method is driven as the engine drives it: per optimizer step, ``combine_losses`` for each
micro-batch, then ``observe_losses`` once with the step's mean losses; ``on_epoch_end`` per epoch.
"""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import get_method


def step(method, losses, task_ids=None) -> torch.Tensor:
    """One optimizer step of one micro-batch, in the engine's order; returns the combined loss."""
    losses = torch.as_tensor(losses, dtype=torch.float32)
    ids = None if task_ids is None else torch.tensor(task_ids)
    combined = method.combine_losses(losses, task_ids=ids)
    method.observe_losses(losses, task_ids=ids)
    return combined


class ReferenceSTCH:
    """LibMTL's ``STCH.backward`` transcribed line by line (epoch-driven, 1e-20 offsets)."""

    def __init__(self, num_tasks: int, mu: float, warmup_epoch: int) -> None:
        self.num_tasks, self.mu, self.warmup_epoch = num_tasks, mu, warmup_epoch
        self.epoch = 0
        self.nadir_vector = None
        self.average_loss = 0.0
        self.average_loss_count = 0

    def gradient(self, losses: torch.Tensor) -> torch.Tensor:
        losses = losses.clone().double().requires_grad_(True)
        if self.epoch < self.warmup_epoch:
            loss = torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
        elif self.epoch == self.warmup_epoch:
            loss = torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
            self.average_loss += losses.detach()
            self.average_loss_count += 1
        else:
            if self.nadir_vector is None:
                self.nadir_vector = self.average_loss / self.average_loss_count
            logs = torch.log(losses / self.nadir_vector + 1e-20)
            max_term = torch.max(logs.data).detach()
            reg_losses = logs - max_term
            loss = self.mu * torch.log(torch.sum(torch.exp(reg_losses / self.mu))) * self.num_tasks
        loss.backward()
        return losses.grad


@pytest.mark.parametrize("mu", [1.0, 0.3])
def test_matches_reference_over_epochs(mu: float) -> None:
    generator = torch.Generator().manual_seed(0)
    reference = ReferenceSTCH(3, mu=mu, warmup_epoch=2)
    method = get_method("stch", num_tasks=3, mu=mu, warmup_epochs=2)
    for epoch in range(5):
        for _ in range(4):
            losses = torch.rand(3, generator=generator, dtype=torch.float64) * 2 + 0.1
            expected = reference.gradient(losses)
            probe = losses.float().clone().requires_grad_(True)
            method.combine_losses(probe).backward()
            method.observe_losses(probe.detach())
            assert torch.allclose(probe.grad.double(), expected, rtol=1e-5), (epoch, probe.grad, expected)
            assert torch.allclose(method.last_weights.double(), expected, rtol=1e-5)
        reference.epoch += 1
        method.on_epoch_end(epoch)
    assert torch.allclose(method.nadir.double(), reference.nadir_vector.float().double(), rtol=1e-6)


def test_limits_of_mu() -> None:
    losses = torch.tensor([1.0, 3.0, 2.0])
    nadir = torch.tensor([1.0, 1.0, 4.0])  # L / z = (1, 3, 0.5): task 1 is the worst
    for mu, expected in ((1e-3, torch.tensor([0.0, 1.0, 0.0]) * 3 / losses), (1e4, 1.0 / losses)):
        method = get_method("stch", num_tasks=3, mu=mu, warmup_steps=1)
        step(method, nadir)  # the warm-up step sets the nadir
        assert torch.equal(method.nadir, nadir)
        method.combine_losses(losses)
        # small mu: all the weight on the worst task (K / L_1); large mu: 1 / L_i, i.e. ``si``
        assert torch.allclose(method.last_weights, expected, rtol=1e-3, atol=1e-6)


def test_warmup_steps_average_all_warmup_steps() -> None:
    method = get_method("stch", num_tasks=2, warmup_steps=3)
    for losses in ([1.0, 2.0], [3.0, 4.0], [2.0, 6.0]):
        assert torch.isnan(method.nadir).all()
        step(method, losses)
        assert torch.allclose(method.last_weights, 1.0 / torch.tensor(losses))
    assert method.steps == 3 and not method.in_warmup
    assert torch.allclose(method.nadir, torch.tensor([2.0, 4.0]))  # fixed by the last warm-up step
    step(method, [2.0, 4.0])
    # at the nadir both tasks are equally bad: softmax is uniform, weights K / (2 L_i) = 1 / L_i
    assert torch.allclose(method.last_weights, torch.tensor([0.5, 0.25]))


def test_warmup_counts_optimizer_steps_not_micro_batches() -> None:
    """Two micro-batches per step: the warm-up lasts two steps (four ``combine_losses`` calls) and the
    nadir averages the steps' mean losses, which the engine passes to ``observe_losses``."""
    method = get_method("stch", num_tasks=2, warmup_steps=2)
    windows = [([1.0, 2.0], [3.0, 2.0]), ([2.0, 8.0], [2.0, 4.0])]
    for micro_batches in windows:
        for losses in micro_batches:
            method.combine_losses(torch.tensor(losses))
            assert torch.allclose(method.last_weights, 1.0 / torch.tensor(losses))  # still warm-up
        method.observe_losses(torch.tensor(micro_batches).mean(dim=0))
    # step means (2, 2) and (2, 6): nadir (2, 4)
    assert torch.allclose(method.nadir, torch.tensor([2.0, 4.0]))
    assert method.steps == 2 and not method.in_warmup


def test_combine_losses_only_reads_state() -> None:
    """The engine may call ``combine_losses`` many times per step (micro-batches, SAM, the ``aggregate``
    probe): the warm-up must not advance and the nadir must not be collected there."""
    method = get_method("stch", num_tasks=2, warmup_steps=1)
    before = {key: value.clone() for key, value in method.state_dict().items() if torch.is_tensor(value)}
    for _ in range(5):
        method.combine_losses(torch.tensor([1.0, 2.0]))
        method.aggregate(torch.eye(2), losses=torch.tensor([1.0, 2.0]))
    assert method.steps == 0 and method.in_warmup
    for key, value in method.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[key]) or (torch.isnan(value).all() and torch.isnan(before[key]).all())
    # past the warm-up the reads do not store anything either
    step(method, [2.0, 4.0])
    nadir = method.nadir.clone()
    method.combine_losses(torch.tensor([9.0, 9.0]))
    assert torch.equal(method.nadir, nadir) and method.steps == 1


def test_subset_of_tasks_and_unseen_task_nadir() -> None:
    method = get_method("stch", num_tasks=3, warmup_steps=2)
    step(method, [2.0, 4.0], task_ids=[0, 1])
    step(method, [4.0], task_ids=[0])
    assert torch.allclose(method.nadir, torch.tensor([3.0, 4.0, 1.0]))  # task 2 unseen: 1
    step(method, [1.0, 1.0], task_ids=[0, 2])  # after the warm-up: nothing is collected
    assert torch.allclose(method.nadir, torch.tensor([3.0, 4.0, 1.0]))
    assert method.loss_count.tolist() == [2.0, 1.0, 0.0]


def test_epoch_mode_fixes_the_nadir_at_the_end_of_epoch_w() -> None:
    method = get_method("stch", num_tasks=2, warmup_epochs=1)
    step(method, [5.0, 5.0])  # epoch 0: warm-up, not collected
    method.on_epoch_end(0)
    step(method, [1.0, 2.0])  # epoch 1 = W: collected
    step(method, [3.0, 2.0])
    assert torch.isnan(method.nadir).all()
    method.on_epoch_end(1)
    assert torch.allclose(method.nadir, torch.tensor([2.0, 2.0]))


def test_state_round_trip_mid_warmup() -> None:
    method = get_method("stch", num_tasks=2, warmup_epochs=1)
    step(method, [1.0, 2.0])
    method.on_epoch_end(0)
    step(method, [3.0, 2.0])
    restored = get_method("stch", num_tasks=2, warmup_epochs=1)
    restored.load_state_dict(method.state_dict())
    assert restored.steps == 2
    for module in (method, restored):
        module.on_epoch_end(1)
        step(module, [1.5, 1.0])
    assert restored.epoch == 2
    assert torch.equal(restored.nadir, torch.tensor([3.0, 2.0]))
    assert torch.equal(method.last_weights, restored.last_weights)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`num_tasks`"):
        get_method("stch")
    with pytest.raises(ValueError, match="`mu`"):
        get_method("stch", num_tasks=2, mu=0.0)
    with pytest.raises(ValueError, match="`warmup_steps`"):
        get_method("stch", num_tasks=2, warmup_steps=0)

"""The base classes: Gramian precision, the loss-weighting probe, lazily sized state."""

from __future__ import annotations

import pytest
import torch

from hf_mtl.methods import GradientMethod, GramianMethod, LossWeightingMethod, get_method


class RecordingGramian(GramianMethod):
    """Uniform weights; remembers the Gramian it was given."""

    def weights_from_gramian(self, gramian, *, losses=None, task_ids=None, generator=None):
        self.seen = gramian
        return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_gramian_dtype_is_promoted_to_at_least_float32(dtype: torch.dtype, expected: torch.dtype) -> None:
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    method = RecordingGramian()
    update = method.aggregate(jacobian)
    assert method.seen.dtype == expected and method.last_weights.dtype == expected
    assert update.dtype == dtype
    if dtype == torch.float64:  # no round trip through float32
        assert torch.equal(method.seen, jacobian @ jacobian.T)
        assert torch.equal(update, method.last_weights @ jacobian)


class CountingWeighting(LossWeightingMethod):
    """A loss weighting that would count its calls if ``combine_losses`` wrote state."""

    def combine_losses(self, losses, *, task_ids=None, generator=None):
        self.last_weights = torch.full_like(losses.detach(), 7.0)
        return 2.0 * losses.sum()


def test_loss_weights_probe_restores_last_weights() -> None:
    method = CountingWeighting()
    assert method.last_weights is None
    weights = method.loss_weights(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(weights, torch.tensor([2.0, 2.0]))
    assert method.last_weights is None
    # aggregate records the probe's weights as the step's weights
    method.aggregate(torch.eye(2), losses=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(method.last_weights, torch.tensor([2.0, 2.0]))


class LazyState(GradientMethod):
    """A method with one lazily sized (K, P) buffer that counts the calls per row."""

    def __init__(self, num_tasks=None):
        super().__init__(num_tasks)
        self.register_lazy_buffer("counts")

    def aggregate(self, jacobian, *, losses=None, task_ids=None, generator=None, representation=None):
        index = self.resolve_task_index(jacobian.shape[0], task_ids, self.counts.device)
        counts = self.lazy_buffer("counts", (self.num_tasks, jacobian.shape[1]), 0.0)
        counts[index] += 1.0
        return jacobian.sum(dim=0)


def test_lazy_buffer_is_sized_at_the_first_call_and_checked_after() -> None:
    method = LazyState()
    assert method.state_dict()["counts"].shape == (0,)
    method.aggregate(torch.ones(2, 3))
    assert method.num_tasks == 2 and method.counts.shape == (2, 3)
    method.aggregate(torch.ones(2, 3))
    assert torch.equal(method.counts, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match=r"`counts` has shape \(2, 3\), this call needs \(2, 4\)"):
        method.aggregate(torch.ones(2, 4))


def test_lazy_buffer_loads_into_a_fresh_instance_and_back() -> None:
    method = LazyState()
    method.aggregate(torch.ones(3, 2))
    restored = LazyState()
    restored.load_state_dict(method.state_dict())  # strict: the key exists, the shape is taken
    assert restored.num_tasks == 3 and torch.equal(restored.counts, method.counts)
    # a subset step needs `num_tasks`, which the loaded state fixed
    restored.aggregate(torch.ones(1, 2), task_ids=torch.tensor([2]))
    assert restored.counts[:, 0].tolist() == [1.0, 1.0, 2.0]
    # loading an empty (never used) state empties the buffer again
    restored.load_state_dict(LazyState().state_dict())
    assert restored.counts.shape == (0,)


def test_lazy_state_of_registered_methods_is_plain_buffers() -> None:
    """K x P state lives in buffers (it follows ``Module.to``), not in the pickled extra state."""
    jacobian = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for name, buffers in {
        "moco": ("tracked", "task_weights"),
        "excess_mtl": ("squared_sum", "initial_excess", "task_weights"),
        "db_mtl": ("grad_ema", "steps"),
        "gradvac": ("phi_hat",),
        "modo": ("task_weights",),
        "sdmgrad": ("task_weights",),
        "cr_mogm": ("averaged",),
        "nash_mtl": ("alpha",),
    }.items():
        method = get_method(name)
        method.aggregate(jacobian, losses=torch.ones(3))
        named = dict(method.named_buffers())
        for buffer in buffers:
            assert named[buffer].shape[0] == 3, (name, buffer)
        extra = method.state_dict().get("_extra_state", {})
        assert not any(torch.is_tensor(value) for value in extra.values()), (name, extra)

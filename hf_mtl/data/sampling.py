"""Task sampling strategies: which task groups appear in each step (docs/architecture.md, step 1).

A *group* is the set of tasks that share one training dataset (FSDD's ``digit`` and ``speaker``
labels on the same clip); its tasks travel, and are drawn, together. With one task per dataset a
group is just a task.

======================  ===========================================================================
``all``                 every group every step (what gradient surgery usually wants)
``proportional``        one group per step, p_g ∝ n_g (dataset size)
``temperature``         one group per step, p_g ∝ n_g^(1/T) (T = ``sampling_temperature``)
``uniform``             one group per step, p_g = 1/G
``round_robin``         one group per step, in turn: g = step mod G
``annealed``            one group per step, p_g ∝ n_g^α with α = 1 − 0.8 (e − 1)/(E − 1) over epochs
                        e = 1..E (Stickland & Murray, 2019)
======================  ===========================================================================

Every draw comes from a `torch.Generator` seeded by the run's seed, the epoch and the step, so
every rank draws the same groups in the same step and a resumed run repeats the draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..registry import Registry

SAMPLERS: Registry[type[TaskSampler]] = Registry("task sampling strategy")


def list_samplers() -> list[str]:
    """The names of the registered task sampling strategies."""
    return SAMPLERS.names()


def get_sampler(name: str, sizes: Sequence[int], **kwargs: Any) -> TaskSampler:
    """Builds the task sampler registered under ``name`` over groups of ``sizes`` rows.

    Args:
        name (`str`): one of `list_samplers()`.
        sizes (`Sequence[int]`): rows per task group.
        **kwargs: ``seed``, ``temperature``, ``num_epochs``.

    Raises:
        `ValueError`: an unknown name (listing the valid ones) or invalid sizes / arguments.
    """
    return SAMPLERS.get(name)(sizes, **kwargs)


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded from ``seed`` and ``keys`` (epoch, step, ...), identical on every rank."""
    value = seed & 0xFFFFFFFF
    for key in keys:
        value = (value * 0x9E3779B1 + int(key) + 0x7F4A7C15) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class TaskSampler:
    """Base strategy.

    Args:
        sizes (`Sequence[int]`): number of training examples of each group.
        seed (`int`, *optional*, defaults to 42): the run's seed.
        temperature (`float`, *optional*, defaults to 2.0): used by ``temperature``.
        num_epochs (`int`, *optional*, defaults to 1): used by ``annealed``.
    """

    draws_all = False
    #: Whether the strategy weighs groups by their sizes (so streams of unknown length cannot use it).
    needs_sizes = True

    def __init__(self, sizes: Sequence[int], seed: int = 42, temperature: float = 2.0, num_epochs: int = 1) -> None:
        if not sizes:
            raise ValueError("a task sampler needs at least one task group")
        if any(isinstance(n, bool) or int(n) != n or n < 1 for n in sizes):
            raise ValueError(f"task group sizes must be positive integers, got {list(sizes)}")
        self.sizes = [int(n) for n in sizes]
        self.seed = seed
        self.temperature = temperature
        self.num_epochs = max(1, int(num_epochs))

    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        """p_g for each group (``all`` and ``round_robin`` give the long-run frequencies)."""
        raise NotImplementedError

    def draw(self, step: int, epoch: int = 0) -> list[int]:
        """The indices of the groups present in ``step`` of ``epoch``."""
        generator = step_generator(self.seed, epoch, step)
        return [int(torch.multinomial(self.probabilities(epoch), 1, generator=generator))]

    def steps_per_epoch(self, batches_per_group: Sequence[int]) -> int:
        """Steps in one epoch: one pass over every group's batches, in total."""
        return int(sum(batches_per_group))


@SAMPLERS.register("all")
class AllTasksSampler(TaskSampler):
    draws_all = True
    needs_sizes = False

    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        return torch.ones(len(self.sizes), dtype=torch.float64)

    def draw(self, step: int, epoch: int = 0) -> list[int]:
        return list(range(len(self.sizes)))

    def steps_per_epoch(self, batches_per_group: Sequence[int]) -> int:
        """One pass over the largest group; smaller groups cycle."""
        return int(max(batches_per_group))


@SAMPLERS.register("proportional")
class ProportionalSampler(TaskSampler):
    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        return sizes / sizes.sum()


@SAMPLERS.register("temperature")
class TemperatureSampler(TaskSampler):
    def __init__(self, sizes: Sequence[int], seed: int = 42, temperature: float = 2.0, num_epochs: int = 1) -> None:
        if temperature <= 0:
            raise ValueError(f"`sampling_temperature` must be > 0, got {temperature}")
        super().__init__(sizes, seed, temperature, num_epochs)

    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        weights = torch.tensor(self.sizes, dtype=torch.float64) ** (1.0 / self.temperature)
        return weights / weights.sum()


@SAMPLERS.register("uniform")
class UniformSampler(TaskSampler):
    needs_sizes = False

    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        return torch.full((len(self.sizes),), 1.0 / len(self.sizes), dtype=torch.float64)


@SAMPLERS.register("round_robin")
class RoundRobinSampler(UniformSampler):
    def draw(self, step: int, epoch: int = 0) -> list[int]:
        return [step % len(self.sizes)]


@SAMPLERS.register("annealed")
class AnnealedSampler(TaskSampler):
    def exponent(self, epoch: int) -> float:
        """α for 0-based ``epoch``: 1 at the first epoch, 0.2 at the last."""
        if self.num_epochs == 1:
            return 1.0
        return 1.0 - 0.8 * min(epoch, self.num_epochs - 1) / (self.num_epochs - 1)

    def probabilities(self, epoch: int = 0) -> torch.Tensor:
        weights = torch.tensor(self.sizes, dtype=torch.float64) ** self.exponent(epoch)
        return weights / weights.sum()

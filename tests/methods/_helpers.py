"""Helpers shared by the method tests: seeded random Jacobians and the checks several methods' tests make
(TorchJD-style properties over many generated matrices)."""

from __future__ import annotations

import itertools

import numpy as np
import quadprog
import torch

from hf_mtl.methods import get_method


def random_jacobians(count: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Seeded float64 matrices, K = 2..5, P in [10, 50], with a shared component and unequal scales so
    that conflicts, imbalance and inactive tasks all occur. The first n of ``count`` do not depend on
    ``count``."""
    generator = torch.Generator().manual_seed(seed)
    jacobians = []
    for index in range(count):
        num_tasks = 2 + index % 4
        num_params = int(torch.randint(10, 51, (1,), generator=generator))
        scales = torch.logspace(-1, 1, num_tasks, dtype=torch.float64)[torch.randperm(num_tasks, generator=generator)]
        rows = torch.randn(num_tasks, num_params, generator=generator, dtype=torch.float64) * scales[:, None]
        shared = torch.randn(num_params, generator=generator, dtype=torch.float64) * float(index % 3)
        jacobians.append(rows + shared)
    return jacobians


def row_permutations(num_rows: int, stop: int) -> list[list[int]]:
    """The permutations of ``range(num_rows)`` at positions 1 to ``stop - 1`` in lexicographic order
    (the identity, position 0, left out)."""
    return [list(permutation) for permutation in itertools.islice(itertools.permutations(range(num_rows)), 1, stop)]


def assert_non_finite_input_propagates(method, bad: float) -> None:
    """An overflowed gradient is not solved: the update stays non-finite in the column that holds ``bad``
    (uniform weights), so the trainer's overflow check sees it, and finite elsewhere; nothing raises."""
    jacobian = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    jacobian[1, 2] = bad
    update = method.aggregate(jacobian)
    assert not torch.isfinite(update[2]) and torch.isfinite(update[[0, 1, 3, 4]]).all()


def project_onto_dual_cone(jacobian: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Independent definition: ``argmin_x ||x - vector||²`` s.t. ``J x ≥ 0``, a P-variable QP with quadprog
    (the primal, not the K-variable dual that UPGrad and DualProj solve)."""
    num_params = jacobian.shape[1]
    return quadprog.solve_qp(np.eye(num_params), vector, jacobian.T.copy(), np.zeros(jacobian.shape[0]))[0]


def seeded_aggregate(name: str, jacobian: torch.Tensor, seed: int, **kwargs) -> torch.Tensor:
    """A fresh method's update, drawing from a generator seeded with ``seed``."""
    return get_method(name, **kwargs).aggregate(jacobian, generator=torch.Generator().manual_seed(seed))


def assert_draws_come_from_the_generator(name: str, jacobian: torch.Tensor, seed: int, other_seed: int) -> None:
    """A random method's update is the same for the same generator seed and differs for another one."""
    first = seeded_aggregate(name, jacobian, seed)
    assert torch.equal(first, seeded_aggregate(name, jacobian, seed))
    assert not torch.equal(first, seeded_aggregate(name, jacobian, other_seed))


def assert_private_generator_resumes(
    name: str, jacobian: torch.Tensor, *, seed: int, restored_seed: int | None, calls: int, checks: int
) -> None:
    """``seed``'s private generator, after ``calls`` calls without a generator, goes through the
    ``state_dict`` into a method built with ``restored_seed`` (or none), which then draws the same sequence:
    ``checks`` calls of both give equal updates."""
    method = get_method(name, seed=seed)
    for _ in range(calls):
        method.aggregate(jacobian)
    restored = get_method(name) if restored_seed is None else get_method(name, seed=restored_seed)
    restored.load_state_dict(method.state_dict())
    for _ in range(checks):
        assert torch.equal(restored.aggregate(jacobian), method.aggregate(jacobian))

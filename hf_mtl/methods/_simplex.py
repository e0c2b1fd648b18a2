"""Private helpers for methods whose task weights live on the probability simplex (MoDo, SDMGrad, MoCo,
and MGDA's solver in `_solvers`).

``project_onto_simplex`` is the Euclidean projection of Duchi et al. (ICML 2008), the algorithm behind
LibMTL's ``_projection2simplex`` (MoDo), SDMGrad's ``euclidean_proj_simplex`` and the projection step
of MGDA's reference solver; it is hf_mtl's only simplex projection (NumPy callers convert).

``simplex_subset`` / ``store_simplex_subset`` let a method that keeps one simplex vector over all
``num_tasks`` tasks act on the tasks present in a step (a sampler may leave some out): the present
entries are renormalised to the simplex, updated, and written back with their previous total mass, so
that the absent tasks keep their share. With every task present this is the plain update.
``step_simplex_state`` does the whole round trip for a simplex vector kept in a lazy buffer (MoDo,
SDMGrad).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import GradientMethod


def project_onto_simplex(vector: Tensor) -> Tensor:
    """The point of ``{w : w ≥ 0, Σ w = 1}`` closest to ``vector`` (1-D, finite) in Euclidean norm."""
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(f"`vector` must be a non-empty 1-D tensor, got shape {tuple(vector.shape)}")
    size = vector.numel()
    ordered, _ = torch.sort(vector, descending=True)
    shifted_sums = ordered.cumsum(0) - 1.0
    ranks = torch.arange(1, size + 1, dtype=vector.dtype, device=vector.device)
    # the largest rank whose entry stays positive after the shift; rank 1 always qualifies
    support = int((ordered - shifted_sums / ranks > 0).nonzero().max())
    threshold = shifted_sums[support] / (support + 1)
    return (vector - threshold).clamp_min(0.0)


def simplex_subset(weights: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of ``weights`` at ``index`` renormalised to the simplex, and their total mass.

    A subset whose entries are all zero starts again from uniform weights.
    """
    subset = weights[index]
    mass = subset.sum()
    if mass > 0:
        return subset / mass, mass
    return torch.full_like(subset, 1.0 / subset.numel()), mass


def store_simplex_subset(weights: Tensor, index: Tensor, subset: Tensor, mass: Tensor) -> None:
    """Writes the simplex vector ``subset`` back at ``index`` with the total ``mass`` it had (in place)."""
    scale = mass if mass > 0 else torch.as_tensor(index.numel() / weights.numel(), dtype=weights.dtype)
    weights[index] = (subset * scale).to(weights.dtype)


def step_simplex_state(
    method: GradientMethod, name: str, num_rows: int, task_ids: Tensor | None, step: Callable[[Tensor], Tensor]
) -> Tensor:
    """Applies ``step`` to the simplex vector that ``method`` keeps over its tasks in the lazy buffer
    ``name`` (one entry per task, uniform at the start), for the ``num_rows`` tasks of a call.

    On the CPU (the K-sized solve is sequential): the present tasks' entries renormalised to the simplex
    (`simplex_subset`), ``step`` maps them to their new value on the simplex, which is written back with
    their previous mass (`store_simplex_subset`). Returns the new value, ``step``'s output.
    """
    index = method.resolve_task_index(num_rows, task_ids, torch.device("cpu"))
    state = method.lazy_buffer(name, (method.num_tasks,), 1.0 / method.num_tasks)
    task_weights = state.cpu()
    weights, mass = simplex_subset(task_weights, index)
    weights = step(weights)
    store_simplex_subset(task_weights, index, weights, mass)
    state.copy_(task_weights)
    return weights

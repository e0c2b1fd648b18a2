"""MoDo: multi-objective gradient descent with double sampling (Chen et al., "Three-Way Trade-Off in
Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 / JMLR
2024, https://openreview.net/forum?id=yPkbdJxQ0o).

MGDA's weights (the min-norm point of the simplex) are tracked by one projected-gradient step per
training step instead of being solved exactly::

    λ ← Π_Δ( λ - γ (J_1 J_2ᵀ λ + ρ λ) )        λ_0 = (1/K) 1;  Π_Δ: projection onto the simplex
    d = J_3ᵀ λ = Σ_i λ_i g_i^(3)

In the paper J_1, J_2, J_3 are the Jacobians of three independent mini-batches: two make
``J_1 J_2ᵀ λ`` an unbiased estimate of ``∇_λ ½||Jᵀλ||²``, the third keeps the update independent of
λ. Reference: LibMTL ``LibMTL/weighting/MoDo.py`` (three batches, ``MoDo_gamma = 1e-3``,
``MoDo_rho = 0.1`` in LibMTL's ``config.py``); the authors' ``heshandevaka/Trade-Off-MOL`` uses two
batches and their sum for the update.

**One Jacobian.** hf_mtl's engine builds one Jacobian J per step, so ``aggregate(J)`` uses it for all
three: ``λ ← Π_Δ(λ - γ (G λ + ρ λ))`` with ``G = J Jᵀ``, then ``d = Jᵀ λ``. The λ-gradient is then
biased (the bias the double sampling removes), but λ is still a stochastic projected-gradient
iterate of MGDA's problem. With independent batches, call ``weights_from_gramian(J_1 @ J_2.T)`` (the
matrix need not be symmetric) and combine the returned weights with J_3 yourself.

The projection is the Euclidean one (Duchi et al.), as LibMTL's ``_projection2simplex``. Tasks left out
of a step by a sampler: λ over the present tasks is renormalised to the simplex, updated and written
back with its previous total (``_simplex.py``). The step size γ is not scale free: the λ step grows
with ``||g||²`` (as in the reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._simplex import project_onto_simplex, step_simplex_state
from .base import GramianMethod
from .registry import register_method


@register_method("modo")
class MoDo(GramianMethod):
    """MoDo: one projected-gradient step of MGDA's weights per call.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; taken from the first Jacobian when not given.
        gamma (`float`, *optional*, defaults to `1e-3`):
            Step size γ of the weight update.
        rho (`float`, *optional*, defaults to `0.1`):
            ℓ2 regularisation ρ of the weight update.
    """

    def __init__(self, num_tasks: int | None = None, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__(num_tasks)
        if not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"`gamma` must be a finite float > 0, got {gamma!r}")
        if not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"`rho` must be a finite float >= 0, got {rho!r}")
        self.gamma = float(gamma)
        self.rho = float(rho)
        #: λ over all ``num_tasks`` tasks (float64); empty until the first call.
        self.register_lazy_buffer("task_weights", dtype=torch.float64)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gram = gramian.detach().to(device="cpu", dtype=torch.float64)

        def step(weights: Tensor) -> Tensor:  # λ ← Π_Δ(λ - γ (G λ + ρ λ))
            return project_onto_simplex(weights - self.gamma * (gram @ weights + self.rho * weights))

        weights = step_simplex_state(self, "task_weights", gram.shape[0], task_ids, step)
        return weights.to(device=gramian.device, dtype=gramian.dtype)

"""MoCo: multi-objective gradient correction (Fernando et al., "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023,
https://openreview.net/forum?id=dLAYGdKTi2).

Stochastic MGDA is biased because its weights depend on the same noisy gradients they combine.
MoCo tracks each task gradient with a moving average Y and takes one step on MGDA's weights λ per
call, with decaying step sizes (t counts the calls)::

    ĝ_i = L_i · g_i / (||g_i|| + 1e-8)                       (gradients rescaled to the loss)
    Y_i ← Y_i - (β / t^{σ_β}) (Y_i - ĝ_i)                    Y_0 = 0
    λ   ← softmax(λ - (γ / t^{σ_γ}) (Y Yᵀ + ρ I) λ)          λ_0 = (1/K) 1
    d   = Yᵀ λ = Σ_i λ_i Y_i

Reference: LibMTL ``LibMTL/weighting/MoCo.py`` ("implemented based on the author's sharing code")
with LibMTL's defaults β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5, ρ = 0. The authors' own LibMTL fork
(``heshandevaka/Trade-Off-MOL``) differs: no ``L_i / ||g_i||`` rescaling by default and a Euclidean
projection onto the simplex instead of the softmax; hf_mtl follows LibMTL.

Without ``losses``, ``L_i = 1`` (unit-norm gradients). Y has the shape of the Jacobian (K x P,
float32, a lazy buffer sized at the first call): the method holds one extra copy of the per-task
gradients. Tasks left out of a step by a sampler: their rows of Y are not updated, and λ over the
present tasks is renormalised to the simplex, updated and written back with its previous total; t
counts all calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._simplex import simplex_subset, store_simplex_subset
from .base import GradientMethod
from .registry import register_method


@register_method("moco")
class MoCo(GradientMethod):
    """MoCo: tracked gradients combined with one-step MGDA weights.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; taken from the first Jacobian when not given.
        beta (`float`, *optional*, defaults to `0.5`):
            Step size β of the gradient tracking.
        beta_sigma (`float`, *optional*, defaults to `0.5`):
            Decay exponent σ_β of β (β / t^{σ_β}).
        gamma (`float`, *optional*, defaults to `0.1`):
            Step size γ of the weight update.
        gamma_sigma (`float`, *optional*, defaults to `0.5`):
            Decay exponent σ_γ of γ.
        rho (`float`, *optional*, defaults to `0.0`):
            ℓ2 regularisation ρ of the weight update.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__(num_tasks)
        for field, value in (
            ("beta", beta),
            ("beta_sigma", beta_sigma),
            ("gamma", gamma),
            ("gamma_sigma", gamma_sigma),
            ("rho", rho),
        ):
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{field}` must be a finite float >= 0, got {value!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        #: Y, the tracked (rescaled) task gradients, shape (num_tasks, P); empty until the first call.
        self.register_lazy_buffer("tracked")
        #: λ over all ``num_tasks`` tasks; empty until the first call.
        self.register_lazy_buffer("task_weights")
        self.steps = 0

    def aggregate(
        self,
        jacobian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        representation: Tensor | None = None,
    ) -> Tensor:
        self._check_jacobian(jacobian)
        num_rows, num_params = jacobian.shape
        device = self.tracked.device
        index = self.resolve_task_index(num_rows, task_ids, device)
        tracked_state = self.lazy_buffer("tracked", (self.num_tasks, num_params), 0.0)
        weights_state = self.lazy_buffer("task_weights", (self.num_tasks,), 1.0 / self.num_tasks)
        matrix = jacobian.detach().to(device=device, dtype=torch.float32)
        scales = torch.ones(num_rows, device=device) if losses is None else losses.detach().to(device, torch.float32)
        rescaled = matrix / (matrix.norm(dim=1, keepdim=True) + 1e-8) * scales.reshape(-1, 1)

        self.steps += 1
        beta = self.beta / self.steps**self.beta_sigma
        gamma = self.gamma / self.steps**self.gamma_sigma
        tracked = tracked_state[index] - beta * (tracked_state[index] - rescaled)
        tracked_state[index] = tracked
        weights, mass = simplex_subset(weights_state, index)
        regularised = tracked @ tracked.T + self.rho * torch.eye(num_rows, device=device)
        weights = torch.softmax(weights - gamma * (regularised @ weights), dim=0)
        store_simplex_subset(weights_state, index, weights, mass)
        self.last_weights = weights.clone()
        return (weights @ tracked).to(device=jacobian.device, dtype=jacobian.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

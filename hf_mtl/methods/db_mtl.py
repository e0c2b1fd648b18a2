"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023, https://arxiv.org/abs/2308.12029;
docs/methods.md, "DB-MTL").

Loss-scale balancing by a log transform, gradient-magnitude balancing by rescaling every task's
(smoothed) gradient to the largest norm::

    transform_losses:   L_i  ->  log(L_i + ε)                             ε = 1e-8
    per step t_i (the number of steps that held task i):
        ĝ_i ← g_i + (β / t_i^σ) (ĝ_i - g_i)                               β = 0.9, σ = 0, ĝ_i starts at 0
        α_i = max_j ||ĝ_j|| / ||ĝ_i||
        d   = Σ_i α_i ĝ_i                                                 (every α_i ĝ_i has norm max_j ||ĝ_j||)

This is LibMTL's ``DB_MTL.py`` (``DB_beta=0.9``, ``DB_beta_sigma=0``). The rows given to ``aggregate``
are the gradients of the *transformed* losses (the engine differentiates what ``transform_losses``
returns); on a plain matrix they are taken as such. Like the reference, the EMA starts at zero
without bias correction, so the first update is (1 - β) times the scale of the later ones.

Deviations: a zero ĝ_i gets α_i = 0 (LibMTL divides by ``||ĝ_i|| + 1e-8``, which also shrinks the
weight of tiny but non-zero rows); ``t_i`` counts the steps of each task, not global steps, so that
tasks left out of some steps by a sampler decay as if they had been present (identical when every
task is in every step, and irrelevant with the default σ = 0). Tasks absent from a step keep their
ĝ and do not enter ``d``.

State: ĝ (K x P, the size of the Jacobian, float32) and the step counts are lazy buffers (base
``register_lazy_buffer``) sized at the first call; ``load_state_dict`` resizes them, so a fresh
instance can load a checkpoint.
``last_weights`` holds α, the weights of the smoothed rows ĝ_i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GradientMethod
from .registry import register_method


@register_method("db_mtl")
class DBMTL(GradientMethod):
    """DB-MTL: log losses, EMA of the task gradients, every task rescaled to the largest norm.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Needed when ``task_ids`` select a subset; otherwise read from the
            first Jacobian.
        beta (`float`, *optional*, defaults to `0.9`):
            The EMA factor β in [0, 1) of the task gradients (0: no smoothing).
        beta_sigma (`float`, *optional*, defaults to `0.0`):
            σ ≥ 0, the decay of β with the step: the EMA factor at step t is β / t^σ.
        eps (`float`, *optional*, defaults to `1e-8`):
            Added to the losses before the logarithm.
    """

    def __init__(
        self, num_tasks: int | None = None, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__(num_tasks)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be a float in [0, 1), got {beta!r}")
        if (
            isinstance(beta_sigma, bool)
            or not isinstance(beta_sigma, (int, float))
            or not (math.isfinite(beta_sigma) and beta_sigma >= 0)
        ):
            raise ValueError(f"`beta_sigma` must be a finite float >= 0, got {beta_sigma!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"`eps` must be a finite float > 0, got {eps!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        #: ĝ, shape (num_tasks, P); empty until the first call (or a loaded state).
        self.register_lazy_buffer("grad_ema")
        #: t_i, the number of steps that held task i; empty until the first call.
        self.register_lazy_buffer("steps")

    def transform_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> Tensor:
        """``log(L + eps)``: the losses must be ≥ 0 (a negative loss gives NaN, as in the reference)."""
        return torch.log(losses + self.eps)

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
        num_rows, num_columns = jacobian.shape
        index = self.resolve_task_index(num_rows, task_ids, self.grad_ema.device)
        grad_ema = self.lazy_buffer("grad_ema", (self.num_tasks, num_columns), 0.0)
        step_counts = self.lazy_buffer("steps", (self.num_tasks,), 0.0)

        with torch.no_grad():
            rows = jacobian.detach().to(device=grad_ema.device, dtype=torch.float32)
            steps = step_counts[index] + 1
            decay = (self.beta / steps.pow(self.beta_sigma)).unsqueeze(1)
            smoothed = rows + decay * (grad_ema[index] - rows)
            grad_ema[index] = smoothed
            step_counts[index] = steps

            norms = smoothed.norm(dim=1)
            nonzero = norms > 0
            alpha = torch.where(nonzero, norms.max() / torch.where(nonzero, norms, 1.0), 0.0)
            update = alpha @ smoothed
        self.last_weights = alpha
        return update.to(device=jacobian.device, dtype=jacobian.dtype)

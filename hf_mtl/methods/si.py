"""SI: scale-invariant loss, the sum of the log-losses (Phan et al., arXiv 2211.13723, the "SI" rows of the
F-MTL tables; baseline of Nash-MTL, FAMO and F-MTL)::

    L = Σ_i log L_i          ⇒      ∂L/∂L_i = 1 / L_i           the task weights

Multiplying a task's loss by a constant adds a constant to ``L``: the update does not depend on the
losses' scales (hence the name). Reference: nash-mtl ``methods/weight_methods.py``
``ScaleInvariantLinearScalarization`` (``torch.sum(torch.log(losses) * task_weights)``, weights 1),
the code behind the SI rows in Nash-MTL, FAMO and F-MTL. Deviation: losses are clamped to ``eps``
(1e-8) before the logarithm, so a zero loss gives a finite update (its weight is then 0) instead of
``-inf``. Losses must be positive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LossWeightingMethod
from .registry import register_method


@register_method("si")
class ScaleInvariant(LossWeightingMethod):
    """Scale-invariant loss: ``C(L) = Σ_i log L_i``.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; not needed.
        eps (`float`, *optional*, defaults to `1e-8`):
            Losses are clamped to at least ``eps`` before the logarithm.
    """

    weights_depend_on_losses = True

    def __init__(self, num_tasks: int | None = None, eps: float = 1e-8) -> None:
        super().__init__(num_tasks)
        if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"`eps` must be a finite float > 0, got {eps!r}")
        self.eps = float(eps)

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        clamped = self.clamp(losses)
        self.last_weights = self.zero_where_clamped(losses, 1.0 / clamped.detach())
        return clamped.log().sum()

    def clamp(self, losses: Tensor) -> Tensor:
        """The losses in float32, clamped to at least ``eps`` (for the logarithm)."""
        return losses.to(torch.float32).clamp_min(self.eps)

    def zero_where_clamped(self, losses: Tensor, weights: Tensor) -> Tensor:
        """``weights`` with 0 for the losses below ``eps`` (their clamped logarithm is constant)."""
        return torch.where(losses.detach() >= self.eps, weights, torch.zeros_like(weights))

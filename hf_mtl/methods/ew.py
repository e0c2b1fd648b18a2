"""EW: equal weighting, the mean of the task losses (docs/methods.md, "EW / LS").

    L = (1/K) Σ_i L_i        ⇒        d = (1/K) Σ_i g_i

One backward of the mean loss; no Jacobian. (LibMTL's ``EW`` sums instead; hf_mtl's ``ew`` is the
mean so that its scale matches a single-task run, and ``ls`` with all weights 1 gives the sum.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeightingMethod
from .registry import register_method


@register_method("ew")
class EqualWeighting(LossWeightingMethod):
    """Equal weighting: ``C(L) = mean_i L_i``."""

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        self.last_weights = torch.full_like(losses.detach(), 1.0 / losses.numel())
        return losses.mean()

"""GLS: geometric loss strategy (Chennupati et al., "MultiNet++", CVPR 2019 Workshops).

Paper: https://openaccess.thecvf.com/content_CVPRW_2019/papers/WAD/Chennupati_MultiNet_Multi-Stream_Feature_Aggregation_and_Geometric_Loss_Strategy_for_Multi-Task_CVPRW_2019_paper.pdf

The combined loss is the geometric mean of the task losses::

    L = (Π_i L_i)^{1/K} = exp((1/K) Σ_i log L_i)
    ∂L/∂L_i = L / (K L_i)                   the task weights

so a task whose loss is small gets a large weight: the update equals ``L / K`` times that of
``si`` (``Σ log L_i``), i.e. GLS is scale invariant in direction. Reference: LibMTL
``LibMTL/weighting/GLS.py`` (``torch.pow(losses.prod(), 1/K).backward()``). Deviations:

- the product is taken in log space (``exp(mean(log L))``), which equals LibMTL's
  ``prod ** (1/K)`` but neither under- nor overflows for many tasks;
- losses are clamped to ``eps`` (1e-8) first, so a zero loss gives a finite (zero) update instead of
  NaN; a clamped loss gets weight 0;
- LibMTL logs ``L_i / (K Π_j L_j)`` as the weights, which is not the derivative; ``last_weights``
  here is ``∂L/∂L_i``.

Losses must be positive (LibMTL's requirement as well): use it with cross-entropy-like losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_method
from .si import ScaleInvariant


@register_method("gls")
class GeometricLossStrategy(ScaleInvariant):
    """Geometric loss strategy: ``C(L) = (Π_i L_i)^{1/K}``, on SI's clamped losses (hence the subclass).

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; not needed (the mean runs over the given losses).
        eps (`float`, *optional*, defaults to `1e-8`):
            Losses are clamped to at least ``eps`` before the logarithm.
    """

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        clamped = self.clamp(losses)
        combined = clamped.log().mean().exp()
        self.last_weights = self.zero_where_clamped(losses, combined.detach() / (losses.numel() * clamped.detach()))
        return combined

"""UW: uncertainty weighting (Kendall et al., CVPR 2018, https://arxiv.org/abs/1705.07115;
docs/methods.md, "Uncertainty weighting").

The paper minimises ``Σ_i L_i / (2σ_i²) + log σ_i``. With the learnable log-variance
``s_i = log σ_i²`` (LibMTL's parametrisation)::

    L = Σ_i  L_i / (2 e^{s_i})  +  s_i / 2          s_i initialised to -0.5 (LibMTL)
    ∂L/∂L_i = 1 / (2 e^{s_i})                        the task weights
    ∂L/∂s_i = 1/2 - L_i / (2 e^{s_i}) = 0   ⇔   s_i = log L_i

nash-mtl's ``Uncertainty`` writes the same function as ``0.5 (e^{-s} L + s)`` but starts from
``s = 0`` and gives ``s`` its own learning rate (``--method-params-lr 0.025``): use
``init_log_variance=0.0`` and a separate parameter group for ``s`` to reproduce it.

``s`` is an ``nn.Parameter`` of this module: the Trainer's optimizer must own it (it receives its
gradient from the single backward of ``combine_losses``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("uw")
class UncertaintyWeighting(LossWeightingMethod):
    """Uncertainty weighting with learnable log-variances ``s`` (one per task).

    Args:
        num_tasks (`int`):
            Number of tasks K (required: ``s`` has one entry per task).
        init_log_variance (`float`, *optional*, defaults to `-0.5`):
            Initial value of every ``s_i = log σ_i²``; -0.5 as in LibMTL, 0.0 as in nash-mtl.
    """

    def __init__(self, num_tasks: int | None = None, init_log_variance: float = -0.5) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `uw` (one log-variance per task), got None")
        if not isinstance(init_log_variance, (int, float)) or not math.isfinite(init_log_variance):
            raise ValueError(f"`init_log_variance` must be a finite float, got {init_log_variance!r}")
        #: s_i = log σ_i², learned by the Trainer's optimizer.
        self.log_variance = nn.Parameter(torch.full((num_tasks,), float(init_log_variance)))

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        s = self.log_variance[task_index(losses, task_ids, self.num_tasks).to(self.log_variance.device)]
        s = s.to(losses.device)
        precision = torch.exp(-s)
        self.last_weights = (0.5 * precision).detach()
        return (0.5 * precision * losses.to(s.dtype) + 0.5 * s).sum()

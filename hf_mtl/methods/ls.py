"""LS: linear scalarisation with fixed user weights (docs/methods.md, "EW / LS").

    L = Σ_i w_i L_i        ⇒        d = Σ_i w_i g_i

With the default weights (all ones) this is the plain *sum* of the task losses, which is what
LibMTL's ``EW`` and nash-mtl's ``ls`` compute; hf_mtl's ``ew`` is the mean instead. One backward of
the weighted sum; no Jacobian, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("ls")
class LinearScalarization(LossWeightingMethod):
    """Linear scalarisation: ``C(L) = Σ_i w_i L_i`` with fixed weights.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Inferred from ``weights`` when only they are given.
        weights (`list[float]`, *optional*, defaults to all ones):
            One finite, non-negative weight per task. All ones gives the sum of the losses.
    """

    def __init__(self, num_tasks: int | None = None, weights: Sequence[float] | None = None) -> None:
        super().__init__(num_tasks)
        if weights is None:
            self.register_buffer("weights", None, persistent=False)
            return
        values = torch.as_tensor(weights, dtype=torch.float32)
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"`weights` must be a non-empty list of floats, got {weights!r}")
        if num_tasks is not None and values.numel() != num_tasks:
            raise ValueError(f"`weights` must have one entry per task ({num_tasks}), got {values.numel()}: {weights!r}")
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"`weights` must be finite and >= 0, got {weights!r}")
        self.num_tasks = values.numel()
        # configuration, not learned state: moves with `.to()` but stays out of the state_dict
        self.register_buffer("weights", values, persistent=False)

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        if self.weights is None:
            weights = torch.ones(losses.numel(), device=losses.device)
            if self.num_tasks is not None:
                task_index(losses, task_ids, self.num_tasks)  # validates the shapes only
        else:
            weights = self.weights.to(losses.device)[task_index(losses, task_ids, self.num_tasks)]
        self.last_weights = weights.detach()
        return (weights * losses.to(torch.float32)).sum()

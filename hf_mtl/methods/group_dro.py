"""GroupDRO: group distributionally robust optimisation with tasks as groups (Sagawa et al., ICLR 2020,
https://arxiv.org/abs/1911.08731), the robust-MTL baseline of ExcessMTL (He et al., ICML 2024).

The task weights q follow an exponentiated-gradient ascent on the losses, so the task that is
currently worst gets more weight::

    L   = Σ_i q_i L_i                                     ∂L/∂L_i = q_i       (q = 1 at the start)
    q_i ← q_i · exp(η L_i),    q ← K · q / Σ_j q_j      (once per optimizer step, in ``observe_losses``)

Reference: ``yifei-he/ExcessMTL`` ``LibMTL/LibMTL/weighting/GroupDRO.py`` (default
``robust_step_size`` 1e-2 from that repository's ``config.py``). The update is computed in log space
(``q = K · softmax(log q + η L)``, the same numbers) so that large ``η L`` cannot overflow.

Tasks left out of a step by a sampler keep their weight: only the present tasks' weights are
updated, renormalised to the total they had. A non-finite loss adds no increment to its task's log-weight.

Deviation from the reference, for data-parallel runs: the reference updates q from each batch's
losses just before combining them. Here q is updated in ``observe_losses``, which the engine calls
once per optimizer step, after the step's ``combine_losses`` calls, with the step's mean losses over
every rank and micro-batch (identical on all ranks); so the q that weighs a step comes from the
losses of the steps before it (a lag of one step: step t uses the reference's q of step t - 1).
``combine_losses`` only reads q, so it may be called any number of times per step (gradient
accumulation, SAM's ascent, the ``aggregate`` probe). Outside the engine, call ``observe_losses``
once per step yourself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("group_dro")
class GroupDRO(LossWeightingMethod):
    """GroupDRO over tasks: exponentiated-gradient task weights driven by the losses.

    Args:
        num_tasks (`int`):
            Number of tasks K (required: one weight per task).
        robust_step_size (`float`, *optional*, defaults to `0.01`):
            Step size η of the exponentiated-gradient update.
    """

    def __init__(self, num_tasks: int | None = None, robust_step_size: float = 1e-2) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `group_dro` (one weight per task), got None")
        if not isinstance(robust_step_size, (int, float)) or not (
            math.isfinite(robust_step_size) and robust_step_size > 0
        ):
            raise ValueError(f"`robust_step_size` must be a finite float > 0, got {robust_step_size!r}")
        self.robust_step_size = float(robust_step_size)
        #: q, the task weights (sum K).
        self.register_buffer("weights", torch.ones(num_tasks))

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        index = task_index(losses, task_ids, self.num_tasks).to(self.weights.device)
        weights = self.weights[index].to(losses.device)
        self.last_weights = weights.clone()
        return (weights * losses.to(torch.float32)).sum()

    @torch.no_grad()
    def observe_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> None:
        """The exponentiated-gradient step ``q_i ← q_i e^{η L_i}`` (renormalised) with the step's mean losses."""
        index = task_index(losses, task_ids, self.num_tasks).to(self.weights.device)
        observed = losses.detach().to(device=self.weights.device, dtype=torch.float32)
        current = self.weights[index]
        mass = current.sum()
        increment = torch.where(torch.isfinite(observed), observed, torch.zeros_like(observed))
        logits = current.clamp_min(torch.finfo(torch.float32).tiny).log() + self.robust_step_size * increment
        self.weights[index] = torch.softmax(logits, dim=0) * mass

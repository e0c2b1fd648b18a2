"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024,
https://arxiv.org/abs/2402.02009).

Tasks are weighted by their *excess* risk (the distance to their own optimum), not by their loss, so
a task with a high but irreducible loss (label noise) is not up-weighted. The excess risk is
estimated by a second-order Taylor expansion with an AdaGrad-style diagonal Hessian ``H_i``, and the
weights follow an exponentiated-gradient step::

    S_i ← S_i + g_i ⊙ g_i                         (per-task sum of squared gradients, K x P)
    E_i = g_iᵀ H_i⁻¹ g_i = Σ_p g_ip² / sqrt(S_ip + 1e-7)
    first call:  E_i(0) = E_i, weights unchanged
    after:       q_i ← q_i · exp(η E_i / E_i(0)),   q ← K q / Σ_j q_j       (q = 1 at the start)
    d = Σ_i q_i g_i

Reference: LibMTL ``LibMTL/weighting/ExcessMTL.py`` (from the authors' ``yifei-he/ExcessMTL``), with
``robust_step_size`` η = 1e-2 (both repositories' ``config.py``). Deviations:

- the exponentiated step is computed in log space (``K · softmax(log q + η E / E(0))``, the same
  numbers) so that it cannot overflow;
- a task whose first excess estimate is 0 (a zero gradient) gets ratio 0 instead of the reference's
  division by zero (NaN);
- tasks left out of a step by a sampler: S accumulates only the rows present; a task's E(0) is its
  first estimate, and on that call its ratio is 0 (with all tasks present at the first call this is
  exactly the reference's "no update on the first call"); the present tasks' weights are updated and
  renormalised to the total they had.

S has the shape of the Jacobian (K x P, float32, a lazy buffer sized at the first call): one extra
copy of the per-task gradients, as in the reference. TorchJD's ``ExcessMTLWeighting`` (a branch)
starts from ``q = 1/K`` and can warm up for several calls; hf_mtl keeps the reference's ``q = 1``
and one call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GradientMethod
from .registry import register_method


@register_method("excess_mtl")
class ExcessMTL(GradientMethod):
    """ExcessMTL: exponentiated-gradient task weights driven by estimated excess risks.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; taken from the first Jacobian when not given.
        robust_step_size (`float`, *optional*, defaults to `0.01`):
            Step size η of the exponentiated-gradient update.
    """

    def __init__(self, num_tasks: int | None = None, robust_step_size: float = 1e-2) -> None:
        super().__init__(num_tasks)
        if not isinstance(robust_step_size, (int, float)) or not (
            math.isfinite(robust_step_size) and robust_step_size > 0
        ):
            raise ValueError(f"`robust_step_size` must be a finite float > 0, got {robust_step_size!r}")
        self.robust_step_size = float(robust_step_size)
        #: S, the per-task sums of squared gradients, shape (num_tasks, P); empty until the first call.
        self.register_lazy_buffer("squared_sum")
        #: E(0), each task's first excess-risk estimate (NaN: not seen yet); empty until the first call.
        self.register_lazy_buffer("initial_excess")
        #: q, the task weights (sum K); empty until the first call.
        self.register_lazy_buffer("task_weights")

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
        device = self.squared_sum.device
        index = self.resolve_task_index(num_rows, task_ids, device)
        squared_sum = self.lazy_buffer("squared_sum", (self.num_tasks, num_params), 0.0)
        initial_excess = self.lazy_buffer("initial_excess", (self.num_tasks,), float("nan"))
        task_weights = self.lazy_buffer("task_weights", (self.num_tasks,), 1.0)
        matrix = jacobian.detach().to(device=device, dtype=torch.float32)

        squared = matrix * matrix
        squared_sum.index_add_(0, index, squared)
        excess = (squared / torch.sqrt(squared_sum[index] + 1e-7)).sum(dim=1)
        initial = initial_excess[index]
        first_seen = torch.isnan(initial)
        initial = torch.where(first_seen, excess, initial)
        initial_excess[index] = initial
        usable = ~first_seen & (initial > 0)
        ratio = torch.where(usable, excess / torch.where(usable, initial, torch.ones_like(initial)), 0.0)

        current = task_weights[index]
        logits = current.clamp_min(torch.finfo(torch.float32).tiny).log() + self.robust_step_size * ratio
        weights = torch.softmax(logits, dim=0) * current.sum()
        task_weights[index] = weights
        self.last_weights = weights.clone()
        return (weights @ matrix).to(device=jacobian.device, dtype=jacobian.dtype)

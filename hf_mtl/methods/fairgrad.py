"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, ICML 2024).

Paper: "Fair Resource Allocation in Multi-Task Learning", https://openreview.net/forum?id=KLmWRMg6nL;
code: ``OptMN-Lab/fairgrad`` (``methods/weight_methods.py``, ``FairGrad.fairgrad``); LibMTL
``FairGrad.py``. F-MTL (Phan et al., arXiv 2211.13723) uses it as one of its aggregators; this module follows
the paper and the reference code.

FairGrad treats the update as a resource shared by the tasks and maximises an α-fair utility of the
tasks' first-order improvements ``g_i·d`` (α = 1: proportional fairness, Nash-MTL's bargaining
solution; α → ∞: max-min fairness; α → 0: the plain sum). Its optimality condition gives
``d = Σ_i w_i g_i`` with ``w`` the positive solution of::

    (G w)_i = w_i^{-1/α},   w > 0          ⇔    d · g_i = w_i^{-1/α}  for every task i

which the tests check. Scaling ``J → sJ`` scales ``d`` by ``s^{(1-α)/(1+α)}`` (invariant for α = 1).

Defaults: ``alpha = 1.0``, the default of the reference code (``experiments/utils.py --alpha``,
``FairGrad(alpha=1.0)``) and of LibMTL (``--FairGrad_alpha 1.0``); the reference's CelebA and QM9
runs use ``alpha = 2.0`` (``experiments/*/run.sh``).

Solver: the condition is the stationarity of the strictly convex
``f(w) = ½ wᵀ G w - Σ_i φ(w_i)`` with ``φ'(w) = w^{-1/α}`` (``φ = log`` for α = 1), so hf_mtl
minimises ``f`` with the damped Newton solver it shares with Nash-MTL (`_solvers`
``power_balance_weights``, p = 1/α), to ``max_i |w_i^{1/α} (G w)_i - 1| < tol``. The reference
instead calls ``scipy.optimize.least_squares`` on the residual ``G w - w^{-1/α}`` with bounds
``[0, ∞)`` from ``w = 1/K`` and SciPy's default tolerances, which needs no convexity but stops at a
least-squares point when the equation has no solution. Deviations:

- singular ``G`` (opposite rows, a zero row) has no positive solution; like Nash-MTL, hf_mtl solves
  it for ``G + reg_eps · diag(G)`` and gives a zero row weight 0;
- the reference's training script multiplies the update by K (``overwrite_grad``: "to match the sum
  loss"); LibMTL and hf_mtl return ``Σ_i w_i g_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._solvers import check_power_balance_settings, gramian_to_numpy, power_balance_weights, weights_to_tensor
from .base import GramianMethod
from .registry import register_method


@register_method("fairgrad")
class FairGrad(GramianMethod):
    """FairGrad.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: FairGrad keeps no per-task state).
        alpha (`float`, *optional*, defaults to `1.0`):
            The fairness parameter α > 0 of the utility (1: proportional fairness).
        reg_eps (`float`, *optional*, defaults to `1e-6`):
            Relative regularisation ``G + reg_eps · diag(G)``; must be ≥ 0.
        max_iter (`int`, *optional*, defaults to `100`):
            Newton steps at most.
        tol (`float`, *optional*, defaults to `1e-10`):
            Stop when ``max_i |w_i^{1/α} (G w)_i - 1| < tol``.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        alpha: float = 1.0,
        reg_eps: float = 1e-6,
        max_iter: int = 100,
        tol: float = 1e-10,
    ) -> None:
        super().__init__(num_tasks)
        if not alpha > 0:
            raise ValueError(f"`alpha` must be > 0, got {alpha!r}")
        check_power_balance_settings(reg_eps, max_iter, tol)
        self.alpha = float(alpha)
        self.reg_eps = reg_eps
        self.max_iter = max_iter
        self.tol = tol
        #: Newton steps and final residual of the last solve, for diagnostics.
        self.last_iterations = 0
        self.last_residual = 0.0

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        weights, self.last_iterations, self.last_residual = power_balance_weights(
            gramian_to_numpy(gramian), 1.0 / self.alpha, self.reg_eps, tol=self.tol, max_iter=self.max_iter
        )
        return weights_to_tensor(weights, gramian)

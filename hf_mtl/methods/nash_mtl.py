"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022; docs/methods.md,
"Nash-MTL").

Paper: https://arxiv.org/abs/2202.01017; code: ``AvivNavon/nash-mtl`` (``methods/weight_methods.py``,
``NashMTL``); LibMTL ``Nash_MTL.py``.

The Nash bargaining solution over the ball is ``d = Σ_i α_i g_i`` with ``α`` the positive solution
of (paper, Claim 3.1)::

    G α = 1 / α,    α > 0          ⇔    d · g_i = 1 / α_i  for every task i

For a positive-definite ``G`` this is the unique minimiser of the strictly convex
``f(α) = ½ αᵀ G α - Σ_i log α_i``. Consequences that the tests check: ``||d||² = Σ α_i d·g_i = K``;
the update is invariant to rescaling any task, ``g_i → s_i g_i`` gives ``α_i → α_i / s_i`` and the
same ``d`` (in particular ``J → sJ`` leaves ``d`` unchanged); K = 1 gives ``g / ||g||``.

Solver (hf_mtl's, not the reference's): damped Newton on ``f`` over the K x K system (`_solvers`
``power_balance_weights`` with p = 1): Jacobi-scaled Cholesky steps kept inside ``α > 0``, Armijo
backtracking, full steps once the Newton decrement is below 1e-6, stopping when
``max_i |α_i (G α)_i - 1| < tol`` (1e-10; typically 3-5 steps, 2-3 with the warm start). It starts
from the better of the previous step's ``α`` (the buffer ``alpha``, so resumed runs repeat) and the
diagonal solution ``α_i = 1/||g_i||``, each optimally rescaled.

Singular ``G``: when a non-negative combination of the rows vanishes (opposite rows, a zero row,
some rank-deficient J) the equation has no positive solution and ``f`` is unbounded below. hf_mtl
solves it for ``G + reg_eps · diag(G)`` (after clipping float32 rounding's negative eigenvalues):
exact opposite rows then give ``d = 0``, rows that are nearly opposite (``cos < -1 + ~reg_eps``) give a
shrinking update, and a zero row gets ``α_i = 0`` (it has no gradient to weigh). Regularising with
``diag(G)`` rather than the identity keeps the per-task scale invariance. It perturbs the condition
to ``α_i (G α)_i = 1 - reg_eps · G_ii α_i²`` (1e-6 relative for well-conditioned ``G``).

How this differs from the reference (cvxpy + ECOS, a CCP sequence): the reference divides ``G`` by
its Frobenius norm ``||G||_F`` and multiplies it back inside the constraint
``-log(α_i ||G||_F) - log((G α / ||G||_F)_i) ≤ 0``, so it targets the same equation in the original
units; but its objective ``Σ_i (Ĝ α)_i + φ_lin(α) / ||G||_F`` mixes terms of different degree in
``||G||_F``, it stops after at most 20 convex programs (or when ``||Ĝ α - 1/α|| < 1e-3``, a residual
of the normalised matrix that the solution does not zero, or when ``α`` moves less than 1e-6), and
ECOS failures fall back to the previous ``α``. Its ``α`` is therefore an approximation whose error
depends on the overall gradient scale: on random 2-5 task problems (a replica of the reference
solver, first call) it matches the exact solution to ~1e-10 in direction for Gramian entries of
order 1, but for ``J → 1e4 J`` or ``1e-4 J`` the residual ``max_i |α_i (G α)_i - 1|`` reaches 0.4-7 and
the returned direction differs by ``1 - cos`` up to 0.2-0.5. hf_mtl's ``α`` is the exact fixed
point, so ``d(sJ) = d(J)`` to rounding for every ``s``. As with the reference, ``||d||`` does not
shrink as the gradients vanish (it is ``sqrt(K)``); the reference then clips the shared gradient to
``max_norm = 1.0``, which the Trainer's ``max_grad_norm`` (default 1.0) does here (on all
parameters, heads included, rather than on the shared ones only).

``update_weights_every`` (paper §3.3, default 1): recompute ``α`` only every that many calls and
reuse the last ``α`` in between (the paper reports up to ~10x less time on QM9).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._solvers import check_power_balance_settings, gramian_to_numpy, power_balance_weights, weights_to_tensor
from .base import GramianMethod, task_index
from .registry import register_method


@register_method("nash_mtl")
class NashMTL(GramianMethod):
    """Nash-MTL, solved exactly by damped Newton with a warm start.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. With it, the warm start is kept per task, so steps that hold a subset
            of the tasks (``task_ids``) reuse the right entries.
        update_weights_every (`int`, *optional*, defaults to `1`):
            Recompute ``α`` every that many calls; reuse the last ``α`` in between.
        reg_eps (`float`, *optional*, defaults to `1e-6`):
            Relative regularisation ``G + reg_eps · diag(G)``; must be ≥ 0 (0 solves the exact
            equation, which has no solution for singular ``G``).
        max_iter (`int`, *optional*, defaults to `100`):
            Newton steps at most.
        tol (`float`, *optional*, defaults to `1e-10`):
            Stop when ``max_i |α_i (G α)_i - 1| < tol``.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        update_weights_every: int = 1,
        reg_eps: float = 1e-6,
        max_iter: int = 100,
        tol: float = 1e-10,
    ) -> None:
        super().__init__(num_tasks)
        if not isinstance(update_weights_every, int) or update_weights_every < 1:
            raise ValueError(f"`update_weights_every` must be a positive integer, got {update_weights_every!r}")
        check_power_balance_settings(reg_eps, max_iter, tol)
        self.update_weights_every = update_weights_every
        self.reg_eps = reg_eps
        self.max_iter = max_iter
        self.tol = tol
        #: ``α`` of the last solve (float64, one entry per task; NaN for tasks never solved for); empty
        #: until the first call.
        self.register_lazy_buffer("alpha", dtype=torch.float64)
        #: Calls to `aggregate` so far (drives ``update_weights_every``).
        self._step = 0
        #: Newton steps and final residual of the last solve, for diagnostics.
        self.last_iterations = 0
        self.last_residual = 0.0

    def _slots(self, num_rows: int, task_ids: Tensor | None) -> Tensor:
        """Indices of the rows in the stored ``α``."""
        if self.num_tasks is None:
            if task_ids is not None:
                raise ValueError(
                    "`num_tasks` is required by `nash_mtl` when `task_ids` selects a subset of the tasks, got None"
                )
            return torch.arange(num_rows)
        return task_index(torch.empty(num_rows), task_ids, self.num_tasks).cpu()

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        num_rows = gramian.shape[0]
        slots = self._slots(num_rows, task_ids)
        size = self.num_tasks if self.num_tasks is not None else num_rows
        if self.alpha.numel() not in (0, size):  # without `num_tasks`, another number of rows starts afresh
            self.alpha = self.alpha.new_zeros(0)
        state = self.lazy_buffer("alpha", (size,), float("nan"))
        previous = state.cpu()[slots].numpy()
        reuse = self._step % self.update_weights_every != 0 and bool(np.all(np.isfinite(previous)))
        self._step += 1
        if reuse:
            return weights_to_tensor(previous, gramian)
        start = previous if np.all(np.isfinite(previous)) else None
        alpha, self.last_iterations, self.last_residual = power_balance_weights(
            gramian_to_numpy(gramian), 1.0, self.reg_eps, start=start, tol=self.tol, max_iter=self.max_iter
        )
        if np.isfinite(self.last_residual):  # a non-finite Gramian is not solved: keep the last α
            state[slots.to(state.device)] = torch.from_numpy(alpha).to(state.device)
        return weights_to_tensor(alpha, gramian)

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self._step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])

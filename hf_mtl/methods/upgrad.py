"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024; docs/methods.md, "UPGrad").

Paper: https://arxiv.org/abs/2406.16232; code: TorchJD ``src/torchjd/aggregation/_upgrad.py``,
``_utils/dual_cone.py``, ``_utils/gramian.py``; LibMTL ``UPGrad.py``.

Each row is projected onto the dual cone of the rows, ``C(J) = {x : J x ≥ 0}`` (the directions that
conflict with no task), and the projections are averaged::

    d = (1/K) Σ_i π_C(J)(g_i)

By the paper's Proposition 1, ``π_C(J)(Jᵀ u) = Jᵀ v`` with ``v = argmin_{v ≥ u} vᵀ G v``, so each
projection is a K-variable quadratic program on the Gramian (solved with quadprog, as TorchJD) and
the weights are ``w = Σ_i v^{(i)}`` with ``u^{(i)} = e_i / K``. Properties the tests check:
``J d ≥ 0`` (no task's first-order loss increases), ``d(sJ) = s d(J)``, equality with the
definition computed by projecting each row in parameter space, and K = 1 gives the row itself.

Preprocessing, as TorchJD (``regularization="trace"``, the default): ``G`` is divided by its trace
(the squared Frobenius norm of J) so the QP is scale-free, then ``reg_eps · I`` (1e-4) is added so
quadprog sees a positive-definite matrix. hf_mtl also clips float32 rounding's negative eigenvalues to
0 first (TorchJD does not), so quadprog never rejects the matrix.

- **Small gradients.** When the trace is below ``norm_eps`` (1e-4) TorchJD replaces ``G`` by zeros
  rather than divide by a tiny number; the QP is then ``min ||v||²`` over ``v ≥ u``, so ``w = u`` and
  the update is **the plain mean of the rows, unprojected**, whenever the squared gradient norms sum
  to less than 1e-4. Pass ``norm_eps=0`` to always normalise.
- **Unequal gradients.** The KKT conditions of the regularised QP only give
  ``d · g_i ≥ -reg_eps · trace(G) · w_i``: the slack is relative to the *total* squared norm, so a
  task whose gradient is ~1 % of the largest one can be conflicted. On seeded random matrices whose
  row norms differ by 100x, the default's update reaches ``cos(d, g_i) = -0.15`` for the small task
  (and differs from the exact definition by 10-16 %). ``reg_eps=1e-8`` removes it there (any
  ``reg_eps > 0`` is safe here because of the eigenvalue clipping) but not for a task 1e6 times
  smaller (``cos = -0.53``). ``regularization="per_task"`` (hf_mtl's option) regularises with
  ``reg_eps · diag(G)`` and solves the QP in correlation form (``y = ||g_i|| v_i``, unit-diagonal
  matrix), which leaves ``d · g_i ≥ -reg_eps · ||g_i|| · y_i``, a slack relative to each task's own
  norm, at any spread of norms.
"""

from __future__ import annotations

import numpy as np

from ._dual_cone import DualConeMethod
from .registry import register_method


@register_method("upgrad")
class UPGrad(DualConeMethod):
    """UPGrad with the mean preference vector (TorchJD's default).

    Takes the arguments of `DualConeMethod`: ``norm_eps`` (defaults to `1e-4`), ``reg_eps`` (defaults to
    `1e-4`) and ``regularization`` (`"trace"`, the default, or `"per_task"`); the module docstring says
    when to change them.
    """

    def preferences(self, num_tasks: int) -> np.ndarray:
        """``u^{(i)} = e_i / K`` for each task i: ``d = Σ_i π_C(J)(g_i / K)``."""
        return np.eye(num_tasks) / num_tasks

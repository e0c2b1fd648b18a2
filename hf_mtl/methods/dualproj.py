"""DualProj: the mean gradient projected onto the dual cone of the rows (Lopez-Paz & Ranzato,
"Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Eq. 11; as packaged by TorchJD,
Quinton & Rey 2024; docs/methods.md, "UPGrad", whose solver and preprocessing it shares).

Paper: https://arxiv.org/abs/1706.08840; code: TorchJD ``src/torchjd/aggregation/_dualproj.py``.

::

    d = π_C(J)(g₀),   g₀ = (1/K) Σ_i g_i,   C(J) = {x : J x ≥ 0}
      = Jᵀ v,         v = argmin_{v ≥ 1/K} vᵀ G v          (Quinton & Rey, Proposition 1)

one K-variable QP solved with quadprog. ``d`` is the point of the dual cone closest to the mean, so
it conflicts with no task (``J d ≥ 0``), equals the mean when the mean conflicts with none, and K = 1
gives the row itself. Preprocessing as TorchJD and `UPGrad` (``regularization="trace"``): ``G``
divided by its trace (replaced by zeros below ``norm_eps`` = 1e-4, which makes the update the plain
mean), plus ``reg_eps · I`` (1e-4), after clipping float32 rounding's negative eigenvalues to 0. The
regularisation relaxes ``J d ≥ 0`` to ``d · g_i ≥ -reg_eps · trace(G) · v_i``, a slack relative to the
*total* squared norm that lets the update conflict with a task whose gradient is much smaller than
the others (see `UPGrad`'s docstring for measurements); ``regularization="per_task"`` uses
``reg_eps · diag(G)`` instead, a slack relative to each task's own norm.
"""

from __future__ import annotations

import numpy as np

from ._dual_cone import DualConeMethod
from .registry import register_method


@register_method("dualproj")
class DualProj(DualConeMethod):
    """DualProj with the mean preference vector (TorchJD's default).

    Takes the arguments of `DualConeMethod`: ``norm_eps`` (defaults to `1e-4`), ``reg_eps`` (defaults to
    `1e-4`) and ``regularization`` (`"trace"`, the default, or `"per_task"`); the module docstring says
    when to change them.
    """

    def preferences(self, num_tasks: int) -> np.ndarray:
        """The one vector ``u = 1 / K``: ``d = π_C(J)(g₀)``."""
        return np.full((1, num_tasks), 1.0 / num_tasks)

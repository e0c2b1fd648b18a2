"""DualProj: the mean gradient projected onto the dual cone of the rows (Lopez-Paz & Ranzato,
"Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Eq. 11; as packaged by TorchJD,
Quinton & Rey 2024; docs/METHODS.md §3, "UPGrad", whose solver and preprocessing it shares).

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
import torch
from torch import Tensor

from ._solvers import REGULARIZATIONS, gramian_to_numpy, project_preferences, weights_to_tensor
from .base import GramianMethod
from .registry import register_method


@register_method("dualproj")
class DualProj(GramianMethod):
    """DualProj with the mean preference vector (TorchJD's default).

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: DualProj keeps no per-task state).
        norm_eps (`float`, *optional*, defaults to `1e-4`):
            Below this trace the Gramian is treated as zero and the update is the mean (TorchJD).
            Must be ≥ 0.
        reg_eps (`float`, *optional*, defaults to `1e-4`):
            Added to the diagonal of the normalised Gramian (see ``regularization``). Must be > 0
            (quadprog needs a positive-definite matrix).
        regularization (`str`, *optional*, defaults to `"trace"`):
            ``"trace"``: TorchJD's ``G / trace(G) + reg_eps · I``. ``"per_task"``: ``G + reg_eps · diag(G)``,
            solved in correlation form, which keeps the no-conflict guarantee for tasks whose gradient is
            much smaller than the others' (see the module docstring).
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        regularization: str = "trace",
    ) -> None:
        super().__init__(num_tasks)
        if not norm_eps >= 0:
            raise ValueError(f"`norm_eps` must be >= 0, got {norm_eps!r}")
        if not reg_eps > 0:
            raise ValueError(f"`reg_eps` must be > 0 (quadprog needs a positive-definite Gramian), got {reg_eps!r}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"`regularization` must be one of {list(REGULARIZATIONS)}, got {regularization!r}")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.regularization = regularization

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        num_tasks = gramian.shape[0]
        weights = project_preferences(
            gramian_to_numpy(gramian),
            np.full(num_tasks, 1.0 / num_tasks),
            self.norm_eps,
            self.reg_eps,
            self.regularization,
        )
        return weights_to_tensor(weights, gramian)

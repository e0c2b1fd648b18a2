"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024; docs/METHODS.md §3, "UPGrad").

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

Preprocessing, as TorchJD: ``G`` is divided by its trace (the squared Frobenius norm of J) so the QP
is scale-free, then ``reg_eps · I`` (1e-4) is added so quadprog sees a positive-definite matrix.
When the trace is below ``norm_eps`` (1e-4) TorchJD replaces ``G`` by zeros rather than divide by
a tiny number; the QP is then ``min ||v||²`` over ``v ≥ u``, so ``w = u`` and **the update is the
plain mean of the rows** (no projection) for gradients whose squared norms sum to less than 1e-4.
Pass ``norm_eps=0`` to always normalise (full scale invariance). The regularisation relaxes the
guarantee to ``d · g_i ≥ -reg_eps · trace(G) · w_i`` (from the QP's KKT conditions
``(Ĝ + reg_eps I) v ≥ 0``), i.e. ~1e-4 relative. hf_mtl also clips
float32 rounding's negative eigenvalues to 0 before adding ``reg_eps · I`` (TorchJD does not), so
quadprog never rejects the matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._solvers import dual_cone_weights, gramian_to_numpy, normalize_and_regularize, weights_to_tensor
from .base import GramianMethod
from .registry import register_method


@register_method("upgrad")
class UPGrad(GramianMethod):
    """UPGrad with the mean preference vector (TorchJD's default).

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: UPGrad keeps no per-task state).
        norm_eps (`float`, *optional*, defaults to `1e-4`):
            Below this trace the Gramian is treated as zero and the update is the mean (TorchJD).
            Must be ≥ 0.
        reg_eps (`float`, *optional*, defaults to `1e-4`):
            Added to the diagonal of the normalised Gramian. Must be > 0 (quadprog needs a
            positive-definite matrix).
    """

    def __init__(self, num_tasks: int | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        super().__init__(num_tasks)
        if not norm_eps >= 0:
            raise ValueError(f"`norm_eps` must be >= 0, got {norm_eps!r}")
        if not reg_eps > 0:
            raise ValueError(f"`reg_eps` must be > 0 (quadprog needs a positive-definite Gramian), got {reg_eps!r}")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gram = normalize_and_regularize(gramian_to_numpy(gramian), self.norm_eps, self.reg_eps)
        num_tasks = gram.shape[0]
        projections = dual_cone_weights(gram, np.eye(num_tasks) / num_tasks)
        return weights_to_tensor(projections.sum(axis=0), gramian)

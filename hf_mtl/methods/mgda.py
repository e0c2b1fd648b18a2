"""MGDA: multi-task learning as multi-objective optimisation (Sener & Koltun, NeurIPS 2018;
docs/methods.md, "MGDA").

Paper: https://arxiv.org/abs/1810.04650; code: ``isl-org/MultiObjectiveOptimization``
(``multi_task/min_norm_solvers.py``, ``train_multi_task.py``); LibMTL ``MGDA.py``.

The update is the minimum-norm point of the convex hull of the task gradients::

    w* = argmin_{w ∈ Δ} || Σ_i w_i ĝ_i ||² = argmin_{w ∈ Δ} wᵀ Ĝ w,      ĝ_i = g_i / n_i
    d  = Σ_i w*_i g_i

where ``n_i`` is the optional gradient normaliser of the original code ("not included in the
paper"): ``none`` (1), ``l2`` (``||g_i||``), ``loss`` (``L_i``) or ``loss+`` (``L_i ||g_i||``; the
original CelebA configuration). As in the original training script, the weights are computed on
the normalised rows and then applied to the *raw* gradients (it backpropagates
``Σ_i w_i L_i``); LibMTL instead applies them to the normalised rows, i.e. returns ``Σ_i w_i ĝ_i``.
With ``normalization="none"``: ``d·g_i ≥ ||d||²`` for every task, with equality for every task
with ``w_i > 0`` (the KKT conditions of the min-norm problem), so a non-zero ``d`` decreases every
loss, and ``d = 0`` means the point is Pareto-stationary. For K = 2 the solution is the paper's
closed form ``w_1 = clip((g_2 - g_1)·g_2 / ||g_1 - g_2||², 0, 1)``; for K = 1 it is the row itself.

Solver: everything runs on the K x K Gramian. The reference solver is kept: the best pair's closed
form (paper Algorithm 1), then projected-gradient steps with an exact line search, at most
``max_iter`` = 250 iterations, stopping when the L1 change of ``w`` is below ``tol`` = 1e-5. That
stopping rule is not an optimality test: on 500 random 3-7 task Gramians the iteration alone leaves
weight errors up to 4e-2 and a 5e-4 relative gap in ``||d||²`` (some runs use all 250 iterations).
hf_mtl therefore finishes with Wolfe's exact active-set steps (Wolfe 1976, "Finding the nearest
point in a polytope") from the support found, until the KKT conditions ``(Ĝ w)_j ≥ wᵀ Ĝ w`` hold to
1e-12 (relative to the trace); the result is the exact minimum-norm point (within ~1e-8 in the
weights of a quadprog solve). Other deviations from the reference code:

- the pair closed form (also the line search) clips ``γ`` to [0, 1] as in the paper, not to
  [0.001, 0.999], which keeps 0.1 % of a dominated gradient in the update;
- the reference never increments its iteration counter (its ``MAX_ITER`` is never reached); hf_mtl
  stops after ``max_iter`` iterations;
- the Gramian is divided by its trace first (the reference's pair search starts from
  ``dmin = 1e8`` and fails when every squared norm exceeds it);
- a row whose normaliser is 0 (a zero row under ``l2``, a zero loss under ``loss``) is left
  unnormalised instead of divided by 0.

Scale: the weights lie on the simplex (sum 1), as in the paper and LibMTL. nash-mtl's MGDA
multiplies them by K so that the update matches a summed loss (``sol * n_tasks``), and F-MTL's
NYUv2 script multiplies the combined gradient by K; multiply the learning rate by K to reproduce
that.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._solvers import gramian_to_numpy, min_norm_weights, weights_to_tensor
from .base import GramianMethod
from .registry import register_method

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register_method("mgda")
class MGDA(GramianMethod):
    """MGDA with the original code's optional gradient normalisation.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: MGDA keeps no per-task state).
        normalization (`str`, *optional*, defaults to `"none"`):
            How the rows are normalised before the min-norm problem: ``"none"``, ``"l2"`` (by the
            gradient norm), ``"loss"`` (by the task loss) or ``"loss+"`` (by both). ``"loss"`` and
            ``"loss+"`` need the per-task ``losses`` in `aggregate`.
        max_iter (`int`, *optional*, defaults to `250`):
            Iterations of the reference's projected-gradient solver (``MAX_ITER``).
        tol (`float`, *optional*, defaults to `1e-5`):
            Stop the reference iteration when the L1 change of the weights is below this
            (``STOP_CRIT``). The active-set finish then makes the solution exact.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        normalization: str = "none",
        max_iter: int = 250,
        tol: float = 1e-5,
    ) -> None:
        super().__init__(num_tasks)
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {list(_NORMALIZATIONS)}, got {normalization!r}")
        if not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"`max_iter` must be a non-negative integer, got {max_iter!r}")
        if not tol > 0:
            raise ValueError(f"`tol` must be > 0, got {tol!r}")
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = tol

    def gradient_normalizers(self, gram: np.ndarray, losses: Tensor | None) -> np.ndarray:
        """The per-task normalisers ``n_i`` (shape (K,), positive) of ``normalization``."""
        num_tasks = gram.shape[0]
        if self.normalization == "none":
            return np.ones(num_tasks)
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        if self.normalization == "l2":
            scales = norms
        else:
            if losses is None:
                raise ValueError(f"MGDA with `normalization={self.normalization!r}` needs the per-task `losses`")
            values = losses.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
            if values.shape != (num_tasks,):
                raise ValueError(
                    f"`losses` must have {num_tasks} entries (one per row), got shape {tuple(losses.shape)}"
                )
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise ValueError(
                    f"MGDA with `normalization={self.normalization!r}` needs finite, non-negative `losses`, "
                    f"got {values.tolist()}"
                )
            scales = values if self.normalization == "loss" else values * norms
        return np.where(scales > 0, scales, 1.0)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gram = gramian_to_numpy(gramian)
        scales = self.gradient_normalizers(gram, losses)
        weights, _ = min_norm_weights(gram / np.outer(scales, scales), max_iter=self.max_iter, tol=self.tol)
        return weights_to_tensor(weights, gramian)

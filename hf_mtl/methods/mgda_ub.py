"""MGDA-UB: MGDA on the upper bound, with gradients at the shared representation (Sener & Koltun,
NeurIPS 2018, §3.3; docs/methods.md, "MGDA").

Paper: https://arxiv.org/abs/1810.04650; code: ``isl-org/MultiObjectiveOptimization``
(``train_multi_task.py``, ``use_approximation``).

With an encoder ``z = f(x; θ_sh)`` shared by all heads, ``g_i = (∂z/∂θ_sh)ᵀ ∇_z L_i``, so
``||Σ w_i g_i|| ≤ ||∂z/∂θ_sh|| · ||Σ w_i ∇_z L_i||``. MGDA-UB minimises the right-hand side, which
needs only the gradients with respect to ``z`` (one trunk forward, K cheap head backwards)::

    w* = argmin_{w ∈ Δ} || Σ_i w_i ∇_z L_i ||²        (MGDA's solver, on the representation rows)
    ∇_z  ←  Σ_i w*_i ∇_z L_i                          (sent back into z, one trunk backward)

so the shared parameters receive ``Σ_i w*_i g_i``: MGDA's update with the upper bound's weights.

Contract (``requires_representation = True``): the engine passes as rows the per-task gradients with
respect to the detached representation ``z`` (flattened over the batch; the original code's
``rep_variable``) and ``representation=z``; `aggregate` returns ``Σ_i w*_i ∇_z L_i``, the gradient
to backpropagate through the encoders. On a plain (K, P) matrix it is exactly `MGDA` on those rows.
All of MGDA's options apply (``normalization``, ``max_iter``, ``tol``), computed on the
representation gradients as in the original code.
"""

from __future__ import annotations

from .mgda import MGDA
from .registry import register_method


@register_method("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB: `MGDA` on the per-task gradients with respect to the shared representation.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused).
        normalization (`str`, *optional*, defaults to `"none"`):
            ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``, as in `MGDA`.
        max_iter (`int`, *optional*, defaults to `250`):
            Iterations of the reference solver.
        tol (`float`, *optional*, defaults to `1e-5`):
            The reference solver's stopping threshold.
    """

    requires_representation = True

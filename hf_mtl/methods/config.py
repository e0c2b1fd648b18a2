"""ConFIG: conflict-free inverse gradients (Liu et al., 2024, arXiv 2408.11104; docs/methods.md,
"ConFIG").

Paper: https://arxiv.org/abs/2408.11104; code: ``tum-pbs/ConFIG`` (``conflictfree/grad_operator.py``).

The update has the same cosine with every task gradient and the length of the gradients'
projections onto it::

    u_i = g_i / ||g_i||                    (U: the K x P matrix of unit rows)
    b   = pinv(U) 1                        (min-norm least squares of U b = 1)
    b̂   = b / ||b||
    d   = (Σ_i g_i · b̂) b̂                  (``ProjectionLength``)

Computed on the Gramian: with ``N = diag(||g_i||)`` the cosine matrix is ``C = U Uᵀ = N⁻¹ G N⁻¹``
and the minimum-norm solution lies in the row space, ``b = Uᵀ C⁺ 1 = Jᵀ β`` with
``β = N⁻¹ C⁺ 1``. Then ``||b||² = βᵀ G β`` and ``Σ_i g_i · b = 1ᵀ G β``, so::

    d = wᵀ J,    w = β · (1ᵀ G β) / (βᵀ G β)

``C⁺`` drops eigenvalues below ``max eig · K · eps(float32)`` (the Gramian is formed in float32; the
same tolerance serves a float64 Gramian, which may still hold float32 gradients).
A zero row has no direction: its unit row is 0 (as ``nan_to_num`` makes it in the reference code)
and it gets weight 0. When ``b`` vanishes (``||b||² ≤ 1e-12``, e.g. two opposite rows, where the
reference would divide 0 by 0) the update is 0.

The reference uses a two-task closed form (``ConFIG_update_double``) by default; it builds ``b`` from
the two rows' orthogonal components, which is the same direction as ``pinv(U) 1``, so one code path
serves every K. ``pinv`` rather than ``lstsq`` is the reference's ``use_least_square=False``; both give
the minimum-norm solution on a rank-deficient U with gelsy, and only pinv does on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._solvers import cosine_pseudoinverse
from .base import GramianMethod
from .registry import register_method


@register_method("config")
class ConFIG(GramianMethod):
    """ConFIG with equal direction weights and the projection length rule. No hyperparameters."""

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gram = gramian.detach().to(torch.float64)
        num_tasks = gram.shape[0]
        inverse_norms, cosines_pinv = cosine_pseudoinverse(gram)
        direction = inverse_norms * (cosines_pinv @ torch.ones_like(inverse_norms))  # b = Jᵀ β, β = N⁻¹ C⁺ 1
        squared_length = direction @ gram @ direction  # ||b||² = 1ᵀ C⁺ 1, at least 1 when U b = 1 is solvable
        if not squared_length > 1e-12:
            return torch.zeros(num_tasks, dtype=gramian.dtype, device=gramian.device)
        projection = (gram @ direction).sum()
        return (direction * (projection / squared_length)).to(gramian.dtype)

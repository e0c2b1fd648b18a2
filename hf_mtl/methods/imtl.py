"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021; docs/methods.md, "IMTL").

Paper: https://openreview.net/forum?id=IMPnRXEWpvr

IMTL-G (gradient balance) picks the update ``d = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` whose projection
onto every unit task gradient ``u_t = g_t / ||g_t||`` is the same. The paper's closed form is::

    D = [g_1 - g_t]_{t≥2},   U = [u_1 - u_t]_{t≥2}
    α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 - Σ α_{2:K}

With the Gramian ``G = J Jᵀ`` the condition "``d · u_t`` equal for all t" reads ``G α = c · n`` with
``n_t = ||g_t|| = sqrt(G_tt)``, so ``α ∝ G⁻¹ n``, normalised to sum 1 (TorchJD's ``_imtl_g.py``
generalises it to ``pinv(G) n`` for singular Gramians). hf_mtl computes the same vector on the
cosine matrix ``C = N⁻¹ G N⁻¹`` (``N = diag(n)``), where ``G⁻¹ n = N⁻¹ C⁻¹ 1``::

    v = N⁻¹ pinv(C) 1,    α = v / Σ_t v_t

so that the rank decision of the pseudo-inverse does not depend on the gradients' scales: on ``G``
itself, rows whose norms differ by 1e3 put a genuine eigenvalue below float32's resolution and the
pseudo-inverse drops it, losing the equal projections exactly where IMTL is meant to help. This
equals the closed form whenever ``G`` is invertible and keeps the direction of ``d`` invariant to
per-task scales (it depends on the unit gradients only). A zero row gets weight 0; when no update
with equal projections exists but 0 (opposite rows: ``pinv(C) 1 = 0``) or ``Σ_t v_t ≈ 0``, the
update is 0. With linearly dependent rows the weights are not unique (the pseudo-inverse picks one)
and equal projections may be impossible.

IMTL-L (loss balance) is on by default (``loss_balancing=True``; the "hybrid" IMTL that LibMTL's
``IMTL.py`` runs): a learnable scale ``s_t`` per task (initialised to 0) transforms the losses::

    L_t  ->  e^{s_t} L_t - s_t

in ``transform_losses``. The engine differentiates the transformed losses per task, so ``s`` gets
its gradient ``e^{s_t} L_t - 1`` there and the Trainer's optimizer steps it; ``aggregate`` then
applies IMTL-G to the rows it is given. Like LibMTL, the weights are not constrained to be ≥ 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._solvers import cosine_pseudoinverse
from .base import GramianMethod, task_index
from .registry import register_method


@register_method("imtl")
class IMTL(GramianMethod):
    """IMTL (hybrid IMTL-G + IMTL-L by default).

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Required when ``loss_balancing`` is on (the size of ``s``).
        loss_balancing (`bool`, *optional*, defaults to `True`):
            Whether to learn the IMTL-L loss scales ``s`` (an ``nn.Parameter`` of size ``num_tasks``
            applied in ``transform_losses``). With `False` the method has no parameters and is pure
            IMTL-G.
    """

    def __init__(self, num_tasks: int | None = None, loss_balancing: bool = True) -> None:
        super().__init__(num_tasks)
        self.loss_balancing = loss_balancing
        self.s: nn.Parameter | None = None
        if loss_balancing and num_tasks is not None:
            self.s = nn.Parameter(torch.zeros(num_tasks))

    def transform_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> Tensor:
        """IMTL-L: ``e^{s_t} L_t - s_t`` (identity when ``loss_balancing`` is off)."""
        if not self.loss_balancing:
            return losses
        if self.s is None:
            raise ValueError("`num_tasks` is required for IMTL's loss balancing (`loss_balancing=True`), got None")
        if losses.dim() != 1:
            raise ValueError(f"`losses` must be a 1-D tensor (one loss per task), got shape {tuple(losses.shape)}")
        scales = self.s[task_index(losses, task_ids, self.s.numel()).to(self.s.device)].to(losses.device)
        return torch.exp(scales) * losses - scales

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
        nonzero = gram.diagonal().clamp(min=0.0).sqrt() > 0
        if not nonzero.any():  # all rows zero: no direction to balance
            return torch.zeros(num_tasks, dtype=gramian.dtype, device=gramian.device)
        inverse_norms, cosines_pinv = cosine_pseudoinverse(gram)
        balanced = cosines_pinv @ nonzero.to(torch.float64)
        v = inverse_norms * balanced  # v = N⁻¹ pinv(C) 1 over the non-zero rows
        total = v.sum()
        if not balanced.abs().max() > 1e-9 or not total.abs() > 1e-12 * v.abs().sum():
            return torch.zeros(num_tasks, dtype=gramian.dtype, device=gramian.device)
        return (v / total).to(gramian.dtype)

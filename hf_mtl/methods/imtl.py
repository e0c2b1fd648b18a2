"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021; docs/METHODS.md §3, "IMTL").

Paper: https://openreview.net/forum?id=IMPnRXEWpvr

IMTL-G (gradient balance) picks the update ``d = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` whose projection
onto every unit task gradient ``u_t = g_t / ||g_t||`` is the same. The paper's closed form is::

    D = [g_1 - g_t]_{t≥2},   U = [u_1 - u_t]_{t≥2}
    α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 - Σ α_{2:K}

With the Gramian ``G = J Jᵀ`` the condition "``d · u_t`` equal for all t" reads ``G α = c · n`` with
``n_t = ||g_t|| = sqrt(G_tt)``, so ``α ∝ G⁻¹ n``, normalised to sum 1. hf_mtl uses TorchJD's
generalisation (``_imtl_g.py``) for singular Gramians::

    v = pinv(G) sqrt(diag G),    α = v / Σ_t v_t        (α = 0 when Σ_t v_t ≈ 0)

which equals the closed form whenever ``G`` is invertible, gives a zero row weight 0, and gives a
zero update for opposite rows (the only update with equal projections there). ``G`` is divided by
its trace first so that the "``Σ v ≈ 0``" test does not depend on the gradients' scale.

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

from .base import GramianMethod
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
        scales = self.s if task_ids is None else self.s[task_ids.to(self.s.device)]
        if scales.shape != losses.shape:
            raise ValueError(
                f"`losses` must have shape {tuple(scales.shape)} (one loss per task), got {tuple(losses.shape)}"
            )
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
        trace = gram.trace()
        if not trace > 0:  # all rows zero (or non-finite): no direction to balance
            return torch.zeros(gram.shape[0], dtype=gramian.dtype, device=gramian.device)
        gram = gram / trace
        norms = gram.diagonal().clamp(min=0.0).sqrt()
        # the Gramian was formed in float32: eigenvalues below float32's resolution are noise
        rtol = gram.shape[0] * torch.finfo(torch.float32).eps
        v = torch.linalg.pinv(gram, rtol=rtol, hermitian=True) @ norms
        total = v.sum()
        if total.abs() < 1e-12:
            weights = torch.zeros_like(v)
        else:
            weights = v / total
        return weights.to(gramian.dtype)

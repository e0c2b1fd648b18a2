"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023; docs/methods.md,
"Aligned-MTL").

Paper: https://openaccess.thecvf.com/content/CVPR2023/html/Senushkin_Independent_Component_Alignment_for_Multi-Task_Learning_CVPR_2023_paper.html

The rows are rotated by a symmetric K x K transform ``B`` so that the aligned rows ``B J`` are
orthogonal with equal norm (the condition number of the aligned system is 1)::

    G = J Jᵀ = V Λ Vᵀ                       (eigendecomposition; eigenvalues ≤ tol dropped)
    B = sqrt(λ_R) · V Λ^{-1/2} Vᵀ           ⇒  (B J)(B J)ᵀ = λ_R · V Vᵀ   (= λ_R I at full rank)
    d = Σ_i (B J)_i = (B 1)ᵀ J              ⇒  weights α = B 1

with ``tol = max λ · K · eps(float32)`` (the rank tolerance of ``SamsungLabs/MTL``'s
``ProcrustesSolver``; the Gramian is formed in float32, and the tolerance is kept for a float64
Gramian, which may still hold float32 gradients) and the scale ``λ_R`` chosen by
``scale_mode``: the smallest kept eigenvalue (``"min"``, the default of the original code and of
LibMTL), their median (``"median"``) or their mean (``"rmse"``, so that ``sqrt(λ_R)`` is the root
mean square of the singular values).

Weights: the original code (``AlignedMTLBalancer``: ``grads.sum(-1)``, ``weights.sum(-1)``) and
LibMTL (``alpha = B.sum(0)``) sum the aligned rows, i.e. ``α = B 1``; hf_mtl follows them, like
PCGrad's sum. TorchJD's ``AlignedMTL`` uses the mean preference vector, ``α = B (1/K) 1``, which is
the same direction K times shorter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register_method

_SCALE_MODES = ("min", "median", "rmse")


@register_method("aligned_mtl")
class AlignedMTL(GramianMethod):
    """Aligned-MTL.

    Args:
        scale_mode (`str`, *optional*, defaults to `"min"`):
            Which eigenvalue sets the common norm ``sqrt(λ_R)`` of the aligned rows: ``"min"``,
            ``"median"`` or ``"rmse"`` (the mean eigenvalue).
    """

    def __init__(self, num_tasks: int | None = None, scale_mode: str = "min") -> None:
        super().__init__(num_tasks)
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"`scale_mode` must be one of {list(_SCALE_MODES)}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def balance_transformation(self, gramian: Tensor) -> Tensor:
        """The K x K transform ``B`` of the Gramian (zeros when the Gramian is zero)."""
        gram = gramian.detach().to(torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        largest = eigenvalues.max()
        tol = largest * gram.shape[0] * torch.finfo(torch.float32).eps
        keep = eigenvalues > tol
        if not largest > 0 or not keep.any():
            return torch.zeros_like(gram)
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        if self.scale_mode == "min":
            scale = eigenvalues.min()
        elif self.scale_mode == "median":
            scale = eigenvalues.median()
        else:
            scale = eigenvalues.mean()
        return scale.sqrt() * (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return self.balance_transformation(gramian).sum(dim=1).to(gramian.dtype)

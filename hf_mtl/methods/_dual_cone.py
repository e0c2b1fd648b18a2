"""The part UPGrad and DualProj share: their settings and the projection of preference vectors onto the
dual cone of the rows (docs/methods.md, "UPGrad").

Both methods are ``d = Jᵀ v`` with ``v`` the dual-cone projection weights of preference vectors ``u``
(Quinton & Rey 2024, Proposition 1: ``v = argmin_{v ≥ u} vᵀ G v``), on the Gramian preprocessed as
TorchJD (``regularization="trace"``) or per task (``"per_task"``); `_solvers` ``project_preferences``
solves it. A method names its preference vectors (``preferences``) and its weights are the sum of
their projection weights: UPGrad projects each ``e_i / K``, DualProj the mean's ``1 / K``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._solvers import REGULARIZATIONS, gramian_to_numpy, project_preferences, weights_to_tensor
from .base import GramianMethod


class DualConeMethod(GramianMethod):
    """Base of UPGrad and DualProj: a Gramian method that projects preference vectors onto the dual cone.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: neither method keeps per-task state).
        norm_eps (`float`, *optional*, defaults to `1e-4`):
            Below this trace the Gramian is treated as zero and the update is the mean (TorchJD).
            Must be ≥ 0.
        reg_eps (`float`, *optional*, defaults to `1e-4`):
            Added to the diagonal of the normalised Gramian (see ``regularization``). Must be > 0
            (quadprog needs a positive-definite matrix).
        regularization (`str`, *optional*, defaults to `"trace"`):
            ``"trace"``: TorchJD's ``G / trace(G) + reg_eps · I``. ``"per_task"``: ``G + reg_eps · diag(G)``,
            solved in correlation form, which keeps the no-conflict guarantee for tasks whose gradient is
            much smaller than the others' (see the UPGrad module docstring).
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

    def preferences(self, num_tasks: int) -> np.ndarray:
        """The preference vectors ``u``, one per row (shape (M, K)), whose projections are summed."""
        raise NotImplementedError

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``w = Σ_u v(u)``: the sum of the projection weights ``v = argmin_{v ≥ u} vᵀ G v`` of the
        preference vectors, with this method's preprocessing."""
        projections = project_preferences(
            gramian_to_numpy(gramian),
            self.preferences(gramian.shape[0]),
            self.norm_eps,
            self.reg_eps,
            self.regularization,
        )
        return weights_to_tensor(projections.sum(axis=0), gramian)

"""Krum and Multi-Krum: Byzantine-robust aggregation (Blanchard et al., NeurIPS 2017,
https://proceedings.neurips.cc/paper/2017/file/f4b9ec30ad9f68f89b29639786cb62ef-Paper.pdf).

Each row is scored by how close it is to its nearest neighbours; the update is the row with the
lowest score (Multi-Krum: the mean of the ``n_selected`` lowest), so a few outlying rows (up to
``f = n_byzantine``) cannot drag the update away::

    d_ij  = ||g_i - g_j|| = sqrt(G_ii + G_jj - 2 G_ij)
    s(i)  = Σ_{j ∈ N_i} d_ij          N_i: the K - f - 2 rows closest to g_i (g_i itself excluded)
    d     = (1/m) Σ_{i ∈ S} g_i       S: the m = ``n_selected`` rows of lowest score

Reference: TorchJD ``src/torchjd/aggregation/_krum.py`` (``KrumWeighting``, Gramian form, same
formulas). Deviations, all for inputs where the reference is undefined or order-dependent:

- TorchJD requires ``n_byzantine`` and at least ``f + 3`` rows and raises otherwise. A sampler can
  change the number K of rows from step to step, so here ``n_byzantine`` defaults to 0 and, with
  fewer than ``f + 3`` rows, ``f`` is lowered to ``max(K - 3, 0)`` for that call (with K ≤ 2 every
  score is 0, so every row ties, see below); ``n_selected`` is capped at K.
- Ties: TorchJD picks among equal scores by ``topk`` order, which depends on the row order. Here
  every row whose score ties the m-th lowest (within a relative 1e-6) is kept and the selected rows
  are averaged, so the update does not depend on the order of the tasks (two opposite rows give 0,
  identical rows give the row).
- Squared distances are clamped at 0 before the square root (rounding can make them slightly
  negative, which gives NaN in the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register_method


@register_method("krum")
class Krum(GramianMethod):
    """Krum / Multi-Krum.

    Args:
        n_byzantine (`int`, *optional*, defaults to `0`):
            Number f of rows that may be adversarial (outlying).
        n_selected (`int`, *optional*, defaults to `1`):
            Number m of lowest-score rows averaged (1: Krum; more: Multi-Krum).
    """

    def __init__(self, num_tasks: int | None = None, n_byzantine: int = 0, n_selected: int = 1) -> None:
        super().__init__(num_tasks)
        if isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int) or n_byzantine < 0:
            raise ValueError(f"`n_byzantine` must be an integer >= 0, got {n_byzantine!r}")
        if isinstance(n_selected, bool) or not isinstance(n_selected, int) or n_selected < 1:
            raise ValueError(f"`n_selected` must be a positive integer, got {n_selected!r}")
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def scores(self, gramian: Tensor) -> Tensor:
        """The Krum score of every row (shape (K,)), from the Gramian."""
        gram = gramian.detach().to(torch.float64)
        num_rows = gram.shape[0]
        byzantine = min(self.n_byzantine, max(num_rows - 3, 0))
        num_closest = max(num_rows - byzantine - 2, 0)
        squared_norms = gram.diagonal()
        distances = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram).clamp_min(0.0).sqrt()
        # the row's distance to itself is 0 and always among the smallest: skip it
        closest, _ = torch.sort(distances, dim=1)
        return closest[:, 1 : 1 + num_closest].sum(dim=1)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        scores = self.scores(gramian)
        selected = min(self.n_selected, scores.numel())
        cutoff = torch.sort(scores).values[selected - 1]
        tolerance = 1e-6 * scores.abs().max()
        keep = scores <= cutoff + tolerance
        weights = keep.to(torch.float64) / keep.sum()
        return weights.to(device=gramian.device, dtype=gramian.dtype)

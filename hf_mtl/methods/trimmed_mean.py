"""Trimmed mean: coordinate-wise Byzantine-robust aggregation (Yin et al., ICML 2018,
https://proceedings.mlr.press/v80/yin18a.html).

For every coordinate (column of J) independently, the ``t = trim_number`` largest and ``t``
smallest values are dropped and the remaining ``K - 2t`` are averaged::

    d_p = mean( sort(J[:, p])[t : K - t] )

With ``t = 0`` this is the mean of the rows (``ew``). The result is not a combination of the rows
with one weight per task (each coordinate keeps different rows), so ``last_weights`` is ``None``.

Reference: TorchJD ``src/torchjd/aggregation/_trimmed_mean.py`` (``TrimmedMean``). Deviation:
TorchJD has no default and raises when ``K < 2t + 1``; a sampler can change the number K of rows
from step to step, so here ``trim_number`` defaults to 1 and, with fewer than ``2t + 1`` rows, ``t``
is lowered to ``(K - 1) // 2`` for that call (K ≤ 2: the plain mean). The sort and the mean run in
float32 for reduced-precision input (float64 stays float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientMethod
from .registry import register_method


@register_method("trimmed_mean")
class TrimmedMean(GradientMethod):
    """Coordinate-wise trimmed mean of the rows.

    Args:
        trim_number (`int`, *optional*, defaults to `1`):
            Number t of largest and of smallest values dropped in every column.
    """

    def __init__(self, num_tasks: int | None = None, trim_number: int = 1) -> None:
        super().__init__(num_tasks)
        if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
            raise ValueError(f"`trim_number` must be an integer >= 0, got {trim_number!r}")
        self.trim_number = trim_number

    def aggregate(
        self,
        jacobian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        representation: Tensor | None = None,
    ) -> Tensor:
        self._check_jacobian(jacobian)
        num_rows = jacobian.shape[0]
        if num_rows == 0:
            raise ValueError("`jacobian` must have at least one row, got 0")
        trim = min(self.trim_number, (num_rows - 1) // 2)
        ordered, _ = torch.sort(jacobian.to(torch.promote_types(jacobian.dtype, torch.float32)), dim=0)
        self.last_weights = None
        return ordered[trim : num_rows - trim].mean(dim=0).to(jacobian.dtype)

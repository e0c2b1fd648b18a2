"""The two-objective 2-D toy of the CAGrad and Nash-MTL papers (docs/toy_pareto.md).

Pure torch, batched: ``toy_losses(x)`` maps points of shape (N, 2) to losses of shape (N, 2).
Reference: ``Cranial-XIX/CAGrad toy.py`` (``scale=1``) and ``AvivNavon/nash-mtl
experiments/toy/problem.py`` (``Toy(scale=0.1)``: f₁ multiplied by 0.1)::

    h₁ = log(max(|0.5(−x₁−7) − tanh(−x₂)|, LOWER)) + 6
    h₂ = log(max(|0.5(−x₁+3) + tanh(−x₂) + 2|, LOWER)) + 6
    q₁ = ((−x₁+7)² + 0.1(−x₂−8)²)/10 − 20
    q₂ = ((−x₁−7)² + 0.1(−x₂−8)²)/10 − 20
    c₁ = max(tanh(x₂/2), 0),   c₂ = max(tanh(−x₂/2), 0)
    f₁ = scale · (c₁h₁ + c₂q₁),   f₂ = c₁h₂ + c₂q₂          LOWER = 5e-6

The Pareto set drawn in the papers is the segment x₂ = −8.3552, x₁ ∈ [−7, 7]; scaling f₁ does not
move it.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOWER = 5e-6

#: The plotted Pareto segment: x₂ = PARETO_X2 for x₁ in PARETO_X1 (docs/toy_pareto.md).
PARETO_X2 = -8.3552
PARETO_X1 = (-7.0, 7.0)

#: Starting points of the CAGrad toy and of the Nash-MTL / FAMO code.
CAGRAD_INITS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
NASH_INITS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def toy_losses(x: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """``(f₁, f₂)`` at the points ``x``, shape (N, 2) or (2,); ``scale`` multiplies f₁ (per point if a tensor)."""
    x1, x2 = x[..., 0], x[..., 1]
    h1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOWER).log() + 6
    h2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOWER).log() + 6
    q1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    q2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c1 = torch.clamp(torch.tanh(x2 * 0.5), min=0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), min=0)
    f1 = scale * (c1 * h1 + c2 * q1)
    f2 = c1 * h2 + c2 * q2
    return torch.stack([f1, f2], dim=-1)


def distance_to_pareto_segment(x: Tensor) -> Tensor:
    """Euclidean distance of the points ``x`` (shape (..., 2)) to the plotted Pareto segment."""
    dx = (x[..., 0] - x[..., 0].clamp(*PARETO_X1)).abs()
    dy = (x[..., 1] - PARETO_X2).abs()
    return torch.sqrt(dx * dx + dy * dy)

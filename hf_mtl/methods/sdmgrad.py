"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., NeurIPS 2023,
https://arxiv.org/abs/2305.18409).

The update is pulled towards the average gradient g_0 = (1/K) Σ g_i by a regulariser λ; the simplex
weights w solve ``min_w ½||Jᵀw + λ g_0||²`` approximately by a few projected SGD steps, warm-started
from the previous step's w::

    A = J_ξ J_ξ'ᵀ / s²,      s = mean_i sqrt(max((J_ξ J_ξ'ᵀ)_ii, 0))     (scale normalisation)
    repeat n_iter times:     v ← μ v + A (w + λ w̃)              (v = 0 before the first step)
                             w ← Π_Δ(w - η v)                    w̃ = (1/K) 1
    d = K (J_ζᵀ w + λ J_ζᵀ w̃) / (1 + λ)                          weights K (w + λ w̃) / (1 + λ)

Reference: the official code ``OptMN-Lab/sdmgrad`` ``methods/weight_methods.py`` (``SDMGrad``):
SGD with lr η = 10 and momentum μ = 0.5 (a fresh optimizer, so fresh momentum, every step),
``n_iter = 20``, λ = 0.3 (``experiments/nyuv2/run.sh``; the class default is 0.6), w kept across
steps, and the update multiplied by K "to match the sum loss". LibMTL's ``SDMGrad.py`` is the same
with lr 5 and without the factor K; TorchJD's ``SDMGradWeighting`` (a branch) uses lr 10, no K.

**Double sampling on one Jacobian.** The paper draws three independent batches ξ, ξ', ζ. hf_mtl's
engine builds one Jacobian per step, so ``aggregate(J)`` uses J for all three (``A = J Jᵀ / s²``). This
is in fact what the official NYUv2 / CityScapes code computes: ``grads = [torch.Tensor(...)] * 3``
makes the three "samples" one buffer, which ends up holding the last batch's gradients. With
independent batches, call ``weights_from_gramian(J_ξ @ J_ξ'.T)`` and combine the returned weights
with J_ζ yourself.

Deviation: the official scale is ``s = mean_i sqrt(A_ii + 1e-4)``, whose 1e-4 dominates when
``||g_i||² ≲ 1e-4`` (typical of fine-tuning) and makes the inner step size depend on the gradients'
scale; here ``s = mean_i sqrt(max(A_ii, 0))`` as in LibMTL and TorchJD, and ``A / s²`` without their
``+ 1e-8`` (which matters when ``||g||² ≲ 1e-6``), so the weights do not depend on the scale of J.
The reference then clips the shared gradient to norm 1 (``max_norm``): that is the Trainer's
``max_grad_norm``. Tasks left out of a step by a sampler: w over the present tasks is renormalised to
the simplex and written back with its previous total.

The inner SGD's step 10 is large: w often lands on a vertex of the simplex, and the iterations
amplify rounding in the Gramian (a float32 and a float64 Gramian of the same J give weights that
differ by about 1e-5). This is the reference's behaviour.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._simplex import project_onto_simplex, step_simplex_state
from .base import GramianMethod
from .registry import register_method


@register_method("sdmgrad")
class SDMGrad(GramianMethod):
    """SDMGrad with warm-started projected-SGD weights.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; taken from the first Jacobian when not given.
        lamda (`float`, *optional*, defaults to `0.3`):
            Regularisation λ ≥ 0 pulling the update towards the average gradient (the reference's
            spelling).
        n_iter (`int`, *optional*, defaults to `20`):
            Projected SGD steps on w per call.
        lr (`float`, *optional*, defaults to `10.0`):
            Step size η of the inner SGD.
        momentum (`float`, *optional*, defaults to `0.5`):
            Momentum μ of the inner SGD, in [0, 1).
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        lamda: float = 0.3,
        n_iter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
    ) -> None:
        super().__init__(num_tasks)
        if not isinstance(lamda, (int, float)) or not (math.isfinite(lamda) and lamda >= 0):
            raise ValueError(f"`lamda` must be a finite float >= 0, got {lamda!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"`n_iter` must be a positive integer, got {n_iter!r}")
        if not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"`lr` must be a finite float > 0, got {lr!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be a float in [0, 1), got {momentum!r}")
        self.lamda = float(lamda)
        self.n_iter = n_iter
        self.lr = float(lr)
        self.momentum = float(momentum)
        #: w over all ``num_tasks`` tasks (float64); empty until the first call.
        self.register_lazy_buffer("task_weights", dtype=torch.float64)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        matrix = gramian.detach().to(device="cpu", dtype=torch.float64)
        num_rows = matrix.shape[0]
        scale = matrix.diagonal().clamp_min(0.0).sqrt().mean()
        if scale > 0:  # all rows zero: A = 0 and w stays
            matrix = matrix / scale**2
        preference = torch.full((num_rows,), 1.0 / num_rows, dtype=torch.float64)

        def solve(weights: Tensor) -> Tensor:  # n_iter steps of projected SGD with momentum, from w
            velocity = torch.zeros_like(weights)
            for _ in range(self.n_iter):
                velocity = self.momentum * velocity + matrix @ (weights + self.lamda * preference)
                weights = project_onto_simplex(weights - self.lr * velocity)
            return weights

        weights = step_simplex_state(self, "task_weights", num_rows, task_ids, solve)
        combined = num_rows * (weights + self.lamda * preference) / (1.0 + self.lamda)
        return combined.to(device=gramian.device, dtype=gramian.dtype)

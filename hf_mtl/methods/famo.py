"""FAMO: fast adaptive multitask optimisation (Liu et al., NeurIPS 2023, https://arxiv.org/abs/2306.03792;
docs/methods.md, "FAMO").

With task logits ξ (one per task, initialised to 0), the shifted losses
``ℓ_i = L_i - ℓ_i* + ε`` (``min_losses`` ℓ* default 0, ε = 1e-8) and ``z = softmax(ξ)``::

    model step:   c = (Σ_i z_i / ℓ_i)^{-1}  (detached)
                  C = c · Σ_i z_i log ℓ_i               ⇒   ∂C/∂L_i = c z_i / ℓ_i   (Σ_i = 1)
    after it:     δ = J_softmax(ξ)ᵀ [log ℓ(t) - log ℓ(t+1)],   i.e.  δ_i = z_i (Δ_i - Σ_j z_j Δ_j)
                  ξ ← Adam(ξ, grad = δ + γ ξ)              lr = 0.025, γ = 0.001 (L2 weight decay)

This is exactly ``Cranial-XIX/FAMO famo.py``: there ``c`` names ``Σ_i z_i / ℓ_i`` and the loss is
``Σ_i z_i log ℓ_i / c``, the same scalar as ``C`` above (docs/methods.md and the paper name its inverse
``c``). The gradient weights ``c z_i / ℓ_i`` are positive and sum to 1.

``after_optimizer_step`` needs the losses of the same batch recomputed after the optimizer step
(``needs_losses_after_step``). The logits are a buffer, not a parameter, so the Trainer's optimizer
never touches them; the method's own Adam state (first and second moments, per-task step counts) is
kept in buffers, so the ``state_dict`` carries it. The reference also clips the shared gradient to norm
1.0; that is the Trainer's ``max_grad_norm``, not part of the method.

Tasks left out of a step by a sampler: z is the softmax over the logits of the tasks present, and only
their logits (and Adam moments and step counts) are updated. With every task present at every step,
this is torch's ``Adam`` on the whole logit vector.

Losses below ``min_losses`` are clamped to ε (their gradient weight is then 0) instead of
producing the NaN of ``log`` of a negative number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("famo")
class FAMO(LossWeightingMethod):
    """FAMO: loss weighting whose logits learn from the loss decrease across each optimizer step.

    Args:
        num_tasks (`int`):
            Number of tasks K (required: one logit per task).
        w_lr (`float`, *optional*, defaults to `0.025`):
            Learning rate of the internal Adam on the logits.
        gamma (`float`, *optional*, defaults to `0.001`):
            Weight decay γ of the logits (0.01 for CityScapes, 0 for the toy in the reference).
        min_losses (`float` or `list[float]`, *optional*, defaults to `0.0`):
            The lower bounds ℓ* subtracted from the losses, one per task or one for all.
        eps (`float`, *optional*, defaults to `1e-8`):
            Added to the shifted losses so that they stay positive.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`):
            Adam's moment decay rates (torch's defaults, as in the reference).
        adam_eps (`float`, *optional*, defaults to `1e-8`):
            Adam's denominator term (torch's default, as in the reference).
    """

    weights_depend_on_losses = True

    needs_losses_after_step = True

    def __init__(
        self,
        num_tasks: int | None = None,
        w_lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `famo` (one logit per task), got None")
        for field, value in (("w_lr", w_lr), ("eps", eps), ("adam_eps", adam_eps)):
            if not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{field}` must be a finite float > 0, got {value!r}")
        if not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"`gamma` must be a finite float >= 0, got {gamma!r}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"`betas` must be two floats in [0, 1), got {betas!r}")
        bounds = torch.as_tensor(min_losses, dtype=torch.float32).reshape(-1)
        if bounds.numel() == 1:
            bounds = bounds.expand(num_tasks).clone()
        if bounds.numel() != num_tasks or not torch.isfinite(bounds).all():
            raise ValueError(f"`min_losses` must be one finite float or {num_tasks} of them, got {min_losses!r}")
        self.w_lr = float(w_lr)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.register_buffer("min_losses", bounds)
        #: ξ, the task logits; z = softmax(ξ).
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_steps", torch.zeros(num_tasks))

    def _shifted(self, losses: Tensor, index: Tensor) -> Tensor:
        """``ℓ = L - ℓ* + ε`` in float32, clamped to ≥ ε."""
        shifted = losses.to(torch.float32) - self.min_losses[index].to(losses.device) + self.eps
        return shifted.clamp_min(self.eps)

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        index = task_index(losses, task_ids, self.num_tasks).to(self.logits.device)
        z = torch.softmax(self.logits[index], dim=0).to(losses.device)
        shifted = self._shifted(losses, index)
        c = 1.0 / (z / shifted.detach()).sum()
        self.last_weights = (c * z / shifted.detach()).detach()
        return c * (z * shifted.log()).sum()

    @torch.no_grad()
    def after_optimizer_step(
        self, losses_before: Tensor, losses_after: Tensor, *, task_ids: Tensor | None = None
    ) -> None:
        index = task_index(losses_before, task_ids, self.num_tasks).to(self.logits.device)
        if losses_after.shape != losses_before.shape:
            raise ValueError(
                f"`losses_after` must have the shape of `losses_before` {tuple(losses_before.shape)}, "
                f"got {tuple(losses_after.shape)}"
            )
        device = self.logits.device
        decrease = (
            self._shifted(losses_before.detach().to(device), index).log()
            - self._shifted(losses_after.detach().to(device), index).log()
        )
        xi = self.logits[index]
        z = torch.softmax(xi, dim=0)
        delta = z * (decrease - (z * decrease).sum())  # J_softmax(ξ)ᵀ Δ, J symmetric
        self._adam_step(index, xi, delta)

    def _adam_step(self, index: Tensor, xi: Tensor, grad: Tensor) -> None:
        """One step of torch's ``Adam`` (L2 ``weight_decay=γ``) on the logits at ``index``."""
        beta1, beta2 = self.betas
        grad = grad + self.gamma * xi
        steps = self.adam_steps[index] + 1
        exp_avg = self.exp_avg[index].lerp(grad, 1 - beta1)
        exp_avg_sq = self.exp_avg_sq[index] * beta2 + (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1**steps
        bias_correction2 = 1 - beta2**steps
        denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + self.adam_eps
        self.logits[index] = xi - (self.w_lr / bias_correction1) * exp_avg / denom
        self.exp_avg[index] = exp_avg
        self.exp_avg_sq[index] = exp_avg_sq
        self.adam_steps[index] = steps

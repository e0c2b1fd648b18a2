"""GradNorm: gradient normalisation (Chen et al., ICML 2018, https://proceedings.mlr.press/v80/chen18a.html;
docs/methods.md, "GradNorm").

Learnable logits ``s`` (one per task, initialised to 0) give the task weights, and an auxiliary loss
pulls each weighted gradient norm toward a common norm scaled by the task's relative inverse training
rate::

    λ     = K · softmax(s)                                   (Σ λ = K; λ = 1 at the start)
    G_i   = ||λ_i g_i||,   Ḡ = mean_i G_i
    r_i   = (L_i / L_i(0)) / mean_j (L_j / L_j(0))
    L_grad = Σ_i | G_i - sg(Ḡ · r_i^α) |                     α = 1.5
    model update:   d = Σ_i λ_i g_i                          (λ detached)
    auxiliary_loss = L_grad                                  (the engine backpropagates it into s)

This is LibMTL's ``GradNorm`` (softmax-parametrised weights, norms over the whole shared gradient);
the paper instead learns the weights directly, renormalises them to sum K after each step and takes
the norms on the last shared layer only.

``aggregate(J, losses=...)`` returns the update and leaves ``L_grad`` in ``auxiliary_loss``; the engine
backpropagates it into ``s`` (``method.auxiliary_loss.backward()`` outside the engine), so the Trainer's
optimizer, which owns ``s``, steps it together with the model. Everything but ``s`` is detached: the model
never receives ``L_grad``'s gradient. ``aggregate`` never writes a ``.grad``.

The loss baseline ``L(0)`` (``initial_loss``):

- ``"first_step"`` (default; the paper's ``L_i(0)``, TorchJD): the first loss seen for each task.
- ``"first_epoch"`` (LibMTL): during the first epoch the weights stay at λ = 1 (``s`` gets no
  gradient) and the losses are averaged; ``on_epoch_end`` of the first epoch sets ``L(0)`` to that
  average, and GradNorm runs from the second epoch on.

Without ``losses`` (a plain matrix), every ``r_i = 1``: GradNorm then only equalises the weighted
gradient norms. A task whose baseline is 0 or not yet known gets the ratio 1. Tasks left out of a
step by a sampler: λ is ``k · softmax`` over the ``k`` present tasks' logits, and only their logits
receive a gradient; a task's baseline is the first loss seen for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import GradientMethod, task_index
from .registry import register_method

_INITIAL_LOSS_MODES = ("first_step", "first_epoch")


@register_method("gradnorm")
class GradNorm(GradientMethod):
    """GradNorm with softmax-parametrised task weights (LibMTL's form).

    Args:
        num_tasks (`int`):
            Number of tasks K (required: one logit per task).
        alpha (`float`, *optional*, defaults to `1.5`):
            The restoring strength α ≥ 0; 0 asks for equal weighted gradient norms.
        initial_loss (`str`, *optional*, defaults to `"first_step"`):
            Where the baseline ``L(0)`` comes from: ``"first_step"`` (the first loss seen for each
            task, as in the paper) or ``"first_epoch"`` (the mean loss of the first epoch, with
            GradNorm starting at the second epoch, as in LibMTL).
    """

    def __init__(self, num_tasks: int | None = None, alpha: float = 1.5, initial_loss: str = "first_step") -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `gradnorm` (one weight logit per task), got None")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"`alpha` must be a finite float >= 0, got {alpha!r}")
        if initial_loss not in _INITIAL_LOSS_MODES:
            raise ValueError(f"`initial_loss` must be one of {list(_INITIAL_LOSS_MODES)}, got {initial_loss!r}")
        self.alpha = float(alpha)
        self.initial_loss = initial_loss
        #: s, the weight logits: λ = K · softmax(s). Learned by the Trainer's optimizer.
        self.logits = nn.Parameter(torch.zeros(num_tasks))
        #: L(0) per task; NaN while unknown.
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))
        # first-epoch averaging (``initial_loss="first_epoch"`` only)
        self.register_buffer("epoch_loss_sum", torch.zeros(num_tasks))
        self.register_buffer("epoch_loss_count", torch.zeros(num_tasks))
        self.warming_up = initial_loss == "first_epoch"

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
        probe = torch.empty(num_rows, device=self.logits.device)
        index = task_index(probe, task_ids, self.num_tasks)
        matrix = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
        observed = None
        if losses is not None:
            observed = losses.detach().reshape(-1).to(device=self.logits.device, dtype=torch.float32)
            if observed.numel() != num_rows:
                raise ValueError(
                    f"`losses` must have one entry per row of `jacobian` ({num_rows}), got {observed.numel()}"
                )

        with torch.enable_grad():
            logits = self.logits[index]
            weights = num_rows * torch.softmax(logits, dim=0)
            if self.warming_up:
                if observed is not None:
                    self._record_epoch_losses(observed, index)
            else:
                norms = (matrix * matrix).sum(dim=1).sqrt().to(weights.device)
                weighted_norms = weights * norms
                targets = (weighted_norms.mean() * self._relative_rates(observed, index) ** self.alpha).detach()
                self.auxiliary_loss = (weighted_norms - targets).abs().sum()
        weights = weights.detach()
        self.last_weights = weights
        return (weights.to(device=matrix.device, dtype=matrix.dtype) @ matrix).to(jacobian.dtype)

    @torch.no_grad()
    def _relative_rates(self, observed: Tensor | None, index: Tensor) -> Tensor:
        """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)); ones without losses."""
        if observed is None:
            return torch.ones(index.numel(), device=self.logits.device)
        baseline = self.initial_losses[index]
        unknown = torch.isnan(baseline) & torch.isfinite(observed)
        if unknown.any():
            self.initial_losses[index[unknown]] = observed[unknown]
            baseline = self.initial_losses[index]
        valid = torch.isfinite(observed) & torch.isfinite(baseline) & (baseline > 0)
        ratios = torch.where(valid, observed / torch.where(valid, baseline, 1.0), 1.0).clamp_min(0.0)
        mean = ratios.mean()
        if not mean > 0:
            return torch.ones_like(ratios)
        return ratios / mean

    @torch.no_grad()
    def _record_epoch_losses(self, observed: Tensor, index: Tensor) -> None:
        finite = torch.isfinite(observed)
        self.epoch_loss_sum.index_add_(0, index, torch.where(finite, observed, 0.0))
        self.epoch_loss_count.index_add_(0, index, finite.to(self.epoch_loss_count.dtype))

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """With ``initial_loss="first_epoch"``, the end of the first epoch sets ``L(0)`` and starts GradNorm."""
        if not self.warming_up:
            return
        seen = self.epoch_loss_count > 0
        average = self.epoch_loss_sum / self.epoch_loss_count.clamp_min(1)
        self.initial_losses.copy_(torch.where(seen, average, self.initial_losses))
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()
        self.warming_up = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"warming_up": self.warming_up}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.warming_up = bool(state["warming_up"])

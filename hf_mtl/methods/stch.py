"""STCH: smooth Tchebycheff scalarisation (Lin et al., ICML 2024, https://arxiv.org/abs/2402.19078).

The Tchebycheff scalarisation ``max_i L_i`` reaches every Pareto point but is not smooth; STCH
replaces the max by a log-sum-exp of smoothness μ on the logs of the losses normalised by a nadir
point ``z`` (the average losses of one warm-up epoch)::

    warm-up (epoch < W):   L = Σ_i log L_i                                  (``si``)
    epoch = W:             L = Σ_i log L_i,   z_i = mean over the epoch of L_i
    after (epoch > W):     ℓ_i = log(L_i / z_i + 1e-20)
                           L   = K · μ · log Σ_i exp(ℓ_i / μ)               (a smooth max of the ℓ_i)
                           ∂L/∂L_i = K · softmax(ℓ / μ)_i / (L_i + 1e-20 z_i)

As μ → 0 the weights go to the worst task (relative to its nadir) alone; as μ grows they go to
``K / L_i``, i.e. ``si``. Reference: the official code ``Xi-L/STCH``
(``STCH_MTL/LibMTL/weighting/STCH.py``, identical to LibMTL's ``STCH.py``) with LibMTL's defaults
``STCH_mu = 1.0`` and ``STCH_warmup_epoch = 4``; the code subtracts the detached max before the
exponential, which changes the value of ``L`` but not its gradient (here ``logsumexp`` does it).

Periods: like the reference, the phase follows the epoch, advanced by ``on_epoch_end``. Fine-tuning
runs are often shorter than 5 epochs; with ``warmup_steps`` set, the phase follows the optimizer
steps instead: the first ``warmup_steps`` steps are the warm-up, with the nadir averaged over all of
them. Steps are counted, and the nadir's losses collected, by ``observe_losses``, which the engine
calls once per optimizer step (after the step's ``combine_losses`` calls) with the step's mean losses
over its micro-batches and ranks, identical on every rank; the nadir is fixed by the ``observe_losses``
(or ``on_epoch_end``) call that ends the warm-up. ``combine_losses`` only reads this state, so it may be
called any number of times per step (gradient accumulation, SAM's ascent, the ``aggregate`` probe).
Outside the engine, call ``observe_losses`` once per step yourself.

Deviations: losses are clamped to ``eps`` (1e-20, the reference's offset) before the logarithm of
the warm-up loss, so a zero loss gives a finite update. The nadir averages one mean loss per
optimizer step (over its micro-batches and ranks) where the single-process reference averages one
loss per batch: the same numbers on one process with one micro-batch per step. Tasks
left out of steps by a sampler: each task's nadir averages the steps that held it; a task never seen
during the nadir period (or whose average loss is 0) gets ``z_i = 1`` (no normalisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("stch")
class SmoothTchebycheff(LossWeightingMethod):
    """Smooth Tchebycheff scalarisation of the losses, normalised by a nadir point from a warm-up.

    Args:
        num_tasks (`int`):
            Number of tasks K (required: the nadir has one entry per task).
        mu (`float`, *optional*, defaults to `1.0`):
            Smoothness μ of the log-sum-exp; smaller is closer to the max.
        warmup_epochs (`int`, *optional*, defaults to `4`):
            Number W of epochs of ``Σ log L_i`` before the nadir epoch (epoch W, 0-based).
        warmup_steps (`int`, *optional*):
            When set, the warm-up is this many optimizer steps (calls of ``observe_losses``; the nadir
            averages all of them) and ``on_epoch_end`` does nothing.
        eps (`float`, *optional*, defaults to `1e-20`):
            Offset inside the logarithms (the reference's 1e-20).
    """

    weights_depend_on_losses = True

    def __init__(
        self,
        num_tasks: int | None = None,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        warmup_steps: int | None = None,
        eps: float = 1e-20,
    ) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `stch` (the nadir has one entry per task), got None")
        if not isinstance(mu, (int, float)) or not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"`mu` must be a finite float > 0, got {mu!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be an integer >= 0, got {warmup_epochs!r}")
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1
        ):
            raise ValueError(f"`warmup_steps` must be a positive integer or None, got {warmup_steps!r}")
        if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"`eps` must be a finite float > 0, got {eps!r}")
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.eps = float(eps)
        self.register_buffer("loss_sum", torch.zeros(num_tasks))
        self.register_buffer("loss_count", torch.zeros(num_tasks))
        #: z, the nadir point; NaN until the warm-up ends.
        self.register_buffer("nadir", torch.full((num_tasks,), float("nan")))
        self.epoch = 0
        #: optimizer steps seen by ``observe_losses``.
        self.steps = 0

    @property
    def in_warmup(self) -> bool:
        """Whether the losses are still combined as ``Σ log L_i`` (no nadir yet)."""
        if self.warmup_steps is not None:
            return self.steps < self.warmup_steps
        return self.epoch <= self.warmup_epochs

    def _collects_nadir(self) -> bool:
        return self.warmup_steps is not None or self.epoch == self.warmup_epochs

    @torch.no_grad()
    def observe_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> None:
        """Counts the step and, during the nadir period, adds the step's mean losses to the nadir average
        (once per optimizer step, the same values on every rank); fixes the nadir when the warm-up ends."""
        if self.in_warmup and self._collects_nadir():
            index = task_index(losses, task_ids, self.num_tasks).to(self.loss_sum.device)
            observed = losses.detach().to(device=self.loss_sum.device, dtype=torch.float32)
            self.loss_sum.index_add_(0, index, observed)
            self.loss_count.index_add_(0, index, torch.ones_like(observed))
        self.steps += 1
        self._close_warmup_if_over()

    def on_epoch_end(self, epoch: int) -> None:
        if self.warmup_steps is None:
            self.epoch += 1
            self._close_warmup_if_over()

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        index = task_index(losses, task_ids, self.num_tasks).to(self.nadir.device)
        values = losses.to(torch.float32)
        if self.in_warmup:
            clamped = values.clamp_min(self.eps)
            self.last_weights = torch.where(
                values.detach() >= self.eps, 1.0 / clamped.detach(), torch.zeros_like(clamped.detach())
            )
            return clamped.log().sum()
        # the nadir is fixed when the warm-up ends; a state set by hand may lack it: estimate, do not store
        nadir = self.nadir if not torch.isnan(self.nadir).any() else self.nadir_estimate()
        nadir = nadir[index].to(device=values.device)
        scaled = torch.log(values / nadir + self.eps)
        combined = losses.numel() * self.mu * torch.logsumexp(scaled / self.mu, dim=0)
        probe = values.detach()
        softmax = torch.softmax(scaled.detach() / self.mu, dim=0)
        self.last_weights = losses.numel() * softmax / (probe + self.eps * nadir)
        return combined

    @torch.no_grad()
    def nadir_estimate(self) -> Tensor:
        """The nadir from the losses collected so far (1 for a task without any, or with average 0)."""
        seen = self.loss_count > 0
        average = self.loss_sum / self.loss_count.clamp_min(1)
        return torch.where(seen & (average > 0), average, torch.ones_like(average))

    @torch.no_grad()
    def _close_warmup_if_over(self) -> None:
        if not self.in_warmup and torch.isnan(self.nadir).any():
            self.nadir.copy_(self.nadir_estimate())

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.steps = int(state["steps"])

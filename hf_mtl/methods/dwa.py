"""DWA: dynamic weight average (Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019,
https://arxiv.org/abs/1803.10704; docs/methods.md, "DWA").

With L̄_i(t) the average loss of task i over period t (an epoch, or a window of steps)::

    w_i(t) = L̄_i(t-1) / L̄_i(t-2)
    λ(t)   = K · softmax(w(t) / T)          T = 2;   λ = 1 during the first two periods
    L      = Σ_i λ_i L_i                    (a sum, as LibMTL's DWA)

The method averages the losses it receives in ``observe_losses`` (the engine calls it once per
optimizer step with the step's mean losses over micro-batches and ranks, so every rank keeps the same
averages) and closes a period in ``on_epoch_end`` (LibMTL's epochs) or, with ``window`` set, after
every ``window`` steps. Outside the engine, call ``observe_losses`` once per step yourself;
``combine_losses`` and ``aggregate`` only read the current λ. nash-mtl's ``DynamicWeightAverage``
instead slides a FIFO of the last 2·25 iterations, recomputes λ at every iteration and returns
``mean(λ L)``; ``window=25`` here closes disjoint 25-step windows.

Tasks left out of some steps by a sampler: the average of a task is taken over the steps that held it;
a task absent from a whole period keeps its previous average (its ratio counts as "no change"), and a
ratio that is not finite (a task never seen, a zero average) is replaced by 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import LossWeightingMethod, task_index
from .registry import register_method


@register_method("dwa")
class DynamicWeightAverage(LossWeightingMethod):
    """Dynamic weight average over epochs (LibMTL) or windows of steps (nash-mtl-like).

    Args:
        num_tasks (`int`):
            Number of tasks K (required: the method keeps per-task loss averages).
        temperature (`float`, *optional*, defaults to `2.0`):
            The softmax temperature T.
        window (`int`, *optional*):
            When set, a period is ``window`` calls of ``observe_losses`` (optimizer steps) instead of
            an epoch, and ``on_epoch_end`` does nothing.
    """

    def __init__(self, num_tasks: int | None = None, temperature: float = 2.0, window: int | None = None) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("`num_tasks` is required by `dwa` (it keeps per-task loss averages), got None")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"`window` must be a positive integer or None, got {window!r}")
        self.temperature = float(temperature)
        self.window = window
        #: λ used by the current period, shape (num_tasks,).
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("period_sum", torch.zeros(num_tasks))
        self.register_buffer("period_count", torch.zeros(num_tasks))
        #: average losses of the last two closed periods; row 1 is the most recent, NaN = never seen.
        self.register_buffer("history", torch.full((2, num_tasks), float("nan")))
        self.num_periods = 0  # closed periods
        self.calls = 0  # steps in the current window (window mode only)

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        index = task_index(losses, task_ids, self.num_tasks).to(self.weights.device)
        weights = self.weights[index].to(losses.device)
        self.last_weights = weights.detach()
        return (weights * losses.to(torch.float32)).sum()

    @torch.no_grad()
    def observe_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> None:
        """Adds one step's losses to the current period (and closes it after ``window`` steps)."""
        index = task_index(losses, task_ids, self.num_tasks).to(self.period_sum.device)
        observed = losses.detach().reshape(-1).to(device=self.period_sum.device, dtype=self.period_sum.dtype)
        finite = torch.isfinite(observed)
        self.period_sum.index_add_(0, index, torch.where(finite, observed, torch.zeros_like(observed)))
        self.period_count.index_add_(0, index, finite.to(self.period_count.dtype))
        if self.window is not None:
            self.calls += 1
            if self.calls == self.window:
                self._close_period()

    def on_epoch_end(self, epoch: int) -> None:
        if self.window is None:
            self._close_period()

    @torch.no_grad()
    def _close_period(self) -> None:
        seen = self.period_count > 0
        average = torch.where(seen, self.period_sum / self.period_count.clamp_min(1), self.history[1])
        self.history.copy_(torch.stack([self.history[1], average]))
        self.period_sum.zero_()
        self.period_count.zero_()
        self.calls = 0
        self.num_periods += 1
        if self.num_periods >= 2:
            ratio = self.history[1] / self.history[0]
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            self.weights.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, dim=0))

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_periods": self.num_periods, "calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_periods = int(state["num_periods"])
        self.calls = int(state["calls"])

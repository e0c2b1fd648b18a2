"""CR-MOGM: conflict-reduced multi-objective gradient manipulation (Zhou et al., "On the Convergence of
Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022,
https://proceedings.neurips.cc/paper_files/paper/2022/file/f91bd64a3620aad8e70a27ad9cb3ca57-Paper-Conference.pdf).

Stochastic MGDA-type methods (MGDA, PCGrad, CAGrad, ...) do not converge with noisy gradients
because their weights jump from batch to batch. CR-MOGM smooths the weights of any such method with
a moving average across steps::

    λ̂_t = base.weights_from_gramian(G_t)
    λ_t = α λ_{t-1} + (1 - α) λ̂_t           λ_0 = λ̂_1 (the first output is the base's)
    d_t = Σ_i λ_t,i g_i

Reference: TorchJD ``CRMOGMWeighting`` (``src/torchjd/aggregation/_cr_mogm.py``, exported in
``torchjd.aggregation``): α = 0.9 and ``λ_0 = λ̂_1``. The paper (Corollary 1) lets α grow towards 1
as the learning rate decays; set ``method.alpha`` between steps to follow such a schedule.

``base`` names any registered method that computes weights from the Gramian (a ``GramianMethod``,
e.g. ``mgda``, ``pcgrad``, ``cagrad``, ``imtl``, ``upgrad``); the wrapped method is a submodule, so its
own state and parameters (IMTL-L's scales) travel with this one, and its ``transform_losses`` and
hooks are forwarded. Tasks left out of a step by a sampler: only the present tasks' averages are
updated; a task seen for the first time starts at its base weight.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import METHODS, get_method, register_method


def _gramian_method_names() -> list[str]:
    return [
        name
        for name in METHODS.names()
        if name != "cr_mogm" and isinstance(METHODS.get(name), type) and issubclass(METHODS.get(name), GramianMethod)
    ]


@register_method("cr_mogm")
class CRMOGM(GramianMethod):
    """CR-MOGM: a moving average of the weights of another Gramian method.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; taken from the first Jacobian when not given. Passed to ``base``.
        base (`str`, *optional*, defaults to `"mgda"`):
            Registered name of the wrapped method; it must compute weights from the Gramian.
        base_kwargs (`dict`, *optional*):
            Keyword arguments of the wrapped method.
        alpha (`float`, *optional*, defaults to `0.9`):
            Weight α ∈ [0, 1] of the previous average (0: the base method unchanged).
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        base: str = "mgda",
        base_kwargs: dict[str, Any] | None = None,
        alpha: float = 0.9,
    ) -> None:
        super().__init__(num_tasks)
        valid = _gramian_method_names()
        if base not in valid:
            raise ValueError(f"`base` must be one of {valid} (methods that weight the Gramian), got {base!r}")
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a float in [0, 1], got {alpha!r}")
        self.base = cast(GramianMethod, get_method(base, num_tasks=num_tasks, **(base_kwargs or {})))
        self.alpha = float(alpha)
        self.is_random = self.base.is_random
        #: the averaged weights λ over all ``num_tasks`` tasks (NaN: not seen yet); empty until the first call.
        self.register_lazy_buffer("averaged", dtype=torch.float64)

    def transform_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> Tensor:
        return self.base.transform_losses(losses, task_ids=task_ids)

    def after_optimizer_step(
        self, losses_before: Tensor, losses_after: Tensor, *, task_ids: Tensor | None = None
    ) -> None:
        self.base.after_optimizer_step(losses_before, losses_after, task_ids=task_ids)

    def on_epoch_end(self, epoch: int) -> None:
        self.base.on_epoch_end(epoch)

    def bind_parameter_layout(self, blocks: list[tuple[str, int]]) -> None:
        self.base.bind_parameter_layout(blocks)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        current = self.base.weights_from_gramian(gramian, losses=losses, task_ids=task_ids, generator=generator)
        index = self.resolve_task_index(gramian.shape[0], task_ids, self.averaged.device)
        state = self.lazy_buffer("averaged", (self.num_tasks,), float("nan"))
        current = current.detach().to(device=state.device, dtype=torch.float64)
        previous = state[index]
        averaged = torch.where(torch.isnan(previous), current, self.alpha * previous + (1.0 - self.alpha) * current)
        state[index] = averaged
        return averaged.to(device=gramian.device, dtype=gramian.dtype)

"""Private helpers for stateful methods whose state is sized lazily (from the first Jacobian seen).

``num_tasks`` may be left out when a method is called on plain matrices
(``get_method("moco").aggregate(J)``); the first call then fixes it to the number of rows. Tensors
whose size depends on the Jacobian (MoCo's and ExcessMTL's K x P buffers) cannot be registered
buffers of a fresh instance, so such methods keep them in ``get_extra_state`` /
``set_extra_state``, which ``state_dict`` / ``load_state_dict`` carry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientMethod, task_index


def resolve_task_index(
    method: GradientMethod, num_rows: int, task_ids: Tensor | None, device: torch.device
) -> Tensor:
    """Indices into ``method.num_tasks`` of the ``num_rows`` rows of a step, fixing ``num_tasks`` lazily."""
    if method.num_tasks is None:
        if task_ids is not None:
            raise ValueError(
                f"`num_tasks` is required by `{method.name}` when `task_ids` selects a subset of the tasks, got None"
            )
        method.num_tasks = num_rows
    return task_index(torch.empty(num_rows, device=device), task_ids, method.num_tasks)


def to_device(value: Tensor | None, device: torch.device) -> Tensor | None:
    """``value`` moved to ``device`` (extra state does not follow ``Module.to``)."""
    return None if value is None else value.to(device)

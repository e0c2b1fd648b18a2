"""`GradientBuffer`: one preallocated float32 tensor holding everything that crosses ranks in a step.

The buffer is cut into named segments (Jacobian rows of each block, the plain gradients of every other
parameter, the per-task loss sums, and whatever a sharpness variant declares). Segments are laid out in
two spans: an *early* span that a sharpness variant all-reduces before its perturbed passes (F-MTL's
per-task rows at θ, SAM's ascent gradient), and a *late* span reduced when the step is combined. Each
span is one collective; a step without early segments has exactly one.

Every rank adds gradients already normalised by the step's global item counts, so the collective is a
plain sum (`dist.ReduceOp.SUM`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sums ``tensor`` over the ranks in place (nothing when not distributed) and returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def views(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Consecutive views of ``flat`` shaped like ``params`` (``flat`` must hold exactly their elements)."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"a segment of {flat.numel()} floats cannot hold parameters of {offset}")
    return out


class GradientBuffer:
    """A flat tensor with named segments in an early and a late span.

    Args:
        early (`list[tuple[str, int]]`): ``(name, numel)`` of the segments reduced early.
        late (`list[tuple[str, int]]`): ``(name, numel)`` of the segments reduced at the combination.
        device (`torch.device`): where the buffer lives.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`).
    """

    def __init__(
        self,
        early: Sequence[tuple[str, int]],
        late: Sequence[tuple[str, int]],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        layout = [*early, *late]
        names = [name for name, _ in layout]
        if len(set(names)) != len(names):
            raise ValueError(f"segment names must be unique, got {names}")
        self.flat = torch.zeros(sum(n for _, n in layout), dtype=dtype, device=device)
        self._segments: dict[str, Tensor] = {}
        offset = 0
        for name, numel in layout:
            self._segments[name] = self.flat[offset : offset + numel]
            offset += numel
        self.early_size = sum(n for _, n in early)
        self._early_reduced = False

    def __getitem__(self, name: str) -> Tensor:
        return self._segments[name]

    def __contains__(self, name: str) -> bool:
        return name in self._segments

    def zero_(self) -> None:
        self.flat.zero_()
        self._early_reduced = False

    def all_reduce_early(self) -> None:
        """Sums the early span over the ranks (once per step)."""
        if self.early_size and not self._early_reduced:
            all_reduce_sum(self.flat[: self.early_size])
        self._early_reduced = True

    def all_reduce_late(self) -> None:
        """Sums what has not been reduced yet: the late span, or the whole buffer in one collective."""
        all_reduce_sum(self.flat[self.early_size :] if self._early_reduced else self.flat)
        self._early_reduced = True

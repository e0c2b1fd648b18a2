"""`GradientBuffer`: one preallocated float32 tensor holding everything that crosses ranks in a step.

The buffer is cut into named segments (Jacobian rows of each block, the plain gradients of every other
parameter, the per-task loss sums, and whatever a sharpness variant declares). Segments are laid out in
two spans: an *early* span that a sharpness variant all-reduces before its perturbed passes (F-MTL's
per-task rows at θ, SAM's ascent gradient), and a *late* span reduced when the step is combined. Each
span is one collective; a step without early segments has exactly one.

Every rank adds gradients already normalised by the step's global item counts, so the collective is a
plain sum (`dist.ReduceOp.SUM`). Under FSDP (`hf_mtl.engine.fsdp`) the segments of parameter gradients hold
this rank's shards, already summed over the ranks by FSDP's reduce-scatter: they are *local* segments, laid
out before both spans and never reduced.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

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


def local_shape(param: Tensor) -> torch.Size:
    """The shape of the part of ``param`` this rank holds: its local shard for a `DTensor` (an FSDP2 parameter),
    else its shape."""
    to_local = getattr(param, "to_local", None)
    if to_local is None:
        return param.shape
    with torch.no_grad():
        return to_local().shape


def local_numel(param: Tensor) -> int:
    """The number of elements of ``param`` this rank holds (see `local_shape`)."""
    return local_shape(param).numel()


def views(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Consecutive views of ``flat`` shaped like ``params``' local parts (``flat`` must hold exactly their elements)."""
    out, offset = [], 0
    for p in params:
        shape = local_shape(p)
        out.append(flat[offset : offset + shape.numel()].view(shape))
        offset += shape.numel()
    if offset != flat.numel():
        raise ValueError(f"a segment of {flat.numel()} floats cannot hold parameters of {offset}")
    return out


class GradientBuffer:
    """A flat tensor with named segments in an early and a late span (and optionally local segments).

    Args:
        early (`list[tuple[str, int]]`): ``(name, numel)`` of the segments reduced early.
        late (`list[tuple[str, int]]`): ``(name, numel)`` of the segments reduced at the combination.
        device (`torch.device`): where the buffer lives.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`).
        local (`Collection[str]`, *optional*): names of segments (of ``early`` or ``late``) that are never reduced,
            because what is added to them is already summed over the ranks (FSDP's reduce-scatter); they are laid out
            first.
    """

    def __init__(
        self,
        early: Sequence[tuple[str, int]],
        late: Sequence[tuple[str, int]],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        local: Collection[str] = (),
    ) -> None:
        layout = [*early, *late]
        names = [name for name, _ in layout]
        if len(set(names)) != len(names):
            raise ValueError(f"segment names must be unique, got {names}")
        kept = [s for s in layout if s[0] in local]
        early = [s for s in early if s[0] not in local]
        late = [s for s in late if s[0] not in local]
        layout = [*kept, *early, *late]
        self.flat = torch.zeros(sum(n for _, n in layout), dtype=dtype, device=device)
        self._segments: dict[str, Tensor] = {}
        offset = 0
        for name, numel in layout:
            self._segments[name] = self.flat[offset : offset + numel]
            offset += numel
        #: floats at the start that are never reduced (local segments)
        self.local_size = sum(n for _, n in kept)
        self.early_size = self.local_size + sum(n for _, n in early)
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
        if self.early_size > self.local_size and not self._early_reduced:
            all_reduce_sum(self.flat[self.local_size : self.early_size])
        self._early_reduced = True

    def all_reduce_late(self) -> None:
        """Sums what has not been reduced yet: the late span, or the whole buffer in one collective."""
        start = self.early_size if self._early_reduced else self.local_size
        if start < self.flat.numel():
            all_reduce_sum(self.flat[start:])
        self._early_reduced = True

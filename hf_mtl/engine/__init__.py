"""The multi-task step: per-task gradients, method problems per shared block, the cross-rank reduction.

- `partition`: which parameters are method problems (blocks), plain, or one task's own;
- `buffer`: the preallocated flat buffer that crosses ranks;
- `engine`: `MultiTaskEngine`, the step from a window of micro-batches to every ``.grad``;
- `gramian`: the Gramian path for shared-input groups (no K x P rows);
- `fsdp`: the engine under FSDP2 (per-shard rows, the all-reduced Gramian) and what is refused there.
"""

from .buffer import GradientBuffer, all_reduce_sum, is_distributed
from .engine import _METHOD_SALT, JACOBIAN_MODES, MultiTaskEngine, Problem
from .partition import ParameterBlock, ParameterPartition, parameter_blocks

__all__ = [
    "JACOBIAN_MODES",
    "GradientBuffer",
    "MultiTaskEngine",
    "ParameterBlock",
    "ParameterPartition",
    "Problem",
    "_METHOD_SALT",
    "all_reduce_sum",
    "is_distributed",
    "parameter_blocks",
]

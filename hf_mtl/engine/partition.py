"""Which trainable parameters are method problems, which are plain, and which belong to one task.

A parameter that two or more tasks reach (``model.task_parameter_names()``) is *shared*. Shared
parameters are grouped into *blocks*: the parameters that exactly the same set of tasks reaches (one
encoder read by its modality's tasks, a trunk read by all of them). Each block is one problem of the
gradient method: its tasks' gradients of its parameters are the rows, and the method combines them on
their own, so an unrelated encoder's gradients never enter another encoder's normalisations (MGDA's
minimum norm, CAGrad's ball, IMTL's projections). ``global_problem=True`` makes every shared parameter
one block over every task that reaches any of them (the Jacobian of all shared parameters at once).

Surgery can be restricted to shared parameters whose name matches one of some regular expressions (the
top layers, the LoRA weights); the other shared parameters are *plain*: they receive the gradient of
the summed objective ``∇ Σ_i L_i``, accumulated from the tasks' backwards without any row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .buffer import local_numel


@dataclass
class ParameterBlock:
    """Shared parameters that the same set of tasks reaches; one problem of the gradient method.

    Args:
        tasks (`tuple[str, ...]`): the tasks whose gradients are the block's rows, in task order.
        params (`list[tuple[str, nn.Parameter]]`): the block's parameters, in ``named_parameters`` order.
    """

    tasks: tuple[str, ...]
    params: list[tuple[str, nn.Parameter]]

    @property
    def name(self) -> str:
        """The block's name in logs and checkpoints: its tasks joined by ``+`` (``digit+speaker``)."""
        return "+".join(self.tasks)

    @property
    def size(self) -> int:
        """The number of scalar parameters, P_b (under FSDP: of this rank's shards)."""
        return sum(local_numel(p) for _, p in self.params)


def parameter_blocks(model: nn.Module, task_names: Sequence[str] | None = None) -> list[ParameterBlock]:
    """The shared trainable parameters of ``model`` grouped by the set of tasks that reach them.

    A parameter reached by two or more tasks (``model.task_parameter_names()``) belongs to the block of
    exactly that set of tasks; blocks are listed in the order of their first parameter. On the quickstart
    model: the speech encoder (digit, speaker) and the text encoder (coarse, fine); the vision encoder has
    one task and is no block. With a shared trunk: each encoder with its trunk projection, and the trunk
    blocks (every task).
    """
    reached = model.task_parameter_names()
    order = list(task_names) if task_names is not None else list(reached)
    owners: dict[str, list[str]] = {}
    for task in order:
        for name in reached.get(task, ()):
            owners.setdefault(name, []).append(task)
    blocks: dict[tuple[str, ...], ParameterBlock] = {}
    for name, param in model.named_parameters():
        tasks = tuple(owners.get(name, ()))
        if not param.requires_grad or len(tasks) < 2:
            continue
        blocks.setdefault(tasks, ParameterBlock(tasks=tasks, params=[])).params.append((name, param))
    return list(blocks.values())


@dataclass
class ParameterPartition:
    """Every trainable model parameter in exactly one role.

    Args:
        blocks (`list[ParameterBlock]`): the method problems (shared parameters under surgery).
        plain_shared (`list[tuple[str, nn.Parameter]]`): shared parameters outside surgery; they get the
            gradient of the summed objective.
        private (`dict[str, list[tuple[str, nn.Parameter]]]`): task -> the parameters that it alone reaches.
        reached (`dict[str, list[str]]`): task -> the names of every trainable parameter it reaches.
    """

    blocks: list[ParameterBlock]
    plain_shared: list[tuple[str, nn.Parameter]]
    private: dict[str, list[tuple[str, nn.Parameter]]]
    reached: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        task_names: Sequence[str],
        *,
        global_problem: bool = False,
        surgery_patterns: Sequence[str] | None = None,
    ) -> ParameterPartition:
        """Builds the partition.

        Args:
            model: a `MultiTaskModel` (or any module with ``task_parameter_names()``).
            task_names: the tasks, in the method's order.
            global_problem: one block over every shared parameter and every task that reaches one.
            surgery_patterns: regular expressions (``re.search`` on the parameter name); only the shared
                parameters that match one take part in surgery. Each pattern must match a shared parameter.
        """
        reached = {task: list(names) for task, names in model.task_parameter_names().items()}
        unknown = sorted(set(task_names) - set(reached))
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of the model; its tasks: {', '.join(reached)}")
        blocks = parameter_blocks(model, task_names)
        plain_shared: list[tuple[str, nn.Parameter]] = []
        if surgery_patterns:
            compiled = []
            for pattern in surgery_patterns:
                try:
                    compiled.append(re.compile(pattern))
                except re.error as error:
                    raise ValueError(
                        f"`mtl_surgery_parameters`: {pattern!r} is not a regular expression: {error}"
                    ) from error
            shared_names = [name for block in blocks for name, _ in block.params]
            for pattern, regex in zip(surgery_patterns, compiled):
                if not any(regex.search(name) for name in shared_names):
                    example = shared_names[0] if shared_names else "none"
                    raise ValueError(
                        f"`mtl_surgery_parameters`: {pattern!r} matches no shared parameter (shared parameters "
                        f"look like {example!r}; {len(shared_names)} in all)"
                    )
            kept = []
            for block in blocks:
                chosen = [(n, p) for n, p in block.params if any(r.search(n) for r in compiled)]
                plain_shared += [(n, p) for n, p in block.params if not any(r.search(n) for r in compiled)]
                if chosen:
                    kept.append(ParameterBlock(tasks=block.tasks, params=chosen))
            blocks = kept
        if global_problem and blocks:
            tasks = tuple(t for t in task_names if any(t in block.tasks for block in blocks))
            names = {name for block in blocks for name, _ in block.params}
            params = [(n, p) for n, p in model.named_parameters() if n in names]
            blocks = [ParameterBlock(tasks=tasks, params=params)]
        shared_names = {name for block in blocks for name, _ in block.params} | {n for n, _ in plain_shared}
        params = dict(model.named_parameters())
        private = {
            task: [(n, params[n]) for n in reached[task] if n not in shared_names and params[n].requires_grad]
            for task in task_names
        }
        return cls(blocks=blocks, plain_shared=plain_shared, private=private, reached=reached)

    @property
    def shared(self) -> list[tuple[str, nn.Parameter]]:
        """Every shared parameter under surgery (the columns of all blocks), block by block."""
        return [pair for block in self.blocks for pair in block.params]

    @property
    def shared_size(self) -> int:
        """The number of scalar parameters under surgery (the columns of all blocks)."""
        return sum(block.size for block in self.blocks)

    def row_size(self) -> int:
        """Σ_b K_b · P_b: the floats the rows of one set of task gradients take."""
        return sum(len(block.tasks) * block.size for block in self.blocks)

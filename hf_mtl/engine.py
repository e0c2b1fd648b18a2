"""The multi-task step (DESIGN.md, "One training step, as data", steps 2-5).

`MultiTaskEngine` turns one multi-task batch per micro-step into gradients:

1. **Per-task losses**: one forward of the model; every encoder runs once per sub-batch.
2. **Per-task gradients**: a parameter that one task alone reaches (its head) receives that task's
   gradient. For the parameters that several tasks share, each task's gradient is one row of the
   K x P Jacobian, held in a preallocated flat buffer (`GradientBuffer`). Loss-weighting methods
   skip the Jacobian: one backward of ``method.combine_losses(L)``. Representation methods (MGDA-UB,
   GradDrop) combine the gradients with respect to the shared features instead, once per micro-step.
3. **Across micro-steps and ranks**: rows accumulate over the gradient-accumulation window; at the
   sync step the whole buffer (rows, the other gradients, per-task loss sums) is averaged over the
   ranks by one collective (`GradientBuffer.all_reduce`, the only place where ranks talk), so the
   method acts on the global per-task gradients whatever the number of processes.
4. **Combination**: the method maps the rows of the tasks present in the window to one update,
   written into the shared parameters' ``.grad``. Then the ordinary Trainer clips and steps.

Mixed precision: under fp16 the losses are multiplied by the GradScaler's scale before each backward
(``scaler.scale``); the rows are divided by it (a power of two, so exactly) before the method sees
them and the update is multiplied back, so the scaler's single ``unscale_`` and its inf/NaN check
work as for a plain Trainer; a non-finite row makes the whole update NaN, and the scaler skips the
step. Under bf16 autocast nothing is scaled. The buffer is float32.

Sharpness-aware training (`hf_mtl.sharpness`) calls the same primitives at perturbed weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data.sampling import step_generator
from .methods.base import GradientMethod

if TYPE_CHECKING:
    from .sharpness import Sharpness

#: Salt that keeps the method's generator apart from the task sampler's (same seed and step).
_METHOD_SALT = 0x5EED_AA


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class ParameterBlock:
    """Shared parameters that the same set of tasks reaches: one encoder read by its modality's tasks, a
    trunk read by all. Each block is its own method problem (its tasks' rows over its parameters).

    Args:
        tasks (`tuple[str, ...]`): the tasks that reach every parameter of the block, in task order.
        params (`list[tuple[str, nn.Parameter]]`): the block's parameters, in ``named_parameters`` order.
    """

    tasks: tuple[str, ...]
    params: list[tuple[str, nn.Parameter]]

    @property
    def size(self) -> int:
        return sum(p.numel() for _, p in self.params)


def parameter_blocks(model: nn.Module, task_names: list[str] | None = None) -> list[ParameterBlock]:
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
    """Which trainable parameters are shared (Jacobian columns), task-private, or the method's own.

    Args:
        shared (`list[tuple[str, nn.Parameter]]`): parameters reached by two or more tasks, in
            ``named_parameters`` order; the columns of the Jacobian.
        private (`dict[str, list[tuple[str, nn.Parameter]]]`): task -> parameters only it reaches.
        method (`list[tuple[str, nn.Parameter]]`): the gradient method's learnable parameters.
    """

    shared: list[tuple[str, nn.Parameter]]
    private: dict[str, list[tuple[str, nn.Parameter]]]
    method: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: nn.Module, method: GradientMethod) -> ParameterPartition:
        reached = model.task_parameter_names()
        params = dict(model.named_parameters())
        owners: dict[str, list[str]] = {}
        for task, names in reached.items():
            for name in names:
                owners.setdefault(name, []).append(task)
        shared = [(n, p) for n, p in params.items() if p.requires_grad and len(owners.get(n, ())) > 1]
        private = {
            task: [(n, params[n]) for n in names if len(owners[n]) == 1 and params[n].requires_grad]
            for task, names in reached.items()
        }
        method_params = [(f"method.{n}", p) for n, p in method.named_parameters() if p.requires_grad]
        return cls(shared=shared, private=private, method=method_params)

    @property
    def shared_size(self) -> int:
        return sum(p.numel() for _, p in self.shared)


class GradientBuffer:
    """One preallocated float32 tensor holding everything that crosses ranks at the sync step.

    Layout: ``rows`` (R x P_shared, the Jacobian rows; R = K, or 2K for F-MTL's loss and flat
    rows), ``plain`` (the gradients of every other trainable parameter, method parameters
    included), ``loss_sums`` (K) and ``loss_counts`` (K, micro-steps in which each task was present).
    """

    def __init__(
        self,
        num_rows: int,
        row_params: list[nn.Parameter],
        plain_params: list[nn.Parameter],
        num_tasks: int,
        device: torch.device,
    ) -> None:
        self.row_size = sum(p.numel() for p in row_params)
        self.plain_size = sum(p.numel() for p in plain_params)
        self.num_rows = num_rows
        total = num_rows * self.row_size + self.plain_size + 2 * num_tasks
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        end_rows = num_rows * self.row_size
        self.rows = self.flat[:end_rows].view(num_rows, self.row_size)
        self.plain = self.flat[end_rows : end_rows + self.plain_size]
        self.loss_sums = self.flat[end_rows + self.plain_size : end_rows + self.plain_size + num_tasks]
        self.loss_counts = self.flat[end_rows + self.plain_size + num_tasks :]
        #: per row, one view per row parameter shaped like it; and the same for `plain`.
        self.row_views = [_views(self.rows[r], row_params) for r in range(num_rows)]
        self.plain_views = _views(self.plain, plain_params)

    def zero_(self) -> None:
        self.flat.zero_()

    def all_reduce(self) -> None:
        """Averages the buffer over the ranks: the one collective of a training step."""
        if _is_distributed():
            dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
            self.flat.div_(dist.get_world_size())


def _views(flat: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views


def _add_grads(
    targets: list[Tensor], grads: Iterable[Tensor | None], scale: float, touched: set[int], keys: list[int]
) -> None:
    """``targets[i] += scale * grads[i]`` for the grads that exist; records which were touched."""
    pairs = [(t, g, k) for t, g, k in zip(targets, grads, keys) if g is not None]
    if not pairs:
        return
    torch._foreach_add_([t for t, _, _ in pairs], [g.to(torch.float32) for _, g, _ in pairs], alpha=scale)
    touched.update(k for _, _, k in pairs)


class MultiTaskEngine:
    """Computes, accumulates, reduces and combines per-task gradients for `MultiTaskTrainer`.

    Args:
        model (`MultiTaskModel`): the unwrapped model (``task_parameter_names()``, multi-task forward).
        method (`GradientMethod`): the gradient method, built with ``num_tasks = K``.
        task_names (`list[str]`): the tasks, in the order of the method's task indices.
        seed (`int`): the run's seed; the method's random draws come from ``(seed, step)``.
        sharpness (`Sharpness`, *optional*): a SAM variant (`hf_mtl.sharpness`).
    """

    def __init__(
        self,
        model: nn.Module,
        method: GradientMethod,
        task_names: list[str],
        seed: int,
        sharpness: Sharpness | None = None,
    ) -> None:
        self.method = method
        self.task_names = list(task_names)
        self.task_ids = {name: i for i, name in enumerate(self.task_names)}
        self.seed = seed
        self.sharpness = sharpness
        self.partition = ParameterPartition.from_model(model, method)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._names.update({id(p): n for n, p in self.partition.method})
        self.uses_jacobian = method.requires_jacobian and not method.requires_representation
        if sharpness is not None and sharpness.per_task:
            # F-MTL needs per-task parameter gradients whatever the method; representation methods
            # then act on the parameter Jacobian (as GradDrop does in the CAGrad code, MGDA-UB = MGDA).
            self.uses_jacobian = True
        shared = [p for _, p in self.partition.shared] if self.uses_jacobian else []
        self.row_params: list[nn.Parameter] = shared
        # every other trainable parameter (heads, private encoders, the method's): plain gradients, no rows
        shared_ids = {id(p) for p in shared}
        self.plain_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        self.plain_params += [p for _, p in self.partition.method]
        self._plain_index = {id(p): i for i, p in enumerate(self.plain_params)}
        # Jacobian rows only for the tasks that reach a shared parameter: a task whose encoder no other task reads
        # (its row would be zero) keeps its own gradient and stays out of the method, which would otherwise
        # count a zero row (MGDA's minimum norm would be that zero row)
        shared_names = {name for name, _ in self.partition.shared}
        reached = model.task_parameter_names()
        self.row_tasks = (
            [t for t in self.task_names if shared_names.intersection(reached[t])] if self.uses_jacobian else []
        )
        self.row_index = {task: i for i, task in enumerate(self.row_tasks)}
        num_rows = len(self.row_tasks) * (sharpness.rows_per_task if sharpness is not None else 1)
        device = next(model.parameters()).device
        self.buffer = GradientBuffer(num_rows, self.row_params, self.plain_params, len(self.task_names), device)
        self.update = torch.zeros(self.buffer.row_size, dtype=torch.float32, device=device)
        self.update_views = _views(self.update, self.row_params)
        if self.uses_jacobian:
            method.bind_parameter_layout([(n, p.numel()) for n, p in self.partition.shared])
        if sharpness is not None and sharpness.per_task:
            self.flat_method: GradientMethod | None = sharpness.make_flat_method(method)
        else:
            self.flat_method = None
        heads = getattr(model, "heads", None)
        self.head_params: dict[str, list[nn.Parameter]] = {
            task: list(heads[task].parameters()) if heads is not None and task in heads else []
            for task in self.task_names
        }
        head_ids = {id(p) for params in self.head_params.values() for p in params}
        #: parameters upstream of the shared features (encoders, trunk): what representation methods reach.
        self.upstream_params = [p for p in self.model_params if id(p) not in head_ids]
        self._touched_plain: set[int] = set()
        self._window_open = False
        self._window_batches: list[Any] = []
        self.grad_scale = 1.0
        #: running sums between two `pop_logs` calls: task -> [loss sum, loss count, weight sum, weight count]
        self._log_sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0, 0.0] for name in self.task_names}

    @property
    def methods(self) -> list[GradientMethod]:
        """The method, and F-MTL's copy of it for the flat rows when that is a separate object."""
        if self.flat_method is None or self.flat_method is self.method:
            return [self.method]
        return [self.method, self.flat_method]

    # ------------------------------------------------------------------ primitives
    def forward_losses(self, model: nn.Module, batch: Mapping[str, Any], **kwargs: Any) -> dict[str, Tensor]:
        """One forward of the multi-task batch; task -> loss, for the tasks with labels."""
        outputs = model(batch, **kwargs)
        losses = outputs["losses"] if isinstance(outputs, Mapping) else outputs.losses
        unknown = [t for t in losses if t not in self.task_ids]
        if unknown:
            raise ValueError(f"the model returned losses for unknown task(s) {unknown}; tasks: {self.task_names}")
        return dict(losses)

    def stacked(self, losses: Mapping[str, Tensor]) -> tuple[list[str], Tensor, Tensor]:
        """The present tasks in method order, their stacked (transformed) losses, and their ids."""
        names = [t for t in self.task_names if t in losses]
        raw = torch.stack([losses[t].float() for t in names])
        ids = torch.tensor([self.task_ids[t] for t in names], device=raw.device)
        transformed = self.method.transform_losses(raw, task_ids=ids if len(names) < len(self.task_names) else None)
        return names, transformed, ids

    def task_inputs(self, task: str) -> list[nn.Parameter]:
        """What one task's backward differentiates: the Jacobian columns (if it has a row), its own parameters,
        the method's."""
        columns = self.row_params if task in self.row_index else []
        return columns + [p for _, p in self.partition.private[task]] + [p for _, p in self.partition.method]

    def row(self, task: str, flat: bool = False) -> int:
        """The buffer row of ``task``'s gradient (F-MTL: ``flat=True`` for its flat-gradient row)."""
        return self.row_index[task] + (len(self.row_tasks) if flat else 0)

    def objective_gradients(
        self, losses: Mapping[str, Tensor], generator: torch.Generator | None
    ) -> list[Tensor | None]:
        """Gradient of the scalar training objective w.r.t. every model parameter (``model_params`` order).

        The objective is ``method.combine_losses`` for loss-weighting methods and the sum of the
        (transformed) task losses otherwise; SAM and ASAM ascend along it.
        """
        names, transformed, ids = self.stacked(losses)
        if self.method.requires_jacobian:
            objective = transformed.sum()
        else:
            objective = self.method.combine_losses(
                transformed, task_ids=ids if len(names) < len(self.task_names) else None, generator=generator
            )
        params = self.model_params
        return list(torch.autograd.grad(objective * self.grad_scale, params, allow_unused=True, retain_graph=False))

    def named(self, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs for ``params`` (names as in ``model.named_parameters()``)."""
        return [(self._names[id(p)], p) for p in params]

    @property
    def model_params(self) -> list[nn.Parameter]:
        """Every trainable model parameter (the Jacobian columns first, then the others, method's excluded)."""
        method_ids = {id(p) for _, p in self.partition.method}
        return self.row_params + [p for p in self.plain_params if id(p) not in method_ids]

    def accumulate(self, losses: Mapping[str, Tensor], scale: float, generator: torch.Generator | None) -> None:
        """Backpropagates ``losses`` (one micro-step, at the current weights) into the buffer, times ``scale``."""
        if self.uses_jacobian:
            self._accumulate_rows(losses, scale)
        elif self.method.requires_representation:
            raise RuntimeError("representation methods accumulate through `accumulate_representation`")
        else:
            self._accumulate_combined(losses, scale, generator)

    def _accumulate_rows(self, losses: Mapping[str, Tensor], scale: float) -> None:
        names, transformed, _ = self.stacked(losses)
        for position, task in enumerate(names):
            inputs = self.task_inputs(task)
            grads = torch.autograd.grad(
                transformed[position] * self.grad_scale,
                inputs,
                retain_graph=position < len(names) - 1,
                allow_unused=True,
            )
            num_shared = len(self.row_params) if task in self.row_index else 0
            if num_shared:
                self.add_row(self.row_index[task], grads[:num_shared], scale)
            self.add_plain(inputs[num_shared:], grads[num_shared:], scale)

    def add_row(self, row: int, grads: list[Tensor | None] | tuple, scale: float) -> None:
        """Adds ``scale *`` gradients of the Jacobian columns (in `row_params` order) to buffer row ``row``."""
        if self.row_params:
            _add_grads(self.buffer.row_views[row], grads, scale, set(), list(range(len(self.row_params))))

    def add_plain(self, params: list[nn.Parameter], grads: list[Tensor | None] | tuple, scale: float) -> None:
        """Adds ``scale *`` gradients of parameters outside the Jacobian (heads, private encoders, the method's)."""
        keys = [self._plain_index[id(p)] for p in params]
        _add_grads([self.buffer.plain_views[k] for k in keys], grads, scale, self._touched_plain, keys)

    def _accumulate_combined(
        self, losses: Mapping[str, Tensor], scale: float, generator: torch.Generator | None
    ) -> None:
        names, transformed, ids = self.stacked(losses)
        combined = self.method.combine_losses(
            transformed, task_ids=ids if len(names) < len(self.task_names) else None, generator=generator
        )
        self._record_weights(names)
        grads = torch.autograd.grad(combined * self.grad_scale, self.plain_params, allow_unused=True)
        self.add_plain(self.plain_params, grads, scale)

    def accumulate_representation(
        self, model: nn.Module, batch: Mapping[str, Any], scale: float, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """One micro-step of a representation method (MGDA-UB, GradDrop): per-task gradients with respect to
        the shared features ``z``, combined by the method, backpropagated once through the encoders."""
        outputs = model(batch, return_representations=True)
        losses = dict(outputs.losses)
        names, transformed, ids = self.stacked(losses)
        features = [outputs.representations[key] for key in outputs.representations]
        rows = []
        for position, task in enumerate(names):
            private = [p for p in self.head_params[task] if p.requires_grad] + [p for _, p in self.partition.method]
            grads = torch.autograd.grad(
                transformed[position] * self.grad_scale, features + private, retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(z)).reshape(-1).float()
                        for g, z in zip(grads[: len(features)], features)
                    ]
                )
            )
            self.add_plain(private, grads[len(features) :], scale)
        jacobian = torch.stack(rows) / self.grad_scale
        representation = torch.cat([z.detach().reshape(-1).float() for z in features])
        combined = self.method.aggregate(
            jacobian,
            losses=transformed.detach(),
            task_ids=ids if len(names) < len(self.task_names) else None,
            generator=generator,
            representation=representation,
        )
        self._record_weights(names)
        upstream = [p for p in self.upstream_params if p.requires_grad]
        grad_outputs, offset = [], 0
        for z in features:
            grad_outputs.append((combined[offset : offset + z.numel()].view_as(z) * self.grad_scale).to(z.dtype))
            offset += z.numel()
        grads = torch.autograd.grad(features, upstream, grad_outputs=grad_outputs, allow_unused=True)
        self.add_plain(upstream, grads, scale)
        return losses

    # ------------------------------------------------------------------ the step
    def micro_step(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        *,
        scale: float,
        step: int,
        micro_index: int,
        grad_scale: float = 1.0,
    ) -> Tensor:
        """Forward and backward of one micro-batch into the buffer. Returns the mean task loss (detached)."""
        if not self._window_open:
            self.buffer.zero_()
            self._touched_plain.clear()
            self._window_batches.clear()
            self._window_open = True
        self.grad_scale = float(grad_scale)
        generator = step_generator(self.seed, _METHOD_SALT, step, micro_index)
        if self.method.needs_losses_after_step:
            self._window_batches.append(batch)
        if self.sharpness is not None:
            losses = self.sharpness.accumulate(self, model, batch, scale, generator)
        elif self.method.requires_representation:
            losses = self.accumulate_representation(model, batch, scale, generator)
        else:
            losses = self.forward_losses(model, batch)
            self.accumulate(losses, scale, generator)
        if not losses:
            raise ValueError("a training batch gave no task losses: every sub-batch must carry `labels`")
        for task, loss in losses.items():
            index = self.task_ids[task]
            self.buffer.loss_sums[index] += loss.detach().float()
            self.buffer.loss_counts[index] += 1.0
        return torch.stack([loss.detach().float() for loss in losses.values()]).mean()

    def finalize(self, step: int) -> None:
        """At the sync step: average the buffer over ranks, combine the rows, write every ``.grad``."""
        buffer = self.buffer
        buffer.all_reduce()
        present = (buffer.loss_counts > 0).nonzero().flatten()
        ids = present if present.numel() < len(self.task_names) else None
        mean_losses = buffer.loss_sums[present] / buffer.loss_counts[present]
        for method in self.methods:
            method.observe_losses(mean_losses, task_ids=ids)
        for position, index in enumerate(present.tolist()):
            self._log_sums[self.task_names[index]][0] += float(mean_losses[position])
            self._log_sums[self.task_names[index]][1] += 1.0
        self._assign_plain_grads()
        counts = buffer.loss_counts.tolist()
        row_present = [t for t in self.row_tasks if counts[self.task_ids[t]] > 0]
        if row_present:
            method_grads = [None if p.grad is None else p.grad.clone() for _, p in self.partition.method]
            generator = step_generator(self.seed, _METHOD_SALT, step, -1)
            positions = [self.row_index[t] for t in row_present]
            row_ids = torch.tensor([self.task_ids[t] for t in row_present], device=present.device)
            row_losses = torch.stack([mean_losses[(present == i).nonzero()[0, 0]] for i in row_ids.tolist()])
            self._combine_rows(
                positions, row_ids if len(row_present) < len(self.task_names) else None, row_losses, generator
            )
            self._record_weights(row_present)
            _rescale_method_grads(self.partition.method, method_grads, self.grad_scale)
            for p, view in zip(self.row_params, self.update_views):
                p.grad = view if p.dtype == torch.float32 else view.to(p.dtype)
        else:
            for p in self.row_params:
                p.grad = None
        self._window_open = False

    def _combine_rows(
        self, positions: list[int], ids: Tensor | None, losses: Tensor, generator: torch.Generator
    ) -> None:
        """Combines the rows at ``positions`` (the tasks with a row present in the window; global ``ids``)."""
        num_rows = len(self.row_tasks)
        rows = self.buffer.rows
        if self.grad_scale != 1.0:
            rows.div_(self.grad_scale)
        if not torch.isfinite(rows.sum()):  # an inf or NaN anywhere makes the sum non-finite; no K x P temporary
            self.update.fill_(float("nan"))  # the GradScaler sees it and skips the step
            return
        every = positions == list(range(num_rows))
        index = torch.tensor(positions, device=rows.device)
        loss_rows = rows[:num_rows] if every else rows[index]
        state = generator.get_state()  # F-MTL: the flat rows get the same random draws (RLW's weights)
        update = self.method.aggregate(loss_rows, losses=losses, task_ids=ids, generator=generator)
        if self.flat_method is not None:
            flat_rows = rows[num_rows:] if every else rows[num_rows + index]
            # a method with parameters combines the flat rows too (F-MTL's "same aggregator"), but only the loss
            # rows train its parameters (GradNorm would otherwise get a second gradient from the flat rows)
            saved = [None if p.grad is None else p.grad.clone() for _, p in self.partition.method]
            generator.set_state(state)
            update = update + self.flat_method.aggregate(flat_rows, losses=losses, task_ids=ids, generator=generator)
            for (_, p), grad in zip(self.partition.method, saved):
                p.grad = grad
        torch.mul(update.float(), self.grad_scale, out=self.update)

    def _assign_plain_grads(self) -> None:
        for index, (p, view) in enumerate(zip(self.plain_params, self.buffer.plain_views)):
            if index in self._touched_plain:
                p.grad = view if p.dtype == torch.float32 else view.to(p.dtype)
            else:
                p.grad = None

    def _record_weights(self, names: list[str]) -> None:
        weights = self.method.last_weights
        if weights is None or weights.numel() != len(names):
            return
        for name, value in zip(names, weights.detach().float().tolist()):
            self._log_sums[name][2] += value
            self._log_sums[name][3] += 1.0

    def after_optimizer_step(self, model: nn.Module) -> None:
        """FAMO-style methods: recompute the window's losses after the optimizer step and let the method learn."""
        if not self.method.needs_losses_after_step or not self._window_batches:
            return
        num_tasks = len(self.task_names)
        stats = torch.zeros(2 * num_tasks, device=self.buffer.flat.device)
        with torch.no_grad():
            for batch in self._window_batches:
                for task, loss in self.forward_losses(model, batch).items():
                    stats[self.task_ids[task]] += loss.float()
                    stats[num_tasks + self.task_ids[task]] += 1.0
        if _is_distributed():
            dist.all_reduce(stats)
        counts = self.buffer.loss_counts
        present = (counts > 0).nonzero().flatten()
        before = self.buffer.loss_sums[present] / counts[present]
        after = stats[present] / stats[num_tasks + present].clamp_min(1.0)
        ids = present if present.numel() < num_tasks else None
        for method in self.methods:
            method.after_optimizer_step(before, after, task_ids=ids)
        self._window_batches.clear()

    # ------------------------------------------------------------------ logging
    def pop_logs(self) -> dict[str, float]:
        """``loss/<task>`` and ``weight/<task>`` averaged over the steps since the last call."""
        logs: dict[str, float] = {}
        for name, (loss_sum, loss_count, weight_sum, weight_count) in self._log_sums.items():
            if loss_count:
                logs[f"loss/{name}"] = round(loss_sum / loss_count, 6)
            if weight_count:
                logs[f"weight/{name}"] = round(weight_sum / weight_count, 6)
            self._log_sums[name] = [0.0, 0.0, 0.0, 0.0]
        return logs


def _rescale_method_grads(
    method_params: list[tuple[str, nn.Parameter]], before: list[Tensor | None], grad_scale: float
) -> None:
    """Gradients a method sets inside `aggregate` (GradNorm) are unscaled; bring them to the loss scale."""
    if grad_scale == 1.0:
        return
    for (_, p), old in zip(method_params, before):
        if p.grad is None:
            continue
        base = torch.zeros_like(p.grad) if old is None else old
        p.grad.copy_(base + (p.grad - base) * grad_scale)

"""The Gramian path (``mtl_jacobian_mode="gramian"``): each block's exact K x K Gramian ``G = J Jᵀ`` on a shared
input, without ever holding the K x P rows; then one weighted backward.

Gramian methods (PCGrad, MGDA, CAGrad, IMTL, Nash-MTL, UPGrad, ...) need only ``G`` to weight the tasks
(``d = wᵀ J``, Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, §6 and
Algorithm 3, whose reference implementation is TorchJD's autogram engine). Since ``G = Σ_m J_m J_mᵀ`` over the
modules m that hold the block's parameters, it can be accumulated module by module:

1. every module with its own trainable parameters in a block gets a forward hook that passes its output
   through `_Tap`, an identity whose backward sees the cotangent of that output;
2. one backward, vectorised over the K one-hot cotangents of the tasks' losses (``torch.vmap`` of
   ``autograd.grad``), carries the K task cotangents together through the graph; at each module `_Tap`
   computes the module's K x P_m Jacobian from its cotangents (one vectorised vector-Jacobian product of the
   module's output with respect to its parameters), adds ``J_m J_mᵀ`` to its block's Gramian, and drops
   ``J_m`` (a module called several times sums its Jacobians first, the cross terms included);
3. the method's weights come from each block's Gramian, and one backward of ``Σ_i w_i L_i`` with respect to
   the block's parameters gives the update; the heads get their own task's gradient.

Memory: at most one module's K x P_m Jacobian and the K-batched activation cotangents of one layer, instead of
K x P rows. Compute: the vectorised backward costs about K backwards, plus one for the update.

Scope: a block's tasks must read one sub-batch (a shared input: digit and speaker of the same clips), since
the Gramian of losses of separate forwards needs the rows (`check_groups` refuses otherwise; per-task batches
already cost one backward for exact rows). The weights are computed from each micro-batch's Gramian on each
rank; with gradient accumulation or several ranks the update is the sum of the per-micro-batch updates (the
method's weights are not those of the whole step's Jacobian, whose Gramian has cross terms between
micro-batches and ranks that only the rows give): use ``mtl_jacobian_mode="rows"`` where that matters.
A parameter used outside its module's forward would be missed: the first step checks ``‖Σ w_i g_i‖² = wᵀ G w``
against the actual update and refuses the run if they differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..data.sampling import step_generator

if TYPE_CHECKING:
    from .engine import MultiTaskEngine, Problem


class _Recorder:
    """The state the taps share during one Gramian backward."""

    def __init__(self) -> None:
        self.active = False
        self.recording = False
        self.anchor = torch.zeros((), requires_grad=True)
        #: problem index -> the Gramian over the current group's tasks
        self.gramians: dict[int, Tensor] = {}
        #: module -> [remaining calls, summed Jacobian]
        self.pending: dict[nn.Module, list[Any]] = {}
        self.module_problem: dict[nn.Module, int] = {}
        self.calls: dict[nn.Module, int] = {}


class _Tap(torch.autograd.Function):
    """Identity on a module's outputs; in the Gramian backward, adds the module's ``J_m J_mᵀ`` to its block."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        recorder: _Recorder, module: nn.Module, ids: Tensor | None, anchor: Tensor, *outputs: Tensor
    ) -> tuple[Tensor, ...]:
        return tuple(t.detach() for t in outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.recorder, ctx.module, ctx.ids, _ = inputs[:4]
        ctx.outputs = inputs[4:]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        recorder: _Recorder = ctx.recorder
        if recorder.active:
            module = ctx.module
            if ctx.ids is not None:
                jacobian = _embedding_jacobian(module, ctx.ids, torch.func.debug_unwrap(grads[0], recurse=True))
            else:
                params = [p for p in module.parameters() if p.requires_grad]
                parts = torch.autograd.grad(
                    ctx.outputs, params, grads, retain_graph=True, allow_unused=True, materialize_grads=True
                )
                jacobian = torch.func.debug_unwrap(torch.cat([g.reshape(-1) for g in parts]), recurse=True).float()
            entry = recorder.pending.setdefault(module, [recorder.calls.get(module, 1), None])
            entry[1] = jacobian if entry[1] is None else entry[1] + jacobian
            entry[0] -= 1
            if entry[0] == 0:
                summed = recorder.pending.pop(module)[1]
                gramian = summed @ summed.T
                index = recorder.module_problem[module]
                recorder.gramians[index] = (
                    gramian if index not in recorder.gramians else recorder.gramians[index] + gramian
                )
        return (None, None, None, torch.zeros(()), *grads)


def _embedding_jacobian(module: nn.Embedding, ids: Tensor, cotangents: Tensor) -> Tensor:
    """An embedding's K Jacobian rows restricted to the rows of the ids used (the others are zero, and so is their
    share of the Gramian): row u of task k is the sum of task k's cotangents at the positions holding id u."""
    flat_ids = ids.reshape(-1)
    unique, inverse = torch.unique(flat_ids, return_inverse=True)
    k = cotangents.shape[0]
    per_position = cotangents.reshape(k, flat_ids.numel(), -1).float()
    summed = torch.zeros(k, unique.numel(), per_position.shape[-1], device=per_position.device)
    summed.index_add_(1, inverse, per_position)
    if module.padding_idx is not None:
        summed[:, unique == module.padding_idx] = 0.0  # the padding row gets no gradient
    return summed.reshape(k, -1)


def _is_plain_embedding(module: nn.Module) -> bool:
    """An `nn.Embedding` whose only trainable parameter is its weight, looked up without renormalisation."""
    return (
        type(module) is nn.Embedding
        and module.max_norm is None
        and not module.sparse
        and [n for n, p in module.named_parameters() if p.requires_grad] == ["weight"]
    )


class GramianPath:
    """Hooks the modules of every problem's block and computes their Gramians (see the module docstring).

    Args:
        model (`nn.Module`): the model.
        problems (`list[Problem]`): the engine's problems (blocks of shared parameters).
    """

    def __init__(self, model: nn.Module, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        self.recorder = _Recorder()
        owner = {id(p): index for index, problem in enumerate(problems) for _, p in problem.block.params}
        self.modules: list[nn.Module] = []
        names = {id(m): n for n, m in model.named_modules()}

        def visit(module: nn.Module) -> None:
            direct = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) in owner]
            if direct:
                indices = {owner[id(p)] for p in module.parameters() if p.requires_grad and id(p) in owner}
                if len(indices) != 1:
                    raise ValueError(
                        f"`mtl_jacobian_mode`='gramian': module {names[id(module)]!r} holds parameters of several "
                        "blocks; use 'rows'"
                    )
                self.recorder.module_problem[module] = indices.pop()
                self.modules.append(module)
                return
            for child in module.children():
                visit(child)

        visit(model)
        covered = {id(p) for m in self.modules for p in m.parameters()}
        missing = [n for problem in problems for n, p in problem.block.params if id(p) not in covered]
        if missing:
            raise ValueError(f"`mtl_jacobian_mode`='gramian': parameters {missing[:3]} belong to no module; use 'rows'")
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        self.checked = False

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        recorder = self.recorder
        if not recorder.recording:
            return output
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return output
            recorder.calls[module] = recorder.calls.get(module, 0) + 1
            ids = inputs[0] if _is_plain_embedding(module) and inputs and isinstance(inputs[0], Tensor) else None
            return _Tap.apply(recorder, module, ids, recorder.anchor, output)[0]
        if isinstance(output, tuple):
            indices = [i for i, t in enumerate(output) if isinstance(t, Tensor) and t.requires_grad]
            if not indices:
                return output
            recorder.calls[module] = recorder.calls.get(module, 0) + 1
            tapped = _Tap.apply(recorder, module, None, recorder.anchor, *[output[i] for i in indices])
            out = list(output)
            for i, t in zip(indices, tapped):
                out[i] = t
            return type(output)(out) if type(output) is tuple else tuple(out)
        return output

    def check_groups(self, groups: Sequence[Any]) -> None:
        """Refuses a block whose tasks read several sub-batches: their Gramian needs the rows."""
        group_of = {task.name: group.key for group in groups for task in group.tasks}
        for problem in self.problems:
            keys = sorted({group_of[t] for t in problem.tasks if t in group_of})
            if len(keys) > 1:
                raise ValueError(
                    f"`mtl_jacobian_mode`='gramian' needs each block's tasks to share one sub-batch (a shared input); "
                    f"block {problem.name!r} reads the sub-batches {keys}. Use 'rows' (on per-task batches its K "
                    "backwards cost one) or 'features'"
                )

    def forward(self, engine: MultiTaskEngine, model: nn.Module, batch: Mapping[str, Any], micro_index: int) -> Any:
        """The micro-batch's forward with the taps in place."""
        self.recorder.recording = True
        self.recorder.calls = {}
        try:
            return engine.forward_losses(model, batch, micro_index)
        finally:
            self.recorder.recording = False

    def backward(self, engine: MultiTaskEngine, batch: Mapping[str, Any], losses: Mapping[str, Tensor]) -> None:
        """Per sub-batch: the Gramians of its tasks, each problem's weights, then the weighted backwards."""
        groups: dict[str, list[str]] = {}
        for key, sub_batch in batch.items():
            names = [t for t in engine.task_names if t in (sub_batch.get("labels") or {}) and t in losses]
            if names:
                groups[key] = names
        keys = list(groups)
        self._check_gramians: dict[int, Tensor] = {}
        for position, key in enumerate(keys):
            names = groups[key]
            last_group = position == len(keys) - 1
            in_problem = [t for t in names if any(t in p.tasks for p in self.problems)]
            weights: dict[int, dict[str, Tensor]] = {}
            if len(in_problem) >= 1:
                gramians = self._gramians(engine, [losses[t] for t in in_problem])
                for index, problem in enumerate(self.problems):
                    tasks = [t for t in in_problem if t in problem.tasks]
                    if not tasks or index not in gramians:
                        continue
                    select = [in_problem.index(t) for t in tasks]
                    gramian = gramians[index][select][:, select] / (engine.grad_scale**2)
                    ids = engine.task_subset([engine.task_ids[t] for t in tasks])
                    generator = step_generator(engine.seed, 0x5EED_AA, engine.step, engine._micro, index)
                    stacked = torch.stack([losses[t].detach() for t in tasks])
                    w = problem.method.weights_from_gramian(gramian, losses=stacked, task_ids=ids, generator=generator)
                    w = w.to(device=gramian.device, dtype=torch.float32)
                    problem.method.last_weights = w.detach()
                    self._check_gramians[index] = gramian
                    engine._record_problem_weights(problem, tasks, w)
                    weights[index] = dict(zip(tasks, w, strict=True))
            self._weighted_backwards(engine, names, losses, weights, free=last_group)
        if engine._micro == 0:
            self.checked = True  # every block was checked once, on the first micro-step

    def _gramians(self, engine: MultiTaskEngine, task_losses: list[Tensor]) -> dict[int, Tensor]:
        """One vectorised backward over the tasks' one-hot cotangents; returns problem index -> K_g x K_g Gramian."""
        recorder = self.recorder
        recorder.gramians = {}
        recorder.pending = {}
        stacked = torch.stack(task_losses) * engine.grad_scale
        basis = torch.eye(len(task_losses), device=stacked.device, dtype=stacked.dtype)
        recorder.active = True
        try:
            torch.vmap(
                lambda cotangent: torch.autograd.grad(
                    stacked, recorder.anchor, grad_outputs=cotangent, retain_graph=True, allow_unused=True
                )
            )(basis)
        finally:
            recorder.active = False
        if recorder.pending:
            raise RuntimeError(
                "`mtl_jacobian_mode`='gramian': a hooked module was called more often in the backward than in the "
                "forward; use 'rows'"
            )
        return dict(recorder.gramians)

    def _weighted_backwards(
        self,
        engine: MultiTaskEngine,
        names: Sequence[str],
        losses: Mapping[str, Tensor],
        weights: Mapping[int, Mapping[str, Tensor]],
        *,
        free: bool,
    ) -> None:
        """Each problem's parameters get ``Σ_i w_i ∇ℓ_i``; every other parameter a task reaches (heads, private
        encoders) gets ``∇ Σ_i ℓ_i``."""
        first_check = not self.checked and engine._micro == 0
        calls = []
        block_indices: set[int] = set()
        for index, problem_weights in weights.items():
            problem = self.problems[index]
            params = [p for _, p in problem.block.params]
            indices = [engine._plain_index[id(p)] for p in params]
            block_indices.update(indices)
            objective = sum(problem_weights[t] * losses[t] for t in problem_weights)
            calls.append((objective, engine.plain_pairs(indices), index, problem_weights))
        others = sorted({i for t in names for i in engine.task_plain_indices[t]} - block_indices)
        if others:
            calls.append((sum(losses[t] for t in names), engine.plain_pairs(others), None, None))
        for position, (objective, pairs, index, problem_weights) in enumerate(calls):
            retain = not (free and position == len(calls) - 1)
            engine.backward_into(objective * engine.grad_scale, pairs, retain_graph=retain)
            if first_check and index is not None:
                self._check(engine, index, pairs, problem_weights, losses)

    def _check(
        self,
        engine: MultiTaskEngine,
        index: int,
        pairs: Sequence[tuple[nn.Parameter, Tensor]],
        problem_weights: Mapping[str, Tensor],
        losses: Mapping[str, Tensor],
    ) -> None:
        """First step: ``‖d‖² = wᵀ G w`` for the update d just written (catches a parameter used outside its
        module's forward, which the taps would miss)."""
        tasks = list(problem_weights)
        gramian = self._check_gramians[index]
        w = torch.stack([problem_weights[t] for t in tasks]).float()
        expected = float(w @ gramian @ w)
        actual = float(sum((view.float() ** 2).sum() for _, view in pairs)) / engine.grad_scale**2
        if abs(actual - expected) > 1e-3 * max(abs(expected), 1e-12) + 1e-10:
            raise ValueError(
                f"`mtl_jacobian_mode`='gramian': on block {self.problems[index].name!r} the Gramian gives "
                f"‖Σ w_i g_i‖² = {expected:.6g} but the update has {actual:.6g}: a parameter of the block is used "
                "outside the forward of the module that holds it. Use `mtl_jacobian_mode`='rows'"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

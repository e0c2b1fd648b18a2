"""`MultiTaskEngine`: the multi-task step, from a window of micro-batches to every parameter's ``.grad``.

One optimizer step is a *window*: the micro-batches of one gradient-accumulation cycle on every rank.

1. **Counting** (`begin_window`). Each task's labelled items (heads' ``count_items``) are counted in every
   micro-batch and summed over the ranks (one collective of K numbers). Every task loss is then
   normalised by its own global count, ``ℓ_i = mean_i · n_i / N_i``, so that summing over micro-batches
   and ranks gives exactly the mean over the task's labelled items of the whole step (the Trainer's
   ``num_items_in_batch``). A task with no labelled item in the window is absent from the step; a
   sub-batch with no label for a task does not make it present.
2. **Per-task gradients** (``mode = "rows"``). Shared parameters are grouped into blocks (`parameter_blocks`):
   each block is its own method problem. Each task's loss is differentiated on its own, never stacked
   with the others, so its backward runs through its own sub-graph only: on per-task batches the K
   backwards cost one backward over all sub-batches, and on a shared input they cost K. The gradients
   accumulate directly into the task's rows of its blocks (its parameters' ``.grad`` point into the
   buffer), the task-private parameters' into their plain segment.
   Loss-weighting methods (``mode = "combined"``) run one backward of ``Σ_i w_i ℓ_i`` with the weights of
   the step; representation methods and the feature-level mode (``mode = "representation"``) combine the
   per-task gradients with respect to the shared features and run one backward; the Gramian path
   (``mode = "gramian"``, `hf_mtl.engine.gramian`) computes each block's K x K Gramian without the rows.
3. **Across micro-steps and ranks.** Rows and gradients accumulate over the window; at the sync step the
   buffer is summed over the ranks by one collective (a sharpness variant adds one before its perturbed
   passes). The method sees the global per-task gradients whatever the number of processes.
4. **Combination** (`finalize`). Elementwise loss transforms (IMTL-L's ``e^s L - s``, DB-MTL's ``log L``)
   are applied at the step's global mean losses by the chain rule (row i times ``T_i'(L̄_i)``), each
   block's method maps its present rows to an update, written into the block's ``.grad``; the method's
   own parameters get the gradient of the transformed (or combined) mean losses and of the method's
   auxiliary loss (GradNorm). A non-finite gradient without a GradScaler skips the step (no ``.grad``),
   is logged and counted; under fp16 the update is NaN so that the GradScaler skips it as it decides.

FSDP2 (``fully_shard``; Accelerate's FSDP plugin): when the model's trainable parameters are `DTensor` parameters
the engine holds this rank's shard of every row, sums the per-shard Gramians, and writes each rank's shard of the
update (`hf_mtl.engine.fsdp`, which says what runs sharded and what is refused).

Mixed precision: under fp16 the losses are multiplied by the GradScaler's scale before each backward;
the rows are divided by it (a power of two: exact) before the method and the update is multiplied back,
so the scaler's single ``unscale_`` and its inf/NaN check work as for a plain Trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.utils import logging

from ..data.sampling import step_generator
from ..methods.base import GradientMethod, GramianMethod, LossWeightingMethod
from .buffer import GradientBuffer, all_reduce_sum, is_distributed, local_numel, views
from .fsdp import FSDPShards, fsdp_refusal
from .partition import ParameterBlock, ParameterPartition

if TYPE_CHECKING:
    from ..sharpness import Sharpness

logger = logging.get_logger(__name__)

#: Salt that keeps the method's generator apart from the task sampler's (same seed and step).
_METHOD_SALT = 0x5EED_AA

#: How the per-task gradients of the shared parameters are formed (`mtl_jacobian_mode`).
JACOBIAN_MODES = ("rows", "features", "gramian")

#: Columns per chunk when a Gramian or an update is formed from reduced-precision rows.
_CHUNK = 1 << 20


@dataclass
class Problem:
    """One problem of the gradient method: a block of shared parameters and its tasks (modes ``rows`` and
    ``gramian``), or the tasks that read one shared representation (mode ``representation``).

    Args:
        name (`str`): the block's name (its tasks joined by ``+``).
        tasks (`tuple[str, ...]`): its tasks, in task order.
        task_ids (`list[int]`): their indices into the engine's tasks.
        method (`GradientMethod`): the method instance of this problem (its own state; learnable parameters
            shared with every other problem's instance).
        block (`ParameterBlock`, *optional*): the block's parameters (modes ``rows`` and ``gramian``).
        encoders (`tuple[str, ...]`): the encoders whose features the problem reads (mode ``representation``).
    """

    name: str
    tasks: tuple[str, ...]
    task_ids: list[int]
    method: GradientMethod
    block: ParameterBlock | None = None
    encoders: tuple[str, ...] = ()
    #: offset of the block's rows in the rows segment (K_b x P_b floats from there)
    row_offset: int = 0
    #: running sums of the method's weights since the last `pop_logs`: task -> [sum, count]
    weight_sums: dict[str, list[float]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.block.size if self.block is not None else 0


class MultiTaskEngine:
    """Computes, accumulates, reduces and combines per-task gradients for `MultiTaskTrainer`.

    Args:
        model (`MultiTaskModel`): the unwrapped model (``task_parameter_names()``, multi-task forward, ``heads``).
        method (`GradientMethod`): the gradient method, built with ``num_tasks = K``.
        task_names (`list[str]`): the tasks, in the order of the method's task indices.
        seed (`int`): the run's seed; the method's random draws come from ``(seed, step)``.
        sharpness (`Sharpness`, *optional*): a SAM variant (`hf_mtl.sharpness`).
        global_problem (`bool`, *optional*, defaults to `False`): one method problem over every shared
            parameter instead of one per block.
        surgery_parameters (`list[str]`, *optional*): regular expressions; surgery acts on the shared
            parameters whose name matches one, the others get the gradient of ``Σ_i L_i``.
        rows_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the rows' storage type
            (`torch.bfloat16` halves their memory; Gramians and updates are formed in float32).
        jacobian_mode (`str`, *optional*, defaults to `"rows"`): one of `JACOBIAN_MODES`.
        skip_non_finite (`bool`, *optional*, defaults to `True`): skip a step whose gradients are not finite
            (without a GradScaler).
    """

    def __init__(
        self,
        model: nn.Module,
        method: GradientMethod,
        task_names: Sequence[str],
        seed: int,
        sharpness: Sharpness | None = None,
        *,
        global_problem: bool = False,
        surgery_parameters: Sequence[str] | None = None,
        rows_dtype: torch.dtype = torch.float32,
        jacobian_mode: str = "rows",
        skip_non_finite: bool = True,
    ) -> None:
        #: the constructor's options, to build the same engine over a model's new (sharded) parameters (`rebuilt`)
        self._options = {
            "global_problem": global_problem,
            "surgery_parameters": surgery_parameters,
            "rows_dtype": rows_dtype,
            "jacobian_mode": jacobian_mode,
            "skip_non_finite": skip_non_finite,
        }
        FSDPShards.reshard(model)  # FSDP2: the sharded parameters, not unsharded working copies left by a forward
        self.method = method
        self.task_names = list(task_names)
        self.task_ids = {name: i for i, name in enumerate(self.task_names)}
        self.seed = seed
        self.sharpness = sharpness
        self.skip_non_finite = skip_non_finite
        self.global_problem = global_problem
        self.mode = self._mode(method, sharpness, jacobian_mode, surgery_parameters, rows_dtype)
        self.rows_dtype = rows_dtype if self.mode == "rows" else torch.float32
        self.heads = getattr(model, "heads", None)
        model_tasks = getattr(model, "tasks", {})
        #: task -> the encoder it reads (representation methods group the features by encoder)
        self.task_encoders = {t: model_tasks[t].encoder for t in self.task_names if t in model_tasks}
        device = next(model.parameters()).device
        self.device = device
        uses_blocks = self.mode in ("rows", "gramian")
        self.partition = ParameterPartition.from_model(
            model,
            self.task_names,
            global_problem=global_problem,
            surgery_patterns=surgery_parameters if uses_blocks else None,
        )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in named}
        #: every trainable model parameter, in ``named_parameters`` order (SAM perturbs these)
        self.model_params = [p for _, p in named]
        self.method_params = [p for p in method.parameters() if p.requires_grad]
        self._names.update({id(p): f"method.{n}" for n, p in method.named_parameters()})
        #: FSDP2: this rank's shards of the parameters (`hf_mtl.engine.fsdp`); `None` without FSDP
        self.sharded = FSDPShards.from_model(model, self.model_params, self._names)
        if self.sharded is not None:
            refusal = fsdp_refusal(method, sharpness=sharpness, jacobian_mode=jacobian_mode)
            if refusal is not None:
                raise ValueError(refusal)

        # ---------------------------------------------------------------- problems
        self.problems: list[Problem] = []
        if self.mode == "rows":
            self._build_block_problems(method)
        elif self.mode == "representation":
            self._build_feature_problems(model, method)
        elif self.mode == "gramian":
            self._build_block_problems(method)
        block_ids = {id(p) for problem in self.problems if problem.block is not None for _, p in problem.block.params}
        self.row_params = [p for p in self.model_params if id(p) in block_ids] if self.mode == "rows" else []
        #: parameters outside the rows: heads, private encoders, plain shared ones (every parameter in the
        #: modes without rows); their gradients accumulate in the plain segment
        self.plain_params = [p for p in self.model_params if id(p) not in {id(q) for q in self.row_params}]
        self._plain_index = {id(p): i for i, p in enumerate(self.plain_params)}
        #: whether `.grad` can point into the buffer (float32 parameters and rows); else gradients are copied
        self.pointer_grads = (
            all(p.dtype == torch.float32 for p in self.model_params)
            and self.rows_dtype == torch.float32
            and self.sharded is None
        )

        # ---------------------------------------------------------------- buffer
        num_tasks = len(self.task_names)
        rows_size = sum(len(p.tasks) * p.size for p in self.problems) if self.mode == "rows" else 0
        plain_size = sum(local_numel(p) for p in self.plain_params)
        early, late, rows_early = ([], [], False)
        if sharpness is not None:
            early, late, rows_early = sharpness.segments(self, rows_size=rows_size, plain_size=plain_size)
        rows_segments = [("rows", rows_size)] if rows_size else []
        # the window's loss sums at the weights, and (with a sharpness variant) at the perturbed weights
        loss_segments = [("loss_sums", num_tasks)] + ([("loss_sums/perturbed", num_tasks)] if sharpness else [])
        row_late = [s for s in late if s[0].startswith("rows")] if self.rows_dtype != torch.float32 else []
        # under FSDP the parameter gradients arrive summed over the ranks (FSDP's reduce-scatter): never reduced again
        local = ("rows", "plain") if self.sharded is not None else ()
        if self.rows_dtype == torch.float32:
            self.buffer = GradientBuffer(
                early=(rows_segments if rows_early else []) + early,
                late=(rows_segments if not rows_early else []) + late + [("plain", plain_size), *loss_segments],
                device=device,
                local=local,
            )
            self.row_buffer = self.buffer
        else:
            self.row_buffer = GradientBuffer(
                early=rows_segments if rows_early else [],
                late=(rows_segments if not rows_early else []) + row_late,
                device=device,
                dtype=self.rows_dtype,
                local=local,
            )
            self.buffer = GradientBuffer(
                early=early,
                late=[s for s in late if s not in row_late] + [("plain", plain_size), *loss_segments],
                device=device,
                local=local,
            )
        self.plain_views = views(self.buffer["plain"], self.plain_params)
        self.loss_sums = self.buffer["loss_sums"]
        self.perturbed_loss_sums = self.buffer["loss_sums/perturbed"] if sharpness is not None else None
        #: task -> (parameter, view) of its rows in each rows-shaped segment, built on demand
        self._row_pairs: dict[tuple[str, str], list[tuple[nn.Parameter, Tensor]]] = {}
        self._pair_cache: dict[Any, list[tuple[nn.Parameter, Tensor]]] = {}
        #: reduced precision: parameter id -> the view its next gradient goes to (`backward_into`), and the
        #: parameters whose post-accumulate hook drains them
        self._grad_sink: dict[int, Tensor] = {}
        self._draining: set[int] = set()
        #: task -> indices (into `plain_params`) of the parameters outside the rows that its loss reaches
        reached = self.partition.reached
        self.task_plain_indices: dict[str, list[int]] = {
            task: [
                self._plain_index[id(p)]
                for n, p in named
                if n in set(reached.get(task, ())) and id(p) in self._plain_index
            ]
            for task in self.task_names
        }
        private_ids = {task: {id(p) for _, p in self.partition.private[task]} for task in self.task_names}
        self.task_private_indices = {
            task: [i for i in self.task_plain_indices[task] if id(self.plain_params[i]) in private_ids[task]]
            for task in self.task_names
        }
        head_ids = {
            task: {id(p) for p in self.heads[task].parameters()}
            if self.heads is not None and task in self.heads
            else set()
            for task in self.task_names
        }
        #: task -> plain indices of its head's parameters (what a representation method's per-task backward reaches)
        self.task_head_indices = {
            task: [i for i in self.task_plain_indices[task] if id(self.plain_params[i]) in head_ids[task]]
            for task in self.task_names
        }
        if self.mode == "rows":
            for problem in self.problems:
                problem.method.bind_parameter_layout([(n, local_numel(p)) for n, p in problem.block.params])
        self._gramian = None
        if self.mode == "gramian":
            from .gramian import GramianPath

            self._gramian = GramianPath(model, self.problems)
        if sharpness is not None:
            sharpness.bind(self)
        self._transforms = type(method).transform_losses is not GradientMethod.transform_losses

        # ---------------------------------------------------------------- step state
        self._window_open = False
        self.window_batches: list[Mapping[str, Any]] = []
        self._window_counts: list[dict[str, int]] = []
        self._factors: list[Tensor] = []
        self.global_counts: Tensor = torch.zeros(num_tasks, device=device)
        self.present: list[str] = []
        self.grad_scale = 1.0
        self.step = 0
        self._micro = 0
        self._loss_weights: Tensor | None = None
        self.skipped_steps = 0
        self._update_sums: list[Tensor] = []
        self._skipped_since_log = 0
        self.last_step_skipped = False
        self._losses_after_step_pending = False
        #: running sums between two `pop_logs` calls: task -> [loss sum, steps]
        self._log_sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in self.task_names}
        self._combined_weight_sums: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _mode(
        method: GradientMethod,
        sharpness: Sharpness | None,
        jacobian_mode: str,
        surgery_parameters: Sequence[str] | None,
        rows_dtype: torch.dtype,
    ) -> str:
        if jacobian_mode not in JACOBIAN_MODES:
            raise ValueError(f"`mtl_jacobian_mode` must be one of {', '.join(JACOBIAN_MODES)}, got {jacobian_mode!r}")
        if rows_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"`mtl_rows_dtype` must be float32 or bfloat16, got {rows_dtype}")
        gramian_based = isinstance(method, GramianMethod) and method.requires_jacobian
        if jacobian_mode != "rows":
            if sharpness is not None and sharpness.per_task:
                raise ValueError(
                    f"`sam`={sharpness.name!r} needs the per-task rows (its flat gradients are differences of rows): "
                    f"use `mtl_jacobian_mode`='rows', got {jacobian_mode!r}"
                )
            if not gramian_based or method.requires_representation:
                raise ValueError(
                    f"`mtl_jacobian_mode`={jacobian_mode!r} needs a method that weights the tasks from their Gramian "
                    f"(pcgrad, mgda, cagrad, imtl, nash_mtl, upgrad, ...); `{method.name}` is not one: use 'rows'"
                )
            if surgery_parameters:
                raise ValueError(
                    f"`mtl_surgery_parameters` restricts the Jacobian rows; with `mtl_jacobian_mode`={jacobian_mode!r} "
                    "there are none: use 'rows', or drop `mtl_surgery_parameters`"
                )
            if rows_dtype != torch.float32:
                raise ValueError(
                    f"`mtl_rows_dtype` applies to the rows; `mtl_jacobian_mode`={jacobian_mode!r} has none"
                )
            return "representation" if jacobian_mode == "features" else "gramian"
        if sharpness is not None and sharpness.per_task:
            return "rows"  # F-MTL: per-task rows whatever the method
        if method.requires_representation:
            if surgery_parameters:
                raise ValueError(
                    f"`mtl_surgery_parameters` restricts the Jacobian rows; `{method.name}` combines feature gradients"
                )
            return "representation"
        if not method.requires_jacobian:
            if surgery_parameters:
                raise ValueError(
                    f"`mtl_surgery_parameters` restricts the Jacobian rows; `{method.name}` weights the losses and "
                    "builds none"
                )
            return "combined"
        return "rows"

    def _copy_method(self, method: GradientMethod) -> GradientMethod:
        """An instance of ``method`` with its own state and the same learnable parameters."""
        return copy.deepcopy(method, memo={id(p): p for p in method.parameters()})

    def _build_block_problems(self, method: GradientMethod) -> None:
        offset = 0
        for index, block in enumerate(self.partition.blocks):
            problem_method = method if index == 0 else self._copy_method(method)
            self.problems.append(
                Problem(
                    name=block.name,
                    tasks=block.tasks,
                    task_ids=[self.task_ids[t] for t in block.tasks],
                    method=problem_method,
                    block=block,
                    row_offset=offset,
                )
            )
            offset += len(block.tasks) * block.size

    def _build_feature_problems(self, model: nn.Module, method: GradientMethod) -> None:
        """Representation methods: one problem per shared representation (each encoder's output, or the
        trunk's for every task), over the tasks that read it; a representation read by one task is none."""
        tasks = getattr(model, "tasks", {})
        if getattr(model, "trunk", None) is not None or self.global_problem:
            groups = {tuple(tasks[t].encoder for t in self.task_names): tuple(self.task_names)}
        else:
            by_encoder: dict[str, list[str]] = {}
            for task in self.task_names:
                by_encoder.setdefault(tasks[task].encoder, []).append(task)
            groups = {(encoder,): tuple(names) for encoder, names in by_encoder.items()}
        index = 0
        for encoders, names in groups.items():
            if len(names) < 2:
                continue
            self.problems.append(
                Problem(
                    name="+".join(names),
                    tasks=names,
                    task_ids=[self.task_ids[t] for t in names],
                    method=method if index == 0 else self._copy_method(method),
                    encoders=tuple(dict.fromkeys(encoders)),
                )
            )
            index += 1
        #: task -> its problem (representation mode)
        self._feature_problem = {t: p for p in self.problems for t in p.tasks}

    @property
    def methods(self) -> list[GradientMethod]:
        """Every method instance whose per-step hooks run: one per problem (at least the method itself),
        and a sharpness variant's own (F-MTL's flat-gradient methods)."""
        out = [p.method for p in self.problems] or [self.method]
        if self.method not in out:
            out.insert(0, self.method)
        if self.sharpness is not None:
            out += [m for m in self.sharpness.methods() if all(m is not o for o in out)]
        return out

    def describe(self) -> str:
        """One line saying what the step solves, for the start of training."""
        if self.mode == "combined":
            return f"`{self.method.name}` weights the task losses: one backward per micro-batch"
        if not self.problems:
            return f"`{self.method.name}`: no parameter is shared by two tasks; every task keeps its own gradient"
        scope = (
            "one global problem" if self.global_problem else f"{len(self.problems)} problem(s), one per shared block"
        )
        parts = ", ".join(
            f"{p.name} ({p.size:,} parameters)"
            if p.block is not None
            else f"{p.name} (features of {', '.join(p.encoders)})"
            for p in self.problems
        )
        sharded = " (sizes of this rank's FSDP shards)" if self.sharded is not None else ""
        return f"`{self.method.name}` ({self.mode}) solves {scope}{sharded}: {parts}"

    def rebuilt(self, model: nn.Module) -> MultiTaskEngine:
        """The same engine (method, options, state) over ``model``'s current parameters: the trainer's, after
        Accelerate's FSDP preparation has replaced the parameters by sharded ones (`hf_mtl.engine.fsdp`)."""
        engine = MultiTaskEngine(model, self.method, self.task_names, self.seed, self.sharpness, **self._options)
        engine.load_state_dict(self.state_dict())
        return engine

    def row_pairs(self, task: str, segment: str = "rows") -> list[tuple[nn.Parameter, Tensor]]:
        """``(parameter, view)`` of ``task``'s row in every block it belongs to, in a rows-shaped segment of the
        row buffer (``"rows"``, or a sharpness variant's, e.g. F-MTL's flat rows)."""
        key = (task, segment)
        if key not in self._row_pairs:
            pairs = []
            for problem in self.problems:
                if task not in problem.tasks:
                    continue
                flat = self.row_buffer[segment]
                row = problem.tasks.index(task)
                size = problem.size
                start = problem.row_offset + row * size
                params = [p for _, p in problem.block.params]
                pairs += list(zip(params, views(flat[start : start + size], params)))
            self._row_pairs[key] = pairs
        return self._row_pairs[key]

    def block_rows(self, problem: Problem, segment: str = "rows") -> Tensor:
        """The (K_b, P_b) rows of ``problem`` in a rows-shaped segment."""
        flat = self.row_buffer[segment]
        return flat[problem.row_offset : problem.row_offset + len(problem.tasks) * problem.size].view(
            len(problem.tasks), problem.size
        )

    def _group_encoder(self, group_key: str) -> str:
        """The encoder a sub-batch's tasks read (its key is its tasks joined by ``+``)."""
        for name in group_key.split("+"):
            if name in self.task_encoders:
                return self.task_encoders[name]
        raise ValueError(f"sub-batch {group_key!r} names no task of the engine: {', '.join(self.task_names)}")

    def named(self, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs for ``params`` (names as in ``model.named_parameters()``)."""
        return [(self._names[id(p)], p) for p in params]

    # ------------------------------------------------------------------ the window
    def begin_window(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, step: int, grad_scale: float = 1.0
    ) -> None:
        """Opens an optimizer step over ``batches`` (this rank's micro-batches): counts every task's labelled
        items, sums the counts over the ranks, and zeroes the buffer.

        Every rank calls it at the same time (one collective of K counts), and it is the step's only
        host-device synchronisation besides the combination's.
        """
        self.buffer.zero_()
        if self.row_buffer is not self.buffer:
            self.row_buffer.zero_()
        num_tasks = len(self.task_names)
        local = torch.zeros(len(batches), num_tasks, dtype=torch.float64)
        counts_device = []
        for batch in batches:
            row = []
            for sub_batch in batch.values():
                for task, labels in (sub_batch.get("labels") or {}).items():
                    if labels is None or task not in self.task_ids:
                        continue
                    head = self.heads[task] if self.heads is not None else None
                    count = head.count_items(labels) if head is not None else torch.tensor(labels.shape[0])
                    row.append((self.task_ids[task], count))
            counts_device.append(row)
        stacked = torch.zeros(len(batches), num_tasks, dtype=torch.float32, device=self.device)
        for m, row in enumerate(counts_device):
            for index, count in row:
                stacked[m, index] += count.to(device=self.device, dtype=torch.float32)
        if self.sharded is None:
            total = all_reduce_sum(stacked.sum(dim=0).clone())
            presence = stacked
        else:  # FSDP: every rank backpropagates the tasks any rank has in a micro-batch (a backward is a collective)
            presence = self.sharded.window_presence(stacked)
            total = presence.sum(dim=0)
        size = len(batches) * num_tasks
        # the one synchronisation of the window's start
        host = torch.cat([stacked.reshape(-1), presence.reshape(-1), total]).cpu()
        local = host[:size].view(len(batches), num_tasks)
        present_in = host[size : 2 * size].view(len(batches), num_tasks)
        self.global_counts = total
        totals = host[2 * size :]
        self.present = [t for t in self.task_names if totals[self.task_ids[t]] > 0]
        safe = total.clamp_min(1.0)
        self._factors = [stacked[m] / safe for m in range(len(batches))]
        #: micro-batch -> task -> this rank's labelled items, for the tasks that take part in the micro-batch (with
        #: items here; under FSDP with items on any rank)
        self._window_counts = [
            {t: int(local[m, self.task_ids[t]]) for t in self.task_names if present_in[m, self.task_ids[t]] > 0}
            for m in range(len(batches))
        ]
        self.window_batches = list(batches)
        self.grad_scale = float(grad_scale)
        self.step = step
        self._micro = 0
        self._window_open = True
        self._loss_weights = None
        self.last_step_skipped = False
        self._present_id_list = [self.task_ids[t] for t in self.present]
        self._present_ids = torch.tensor(self._present_id_list, device=self.device)
        self._num_present = max(1, len(self.present))
        if self.mode == "combined" and not getattr(self.method, "weights_depend_on_losses", False):
            self._loss_weights = self._combined_weights(torch.ones(len(self.present), device=self.device))
        if self.sharpness is not None:
            self.sharpness.begin_window(self)

    def task_subset(self, ids: Sequence[int]) -> Tensor | None:
        """``task_ids`` for a method call over the tasks ``ids``: `None` when they are all tasks in order."""
        if list(ids) == list(range(len(self.task_names))):
            return None
        return torch.tensor(list(ids), device=self.device, dtype=torch.long)

    def _combined_weights(self, losses: Tensor) -> Tensor:
        """Loss-weighting methods: the weights ``∂C/∂L`` of the window's present tasks at ``losses``."""
        ids = self.task_subset([self.task_ids[t] for t in self.present])
        generator = step_generator(self.seed, _METHOD_SALT, self.step, -1)
        if self._transforms:
            probe = losses.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                transformed = self.method.transform_losses(probe, task_ids=ids)
                combined = self.method.combine_losses(transformed, task_ids=ids, generator=generator)
                (weights,) = torch.autograd.grad(combined, probe)
            return weights.detach()
        assert isinstance(self.method, LossWeightingMethod)
        return self.method.loss_weights(losses, task_ids=ids, generator=generator).to(self.device)

    # ------------------------------------------------------------------ primitives
    def forward_losses(self, model: nn.Module, batch: Mapping[str, Any], micro_index: int, **kwargs: Any) -> Any:
        """One forward of a micro-batch; returns the model output with ``losses`` normalised by the window's
        counts (``ℓ_i = mean_i · n_i / N_i``), for the tasks with labelled items in this micro-batch."""
        outputs = model(batch, **kwargs)
        losses = outputs["losses"] if isinstance(outputs, Mapping) else outputs.losses
        unknown = [t for t in losses if t not in self.task_ids]
        if unknown:
            raise ValueError(f"the model returned losses for unknown task(s) {unknown}; tasks: {self.task_names}")
        counts = self._window_counts[micro_index]
        factors = self._factors[micro_index]
        if self.sharded is not None:
            missing = [t for t in counts if t not in losses]
            if missing:
                raise ValueError(
                    "under FSDP every rank backpropagates the tasks of a micro-batch that any rank has labels for, "
                    f"but this rank's model returned no loss for {missing}: every rank's sub-batch must carry `labels` "
                    "for its tasks (missing labels as -100)"
                )
        normalised = {
            t: losses[t].float() * factors[self.task_ids[t]] for t in self.task_names if t in counts and t in losses
        }
        outputs.losses = normalised
        return outputs

    def record_losses(self, losses: Mapping[str, Tensor], *, perturbed: bool = False) -> None:
        """Adds a micro-step's normalised losses to the window's loss sums: at the weights (logged, and what the
        method's per-step hooks see), or at a sharpness variant's perturbed weights (where its gradients are
        taken: the chain rule of a loss transform and the method's own parameters use those)."""
        sums = self.perturbed_loss_sums if perturbed else self.loss_sums
        for task, loss in losses.items():
            sums[self.task_ids[task]] += loss.detach()

    def logging_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """This micro-step's share of the step's logged loss, the mean over tasks of their mean losses: summed
        over micro-steps and averaged over ranks by the Trainer."""
        if not losses:
            return torch.zeros((), device=self.device)
        world = torch.distributed.get_world_size() if is_distributed() else 1
        return torch.stack([loss.detach() for loss in losses.values()]).sum() * (world / self._num_present)

    def backward_into(
        self,
        loss: Tensor,
        pairs: Sequence[tuple[nn.Parameter, Tensor]],
        *,
        retain_graph: bool = False,
    ) -> None:
        """Accumulates ``∇ loss`` of the ``pairs``' parameters into their views (``.grad`` points into the
        buffer, so autograd adds in place; reduced-precision views get a copy)."""
        if self.sharded is not None:  # every rank runs every backward (FSDP's reduce-scatter), even with no pair here
            self.sharded.backward(loss, pairs, retain_graph=retain_graph)
            return
        if not pairs:
            return
        params = [p for p, _ in pairs]
        if self.pointer_grads:
            for p, view in pairs:
                p.grad = view
            torch.autograd.backward(loss, inputs=params, retain_graph=retain_graph)
            return
        # reduced-precision rows (or parameters): each parameter's gradient is added to its view as soon as
        # autograd has made it, and freed (no second copy of the task's whole gradient at any time)
        sink = self._grad_sink
        for p, view in pairs:
            sink[id(p)] = view
            p.grad = None
            if id(p) not in self._draining:
                p.register_post_accumulate_grad_hook(_drain_into(sink))
                self._draining.add(id(p))
        try:
            torch.autograd.backward(loss, inputs=params, retain_graph=retain_graph)
        finally:
            sink.clear()

    def plain_pairs(
        self, indices: Sequence[int], area: Sequence[Tensor] | None = None
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """``(parameter, view)`` of plain parameters by index, in the plain segment or another area of its layout.
        Built once per set of indices and area (the step builds no parameter lists)."""
        area = self.plain_views if area is None else area
        key = (tuple(indices), id(area))
        pairs = self._pair_cache.get(key)
        if pairs is None:
            pairs = self._pair_cache[key] = [(self.plain_params[i], area[i]) for i in key[0]]
        return pairs

    def task_pairs(self, task: str, rows: str = "rows", plain_area: Sequence[Tensor] | None = None) -> list:
        """``task``'s rows in a rows-shaped segment and its plain parameters in an area: what its backward fills."""
        key = (task, rows, id(plain_area))
        pairs = self._pair_cache.get(key)
        if pairs is None:
            pairs = self._pair_cache[key] = self.row_pairs(task, rows) + self.plain_pairs(
                self.task_plain_indices[task], plain_area
            )
        return pairs

    def task_order(self, batch: Mapping[str, Any], losses: Mapping[str, Tensor]) -> list[tuple[str, bool]]:
        """The tasks of a micro-batch with a loss, in task order, each with whether the graph must be kept for
        a later task of the same sub-batch (the last task of each sub-batch frees its graph)."""
        last: dict[str, str] = {}
        group_of: dict[str, str] = {}
        for key, sub_batch in batch.items():
            for task in sub_batch.get("labels") or {}:
                if task in losses:
                    group_of[task] = key
        order = [t for t in self.task_names if t in losses]
        for task in order:
            last[group_of.get(task, task)] = task
        return [(task, last[group_of.get(task, task)] != task) for task in order]

    def backward_rows(
        self,
        batch: Mapping[str, Any],
        losses: Mapping[str, Tensor],
        *,
        rows: str = "rows",
        plain_area: Sequence[Tensor] | None = None,
    ) -> None:
        """One backward per task, each through its own sub-graph: its block gradients into its rows (of the
        rows-shaped segment ``rows``), its other gradients into ``plain_area`` (default: the plain segment)."""
        for task, retain in self.task_order(batch, losses):
            pairs = self.task_pairs(task, rows, plain_area)
            self.backward_into(losses[task] * self.grad_scale, pairs, retain_graph=retain)

    def objective(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The scalar training objective of a micro-step: ``Σ_i w_i ℓ_i`` for loss-weighting methods (the step's
        weights), ``Σ_i T_i'(L̄_i) ℓ_i`` for a Jacobian method with a loss transform (the gradient of
        ``Σ_i T_i(L̄_i)``), ``Σ_i ℓ_i`` otherwise. SAM and ASAM ascend along its gradient."""
        if self.mode == "combined" or (self._transforms and self.mode == "rows"):
            weights = self.loss_weights_for_step()
            position = {t: i for i, t in enumerate(self.present)}
            return sum(weights[position[t]] * loss for t, loss in losses.items())
        return sum(losses.values())

    def loss_weights_for_step(self) -> Tensor:
        """Loss-weighting methods: the window's weights (computed at its first use for methods whose weights
        depend on the losses: from the window's global mean losses, see `_window_mean_losses`)."""
        if self._loss_weights is None:
            raise RuntimeError("the step's loss weights are computed by `accumulate` before the first backward")
        return self._loss_weights

    def accumulate(
        self, model: nn.Module, batch: Mapping[str, Any], micro_index: int, *, perturbed: bool = False
    ) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch at the current weights into the buffer (``perturbed``: a
        sharpness variant's replay at its perturbed weights). Returns the normalised losses (detached)."""
        if self.mode == "representation":
            outputs = self.forward_losses(model, batch, micro_index, return_representations=True)
            losses = outputs.losses
            self.record_losses(losses, perturbed=perturbed)
            self._backward_representation(model, batch, outputs)
            return {t: v.detach() for t, v in losses.items()}
        if self.mode == "gramian":
            outputs = self._gramian.forward(self, model, batch, micro_index)
        else:
            outputs = self.forward_losses(model, batch, micro_index)
        losses = outputs.losses
        self.record_losses(losses, perturbed=perturbed)
        if self.mode == "rows":
            self.backward_rows(batch, losses)
        elif self.mode == "combined":
            self.ensure_loss_weights(model, losses, micro_index)
            self.backward_into(
                self.objective(losses) * self.grad_scale, self.plain_pairs(range(len(self.plain_params)))
            )
        else:  # gramian
            self._gramian.backward(self, batch, losses)
        return {t: v.detach() for t, v in losses.items()}

    def ensure_loss_weights(self, model: nn.Module, losses: Mapping[str, Tensor], micro_index: int) -> None:
        """The step's weights of the task losses, computed at their first use from the window's global mean
        losses: a loss-weighting method's whose weights depend on the losses, and (for a sharpness variant's
        ascent) the chain-rule factors ``T_i'(L̄_i)`` of a Jacobian method's elementwise loss transform."""
        if self._loss_weights is not None:
            return
        if self.mode == "combined":
            self._loss_weights = self._combined_weights(self._window_mean_losses(model, losses, micro_index))
        elif self._transforms:
            self._loss_weights = self._transform_derivative(self._window_mean_losses(model, losses, micro_index))

    def _transform_derivative(self, losses: Tensor) -> Tensor:
        """``T_i'(L_i)`` of the method's elementwise transform, for the window's present tasks."""
        probe = losses.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            transformed = self.method.transform_losses(probe, task_ids=self.task_subset(self._present_id_list))
            (derivative,) = torch.autograd.grad(transformed.sum(), probe)
        return derivative.detach()

    def _window_mean_losses(self, model: nn.Module, losses: Mapping[str, Tensor], micro_index: int) -> Tensor:
        """The present tasks' global mean losses of the window, for loss weights that depend on them (FAMO,
        GLS, SI, STCH): this micro-batch's losses, the other micro-batches' by forwards without gradient, summed
        over the ranks (one collective of K numbers)."""
        sums = torch.zeros(len(self.task_names), device=self.device)
        for task, loss in losses.items():
            sums[self.task_ids[task]] += loss.detach()
        with torch.no_grad():
            for index, other in enumerate(self.window_batches):
                if index == micro_index:
                    continue
                for task, loss in self.forward_losses(model, other, index).losses.items():
                    sums[self.task_ids[task]] += loss
        all_reduce_sum(sums)
        return sums[self._present_ids]

    def _feature_rows(self, losses: Mapping[str, Tensor], tasks: Sequence[str], zs: Sequence[Tensor]) -> Tensor:
        """Each task's gradient with respect to the features ``zs`` (flattened, unscaled), one row per task; its
        head's gradient goes to the plain segment on the way."""
        rows = []
        for task in tasks:
            heads = self.plain_pairs(self.task_head_indices[task])
            grads = torch.autograd.grad(
                losses[task] * self.grad_scale, [*zs, *(p for p, _ in heads)], retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [(g if g is not None else torch.zeros_like(z)).reshape(-1).float() for g, z in zip(grads, zs)]
                )
            )
            present = [(v, g) for (_, v), g in zip(heads, grads[len(zs) :]) if g is not None]
            if present:
                torch._foreach_add_([v for v, _ in present], [g.float() for _, g in present])
        return torch.stack(rows) / self.grad_scale

    def _backward_representation(self, model: nn.Module, batch: Mapping[str, Any], outputs: Any) -> None:
        """Representation methods (and the feature-level mode): per-task gradients with respect to the shared
        features, combined per problem, then one backward through the encoders."""
        losses = outputs.losses
        features = outputs.representations
        group_of = {task: key for key, sub in batch.items() for task in (sub.get("labels") or {}) if task in losses}
        encoder_of_group = {key: self._group_encoder(key) for key in features}
        grad_features: dict[str, Tensor] = {}
        handled: set[str] = set()
        for index, problem in enumerate(self.problems):
            names = [t for t in problem.tasks if t in losses]
            keys = [k for k in features if encoder_of_group[k] in problem.encoders]
            if not names or not keys:
                continue
            ids = self.task_subset([self.task_ids[t] for t in names])
            generator = step_generator(self.seed, _METHOD_SALT, self.step, self._micro, index)
            method = problem.method
            if isinstance(method, GramianMethod) and type(method).aggregate is GramianMethod.aggregate:
                # each task's loss depends on its own sub-batch's features only: the Gramian is block-diagonal over
                # the sub-batches, and a sum over samples (summed over the ranks it is the global one)
                blocks = []
                for key in keys:
                    tasks = [t for t in names if group_of.get(t) == key]
                    if tasks:
                        blocks.append((key, tasks, self._feature_rows(losses, tasks, [features[key]])))
                gramian = torch.zeros(len(names), len(names), device=self.device)
                for _, tasks, rows in blocks:
                    at = [names.index(t) for t in tasks]
                    gramian[torch.tensor(at)[:, None], torch.tensor(at)[None, :]] = rows @ rows.T
                gramian = all_reduce_sum(gramian)
                weights = method.weights_from_gramian(gramian, task_ids=ids, generator=generator).float()
                method.last_weights = weights.detach()
                for key, tasks, rows in blocks:
                    z = features[key]
                    combined = weights[[names.index(t) for t in tasks]] @ rows
                    part = (combined.view_as(z) * self.grad_scale).to(z.dtype)
                    grad_features[key] = grad_features[key] + part if key in grad_features else part
            else:
                zs = [features[k] for k in keys]
                jacobian = self._feature_rows(losses, names, zs)
                representation = torch.cat([z.detach().reshape(-1).float() for z in zs])
                stacked = torch.stack([losses[t].detach() for t in names])
                combined = method.aggregate(
                    jacobian, losses=stacked, task_ids=ids, generator=generator, representation=representation
                )
                offset = 0
                for key, z in zip(keys, zs):
                    part = (combined[offset : offset + z.numel()].view_as(z) * self.grad_scale).to(z.dtype)
                    grad_features[key] = grad_features[key] + part if key in grad_features else part
                    offset += z.numel()
            handled.update(names)
            self._record_problem_weights(problem, names, method.last_weights)
        # tasks outside every problem (alone on their representation) keep their own gradient
        others = [t for t in self.task_names if t in losses and t not in handled]
        if others:
            objective = sum(losses[t] for t in others) * self.grad_scale
            indices = sorted({i for t in others for i in self.task_plain_indices[t]})
            self.backward_into(objective, self.plain_pairs(indices), retain_graph=bool(grad_features))
        if grad_features:
            keys = list(grad_features)
            upstream = sorted(
                {i for t in self.task_names if t in losses for i in self.task_plain_indices[t]}
                - {i for t in handled for i in self.task_head_indices[t]}
            )
            pairs = self.plain_pairs(upstream)
            if self.pointer_grads:
                for p, view in pairs:
                    p.grad = view
                torch.autograd.backward(
                    [features[k] for k in keys],
                    grad_tensors=[grad_features[k] for k in keys],
                    inputs=[p for p, _ in pairs],
                )
            else:
                grads = torch.autograd.grad(
                    [features[k] for k in keys],
                    [p for p, _ in pairs],
                    grad_outputs=[grad_features[k] for k in keys],
                    allow_unused=True,
                )
                present = [(v, g) for (_, v), g in zip(pairs, grads) if g is not None]
                if present:
                    torch._foreach_add_([v for v, _ in present], [g.to(v.dtype) for v, g in present])

    # ------------------------------------------------------------------ the step
    def micro_step(
        self, model: nn.Module, batch: Mapping[str, Any], *, step: int = 0, grad_scale: float = 1.0
    ) -> Tensor:
        """Forward and backward of the window's next micro-batch into the buffer. Returns this micro-step's share
        of the logged loss (detached). Without `begin_window`, ``batch`` is a window of its own."""
        if not self._window_open:
            self.begin_window(model, [batch], step=step, grad_scale=grad_scale)
        micro_index = self._micro
        if micro_index >= len(self.window_batches):
            raise RuntimeError(f"the window holds {len(self.window_batches)} micro-batch(es); call `finalize` first")
        if self.window_batches[micro_index] is not batch:
            self.window_batches[micro_index] = batch
        if self.sharpness is not None:
            losses = self.sharpness.micro_step(self, model, batch, micro_index)
        else:
            losses = self.accumulate(model, batch, micro_index)
        self._micro += 1
        if not self.present:
            raise ValueError("a training step has no labelled item for any task: every sub-batch must carry `labels`")
        return self.logging_loss(losses)

    @property
    def is_last_micro_step(self) -> bool:
        """Whether the micro-step being run is the window's last (sharpness variants replay the window then)."""
        return self._micro == len(self.window_batches) - 1

    def finalize(self, step: int | None = None) -> None:
        """At the sync step: sum the buffer over the ranks, combine each problem's rows, write every ``.grad``."""
        if not self._window_open:
            raise RuntimeError("`finalize` without an open window: call `micro_step` first")
        self._window_open = False
        self.row_buffer.all_reduce_late()
        if self.row_buffer is not self.buffer:
            self.buffer.all_reduce_late()
        present_ids = [self.task_ids[t] for t in self.present]
        mean_losses = self.loss_sums[present_ids]
        scaler_active = self.grad_scale != 1.0
        if self.skip_non_finite and not scaler_active and not self._finite(mean_losses):
            self._skip_step()
            return
        ids = self.task_subset(present_ids)
        for method in self.methods:
            method.observe_losses(mean_losses, task_ids=ids)
        host_losses = mean_losses.tolist()
        for task, value in zip(self.present, host_losses):
            self._log_sums[task][0] += value
            self._log_sums[task][1] += 1.0
        # where the gradients were taken: a sharpness variant's perturbed weights (F-MTL's loss rows: the weights)
        at_gradients = mean_losses if self.sharpness is None else self.perturbed_loss_sums[present_ids]
        per_task_sharpness = self.sharpness is not None and self.sharpness.per_task
        derivative, method_grads = self._probe(mean_losses if per_task_sharpness else at_gradients, ids)
        if self.mode == "rows":
            if self.grad_scale != 1.0:
                self.row_buffer["rows"].div_(self.grad_scale)
            if self._transforms:
                point = self._transform_derivative(at_gradients) if self.sharpness is not None else derivative
                self._apply_transform(rows=derivative, private=point)
            self._combine_rows(mean_losses)
        elif self.mode == "combined":
            self._record_combined_weights()
        self._assign_plain_grads()
        self._assign_method_grads(method_grads)
        if self.mode == "rows" and self.skip_non_finite and not scaler_active:
            if not self._finite_update():
                self._skip_step()
                return
        self._losses_after_step_pending = self.method.needs_losses_after_step

    def _finite(self, mean_losses: Tensor) -> bool:
        """Whether the losses and every gradient of the step are finite: one sum over the buffer (an inf or NaN
        anywhere makes it non-finite; no temporary of the buffer's size), one synchronisation."""
        total = self.buffer.flat.sum() + mean_losses.sum()
        if self.row_buffer is not self.buffer:
            total = total + self.row_buffer.flat.sum().float()  # no float32 copy of the reduced-precision rows
        if self.sharded is not None:  # this rank's shards: decided on all ranks together
            return self.sharded.all_finite(total)
        return bool(torch.isfinite(total))

    def _finite_update(self) -> bool:
        """Whether every problem's update is finite (a solver may fail on finite rows)."""
        if not self._update_sums:
            return True
        if self.sharded is not None:
            return self.sharded.all_finite(torch.stack(self._update_sums).sum())
        return bool(torch.isfinite(torch.stack(self._update_sums)).all())

    def _skip_step(self) -> None:
        """A non-finite gradient without a GradScaler: no parameter gets a gradient (the optimizer leaves every
        weight, moment and step count as it is), the method's state is not touched, and the skip is counted."""
        for p in self.model_params + self.method_params:
            p.grad = None
        self.skipped_steps += 1
        self._skipped_since_log += 1
        self.last_step_skipped = True
        self._losses_after_step_pending = False
        logger.warning(
            f"step {self.step}: a task loss or gradient is not finite; the step is skipped ({self.skipped_steps} so far)"
        )

    def _probe(self, mean_losses: Tensor, ids: Tensor | None) -> tuple[Tensor | None, list[Tensor | None]]:
        """At the step's global mean losses ``L̄``: the derivative of each elementwise transform ``T_i'(L̄_i)`` (None
        without a transform) and the gradient of the method's parameters, from ``Σ_i T_i(L̄_i)`` (Jacobian methods)
        or ``C(T(L̄))`` (loss weighting)."""
        if not self._transforms and not self.method_params:
            return None, []
        probe = mean_losses.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            transformed = self.method.transform_losses(probe, task_ids=ids)
            if not self.method.requires_jacobian:
                generator = step_generator(self.seed, _METHOD_SALT, self.step, -1)
                objective = self.method.combine_losses(transformed, task_ids=ids, generator=generator)
            else:
                objective = transformed.sum()
            grads = torch.autograd.grad(objective, [probe, *self.method_params], allow_unused=True)
        derivative = grads[0].detach() if self._transforms and self.mode != "combined" else None
        return derivative, list(grads[1:])

    def _apply_transform(self, *, rows: Tensor, private: Tensor) -> None:
        """Chain rule of the elementwise transform: task i's rows times ``T_i'`` at the losses where they were taken
        (``rows``), its private gradients (and a sharpness variant's rows) at the gradients' point (``private``)."""
        for position, task in enumerate(self.present):
            for pairs, factor in (
                (self.row_pairs(task), rows[position]),
                (self.plain_pairs(self.task_private_indices[task]), private[position]),
            ):
                if pairs:
                    torch._foreach_mul_([v for _, v in pairs], factor.to(pairs[0][1].dtype))
        if self.sharpness is not None:
            self.sharpness.apply_transform(self, private)

    def _combine_rows(self, mean_losses: Tensor) -> None:
        position = {t: i for i, t in enumerate(self.present)}
        self._update_sums: list[Tensor] = []
        for index, problem in enumerate(self.problems):
            names = [t for t in problem.tasks if t in position]
            params = [p for _, p in problem.block.params]
            if not names:
                for p in params:
                    p.grad = None
                continue
            rows_all = self.block_rows(problem)
            rows = rows_all if len(names) == len(problem.tasks) else rows_all[[problem.tasks.index(t) for t in names]]
            ids = self.task_subset([self.task_ids[t] for t in names])
            generator = step_generator(self.seed, _METHOD_SALT, self.step, -1 - index)
            losses = mean_losses[[position[t] for t in names]]
            if self._transforms:
                losses = self.method.transform_losses(losses, task_ids=ids).detach()
            if not self._finite_tensor(rows):
                update = torch.full((problem.size,), float("nan"), device=rows.device)  # the GradScaler skips
            elif self.sharpness is not None:
                update = self.sharpness.combine(
                    self, problem, names, rows, losses=losses, task_ids=ids, generator=generator
                )
            else:
                update = self.aggregate(problem.method, rows, losses=losses, task_ids=ids, generator=generator)
            self._update_sums.append(update.sum())
            self._auxiliary_backward(problem.method)
            self._record_problem_weights(problem, names, problem.method.last_weights)
            if self.rows_dtype == torch.float32:
                target = rows_all[0]  # the rows are not needed any more: the update takes the first one's place
                torch.mul(update, self.grad_scale, out=target)
            else:  # reduced-precision rows: the float32 update of `aggregate` itself becomes the gradient
                target = update.float().mul_(self.grad_scale)
            for p, view in zip(params, views(target, params)):
                p.grad = self._as_grad(p, view)

    def _finite_tensor(self, tensor: Tensor) -> bool:
        if not self.grad_scale != 1.0:
            return True  # checked once for the whole buffer (or the step is skipped)
        if self.sharded is not None:
            return self.sharded.all_finite(tensor.sum().float())
        return bool(torch.isfinite(tensor.sum().float()))

    def aggregate(
        self,
        method: GradientMethod,
        rows: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``method.aggregate(rows)``; for reduced-precision rows and a Gramian method, the Gramian and the update
        are formed in float32 column chunks, never as a float32 copy of the rows. Under FSDP ``rows`` are this rank's
        column shard and the Gramian is summed over the ranks (``G = Σ_s J_s J_sᵀ``)."""
        if self.sharded is None and (
            rows.dtype == torch.float32
            or not (isinstance(method, GramianMethod) and type(method).aggregate is GramianMethod.aggregate)
        ):
            return method.aggregate(rows, losses=losses, task_ids=task_ids, generator=generator)
        gramian = torch.zeros(rows.shape[0], rows.shape[0], device=rows.device)
        for start in range(0, rows.shape[1], _CHUNK):
            chunk = rows[:, start : start + _CHUNK].float()
            gramian += chunk @ chunk.T
        if self.sharded is not None:
            self.sharded.all_reduce_gramian(gramian)
        weights = method.weights_from_gramian(gramian, losses=losses, task_ids=task_ids, generator=generator)
        weights = weights.to(device=rows.device, dtype=torch.float32)
        method.last_weights = weights.detach()
        update = torch.empty(rows.shape[1], device=rows.device)
        for start in range(0, rows.shape[1], _CHUNK):
            update[start : start + _CHUNK] = weights @ rows[:, start : start + _CHUNK].float()
        return update

    def _auxiliary_backward(self, method: GradientMethod) -> None:
        """A method's auxiliary loss (GradNorm's balance loss) trains its own parameters."""
        loss = getattr(method, "auxiliary_loss", None)
        if loss is None or not self.method_params:
            return
        grads = torch.autograd.grad(loss, self.method_params, allow_unused=True)
        for p, g in zip(self.method_params, grads):
            if g is None:
                continue
            g = g * self.grad_scale
            p.grad = g if p.grad is None else p.grad + g
        method.auxiliary_loss = None

    def _assign_plain_grads(self) -> None:
        touched = sorted({i for t in self.present for i in self.task_plain_indices[t]})
        touched_set = set(touched)
        for index, (p, view) in enumerate(zip(self.plain_params, self.plain_views)):
            if index in touched_set:
                p.grad = self._as_grad(p, view)
            else:
                p.grad = None

    def _as_grad(self, param: nn.Parameter, view: Tensor) -> Tensor:
        """The ``.grad`` of ``param`` from its view: the view itself (float32), a copy in its dtype, or under FSDP a
        `DTensor` with the view as this rank's shard."""
        if self.sharded is not None:
            return self.sharded.as_grad(param, view)
        return view if param.dtype == torch.float32 else view.to(param.dtype)

    def _assign_method_grads(self, method_grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(self.method_params, method_grads):
            if g is None:
                continue
            g = g.detach() * self.grad_scale
            p.grad = g if p.grad is None else p.grad + g

    def _record_problem_weights(self, problem: Problem, names: Sequence[str], weights: Tensor | None) -> None:
        if weights is None or weights.numel() != len(names):
            return
        for name, value in zip(names, weights.detach().float().tolist()):
            entry = problem.weight_sums.setdefault(name, [0.0, 0.0])
            entry[0] += value
            entry[1] += 1.0

    def _record_combined_weights(self) -> None:
        weights = self.method.last_weights
        if weights is None and self._loss_weights is not None:
            weights = self._loss_weights
        if weights is None or weights.numel() != len(self.present):
            return
        for name, value in zip(self.present, weights.detach().float().tolist()):
            entry = self._combined_weight_sums.setdefault(name, [0.0, 0.0])
            entry[0] += value
            entry[1] += 1.0

    def after_optimizer_step(self, model: nn.Module) -> None:
        """FAMO-style methods: recompute the window's losses after the optimizer step and let the method learn."""
        if not self._losses_after_step_pending:
            return
        self._losses_after_step_pending = False
        num_tasks = len(self.task_names)
        after = torch.zeros(num_tasks, device=self.device)
        with torch.no_grad():
            for index, batch in enumerate(self.window_batches):
                for task, loss in self.forward_losses(model, batch, index).losses.items():
                    after[self.task_ids[task]] += loss
        all_reduce_sum(after)
        present_ids = [self.task_ids[t] for t in self.present]
        before = self.loss_sums[present_ids]
        ids = self.task_subset(present_ids)
        for method in self.methods:
            method.after_optimizer_step(before, after[present_ids], task_ids=ids)

    # ------------------------------------------------------------------ state and logs
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the step: each problem's method state, the sharpness variant's, the count
        of skipped steps. The trainer saves it as ``mtl_state.pt``."""
        state: dict[str, Any] = {
            "method_name": self.method.name,
            "mode": self.mode,
            "problems": [problem.name for problem in self.problems],
            "methods": [problem.method.state_dict() for problem in self.problems] or [self.method.state_dict()],
            "skipped_steps": self.skipped_steps,
        }
        if self.sharpness is not None:
            state["sharpness"] = self.sharpness.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method_name") != self.method.name:
            raise ValueError(
                f"the checkpoint was trained with `mtl_method`={state.get('method_name')!r}, not {self.method.name!r}"
            )
        problems = [problem.name for problem in self.problems]
        if list(state.get("problems", [])) != problems:
            raise ValueError(
                f"the checkpoint's method problems {state.get('problems')} are not this run's {problems} "
                "(did the tasks, `mtl_blocks` or `mtl_jacobian_mode` change?)"
            )
        targets = [problem.method for problem in self.problems] or [self.method]
        for method, method_state in zip(targets, state["methods"]):
            method.load_state_dict(method_state)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.sharpness is not None and "sharpness" in state:
            self.sharpness.load_state_dict(state["sharpness"])

    def pop_logs(self) -> dict[str, float]:
        """``loss/<task>`` and ``weight/<task>`` averaged over the steps since the last call (a task in several
        problems: ``weight/<problem>/<task>``), and ``mtl/skipped_steps`` when steps were skipped."""
        logs: dict[str, float] = {}
        for name, (loss_sum, count) in self._log_sums.items():
            if count:
                logs[f"loss/{name}"] = round(loss_sum / count, 6)
            self._log_sums[name] = [0.0, 0.0]
        memberships: dict[str, int] = {}
        for problem in self.problems:
            for task in problem.tasks:
                memberships[task] = memberships.get(task, 0) + 1
        for problem in self.problems:
            for task, (total, count) in problem.weight_sums.items():
                key = f"weight/{task}" if memberships.get(task, 0) == 1 else f"weight/{problem.name}/{task}"
                logs[key] = round(total / count, 6)
            problem.weight_sums.clear()
        for task, (total, count) in self._combined_weight_sums.items():
            logs[f"weight/{task}"] = round(total / count, 6)
        self._combined_weight_sums.clear()
        if self._skipped_since_log:
            logs["mtl/skipped_steps"] = float(self._skipped_since_log)
            self._skipped_since_log = 0
        return logs


def _drain_into(sink: dict[int, Tensor]) -> Any:
    """A post-accumulate-grad hook: moves a parameter's fresh ``.grad`` into its view in ``sink`` (when it has one)."""

    def drain(param: nn.Parameter) -> None:
        view = sink.get(id(param))
        if view is not None and param.grad is not None:
            view.add_(param.grad)
            param.grad = None

    return drain

"""Gradient-conflict diagnostics during training, as a `transformers.TrainerCallback`.

`GradientDiagnosticsCallback` measures, every N optimizer steps, how the gradients of the tasks that
share parameters relate: the measures of Elich et al., "Examining Common Paradigms in Multi-Task
Learning" (arXiv 2311.04698, §4.2 and App. A3.2), inter-task (the same samples, two tasks) and
inter-sample (the same task, two samples). `MultiTaskTrainer` adds it when
``mtl_diagnostics_steps > 0``; with the default 0 nothing is registered and training costs nothing
more.

Each measurement draws a fresh probe of ``mtl_diagnostics_samples`` random training rows per task group
(seeded by the run's seed and the step), runs its own forward and backward passes on them with the
model in eval mode (no dropout; the training's gradients, ``.grad``, random state and batches are left
alone, so the run is the same with and without diagnostics), and for each block of shared parameters
(`hf_mtl.engine.parameter_blocks`: the parameters the same set of tasks reaches, e.g. the speech
encoder for digit + speaker) computes

- **inter-task**, from each task's gradient of its mean loss over the probe (what a gradient method
  combines): the cosine matrix ``S_cos``, the magnitude similarity ``S_mag = 2|g||g'| / (|g|² + |g'|²)``,
  the ratio of conflicting gradient parameters (the fraction of coordinates with opposite signs) and
  the fraction of task pairs with ``S_cos < 0`` (`hf_mtl.metrics.gradient_conflict`);
- **inter-task per sample**, when the block's tasks label the same rows: the same measures between the
  task gradients of each probe sample alone (Elich et al.'s inter-task pairs);
- **inter-sample**, per task: the same measures between the gradients of its probe samples
  (`hf_mtl.metrics.inter_sample_conflict`).

Scalars go through ``Trainer.log`` (so every ``report_to`` integration receives them) as
``diagnostics/<block>/cosine_mean``, ``.../magnitude_similarity_mean``,
``.../conflicting_parameters_mean`` (means over the pairs) and ``.../conflict_fraction``, the same under
``diagnostics/<block>/inter_task_per_sample/`` and ``diagnostics/<block>/inter_sample/<task>/``, and
``diagnostics/seconds`` (the time the measurement took); ``<block>`` is the ``+``-joined task names.
The full matrices go to ``<output_dir>/mtl_diagnostics.jsonl``, one JSON record per block and
measurement (see `GradientDiagnosticsCallback`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.utils import logging

from .data.loader import fetch_rows
from .data.sampling import step_generator
from .engine import ParameterBlock, parameter_blocks
from .metrics import GradientConflict, gradient_conflict

if TYPE_CHECKING:
    from .trainer import MultiTaskTrainer

logger = logging.get_logger(__name__)

#: The JSON-lines file, inside ``output_dir``, that holds one record per block and measurement.
DIAGNOSTICS_FILE = "mtl_diagnostics.jsonl"
#: How per-sample gradients are computed: see `per_sample_gradients`.
PER_SAMPLE_MODES = ("vmap", "loop")
#: Salt that keeps the probe's generator apart from the task sampler's and the method's.
_PROBE_SALT = 0xD1A6


@dataclass
class ProbeGradients:
    """Gradients of K task losses on a probe of n rows, w.r.t. some parameters (name -> tensor).

    Attributes:
        tasks (`list[str]`): the K tasks, in row order.
        gradients (`dict[str, torch.Tensor]`): parameter name -> ``(K, n + 1, *shape)``: ``[k, s]`` for
            ``s < n`` is the gradient of task k's loss on sample s alone; ``[k, n]`` the gradient of task k's
            loss on the whole probe (its head's loss of the n rows, as a training step computes it).
    """

    tasks: list[str]
    gradients: dict[str, Tensor]

    @property
    def num_samples(self) -> int:
        return next(iter(self.gradients.values())).shape[1] - 1

    def flat(self, names: Sequence[str]) -> Tensor:
        """``(K, n + 1, P)``: the gradients over the parameters ``names``, flattened in that order."""
        k, rows = len(self.tasks), self.num_samples + 1
        return torch.cat([self.gradients[name].reshape(k, rows, -1) for name in names], dim=2)

    def split(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(K, n, P)`` per-sample and ``(K, P)`` whole-probe gradients over the parameters ``names``."""
        flat = self.flat(names)
        return flat[:, :-1], flat[:, -1]


def _batch_size(sub_batch: Mapping[str, Any], tasks: Sequence[str]) -> int:
    return int(sub_batch["labels"][tasks[0]].shape[0])


def _select(value: Any, index: int, size: int) -> Any:
    """Row ``index`` (kept as a batch of one) of every tensor with ``size`` rows in a nested sub-batch."""
    if isinstance(value, Mapping):
        return {key: _select(item, index, size) for key, item in value.items()}
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[index : index + 1]
    return value


def per_sample_gradients(
    model: nn.Module,
    group_key: str,
    sub_batch: Mapping[str, Any],
    tasks: Sequence[str],
    params: Sequence[tuple[str, nn.Parameter]],
    mode: str = "vmap",
) -> ProbeGradients:
    """Per-sample and whole-probe gradients of several task losses on one sub-batch.

    The losses are the heads' own (``model.heads[task].loss``): of each row alone (``logits[s : s + 1]``)
    and of the whole sub-batch. Call it with the model in eval mode: the rows of a sub-batch are then
    independent (no dropout; transformer encoders have no batch statistics), so the loss of row s in a
    batched forward is the loss of row s run alone.

    - ``mode="vmap"`` (`torch.func`): one batched forward through
      `torch.func.functional_call` on the parameters, `torch.func.vjp`, and the vector-Jacobian product
      vectorized with `torch.func.vmap` over the one-hot cotangents of the K (n + 1) losses: every
      per-sample gradient from one forward and one vectorized backward. ``vmap(grad(f))`` over a
      per-sample forward, the textbook form, does not run on Hugging Face encoders: their attention-mask
      code branches on the data (``padding_mask.all()``), Wav2Vec2 builds its feature mask in place, and
      the heads skip missing labels with a data-dependent ``if``; only the backward is vmapped here,
      which they all support.
    - ``mode="loop"``: one forward per sample (the row alone, as a batch of one, with the batch's
      padding) and one `torch.autograd.grad` per task; the fallback when a model's backward cannot be
      vmapped (`GradientDiagnosticsCallback` switches to it for good after a failure, with a warning).
      On a CPU it is as fast (the vmapped backward falls back to a loop for some operators).

    Neither writes ``.grad``.

    Args:
        model (`nn.Module`): a `MultiTaskModel` (eval mode).
        group_key (`str`): the sub-batch's key (``"digit+speaker"``).
        sub_batch (`Mapping`): encoder inputs and ``labels`` (task -> tensor), on the model's device.
        tasks (`Sequence[str]`): the tasks of the sub-batch to differentiate.
        params (`Sequence[tuple[str, nn.Parameter]]`): named parameters to differentiate (the shared ones).
        mode (`str`, *optional*, defaults to `"vmap"`): ``"vmap"`` or ``"loop"``.

    Returns:
        `ProbeGradients`, float32.
    """
    if mode not in PER_SAMPLE_MODES:
        raise ValueError(f"`mode` must be one of {', '.join(PER_SAMPLE_MODES)}; got {mode!r}")
    tasks = list(tasks)
    labels = sub_batch["labels"]
    inputs = {key: value for key, value in sub_batch.items() if key != "labels"}
    n = _batch_size(sub_batch, tasks)
    heads = model.heads
    names = [name for name, _ in params]
    with torch.enable_grad():
        if mode == "vmap":
            from torch.func import functional_call, vjp, vmap

            def losses(primals: dict[str, Tensor]) -> Tensor:
                output = functional_call(model, primals, ({group_key: inputs},), {"tasks": tasks})
                rows = []
                for task in tasks:
                    logits, target, head = output.logits[task], labels[task], heads[task]
                    each = [head.loss(logits[s : s + 1], target[s : s + 1]) for s in range(n)]
                    rows.append(torch.stack([*each, head.loss(logits, target)]).float())
                return torch.stack(rows)  # (K, n + 1)

            primals = {name: param.detach() for name, param in params}
            _, pullback = vjp(losses, primals)
            count = len(tasks) * (n + 1)
            cotangents = torch.eye(count, device=labels[tasks[0]].device).view(count, len(tasks), n + 1)
            with warnings.catch_warnings():
                # operators without a batching rule (CPU attention, weight norm) run in a loop: same numbers
                warnings.filterwarnings("ignore", message="There is a performance drop")
                (grads,) = vmap(pullback)(cotangents)
            gradients = {
                name: grads[name].detach().float().reshape(len(tasks), n + 1, *param.shape) for name, param in params
            }
            return ProbeGradients(tasks=tasks, gradients=gradients)

        tensors = [param for _, param in params]
        gradients = {name: torch.zeros(len(tasks), n + 1, *p.shape, device=p.device) for name, p in params}

        def fill(row: int, output: Any, label_rows: Mapping[str, Tensor]) -> None:
            for k, task in enumerate(tasks):
                loss = heads[task].loss(output.logits[task], label_rows[task])
                grads = torch.autograd.grad(loss, tensors, retain_graph=k < len(tasks) - 1, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        gradients[name][k, row] = grad.detach().float()

        fill(n, model({group_key: inputs}, tasks=tasks), labels)
        for s in range(n):
            fill(s, model({group_key: _select(inputs, s, n)}, tasks=tasks), _select(labels, s, n))
        return ProbeGradients(tasks=tasks, gradients=gradients)


def _scalars(prefix: str, conflicts: Sequence[GradientConflict]) -> dict[str, float]:
    """Logging scalars over the pairs ``i < j`` of one or several results pooled together."""
    cosine = torch.cat([c.pairs(c.cosine) for c in conflicts])
    magnitude = torch.cat([c.pairs(c.magnitude_similarity) for c in conflicts])
    signs = torch.cat([c.pairs(c.conflicting_parameters) for c in conflicts])
    if cosine.numel() == 0:
        return {}
    return {
        f"{prefix}cosine_mean": float(cosine.mean()),
        f"{prefix}magnitude_similarity_mean": float(magnitude.mean()),
        f"{prefix}conflicting_parameters_mean": float(signs.mean()),
        f"{prefix}conflict_fraction": float((cosine < 0).double().mean()),
    }


def _stacked(conflicts: Sequence[GradientConflict]) -> dict[str, Any]:
    """The matrices of one result per sample, as lists over the samples."""
    records = [c.to_dict() for c in conflicts]
    out = {key: [record[key] for record in records] for key in records[0] if key != "conflict_fraction"}
    cosine = torch.cat([c.pairs(c.cosine) for c in conflicts])
    out["conflict_fraction"] = float((cosine < 0).double().mean()) if cosine.numel() else None
    return out


class GradientDiagnosticsCallback(TrainerCallback):
    """Measures inter-task and inter-sample gradient conflict on the shared parameters every N steps.

    See the module docstring for what is measured. A measurement runs at step 0 (before the first
    update) and after every ``every_n_steps``-th optimizer step, on the main process only (the model is
    the same on every rank); it never touches ``.grad``, the training batches or the random state.

    Every measurement appends one JSON line per block to ``<output_dir>/mtl_diagnostics.jsonl``::

        {"step": 10, "epoch": 0.5, "block": "digit+speaker", "tasks": ["digit", "speaker"],
         "num_parameters": 26576, "num_samples": 8, "per_sample": "vmap", "seconds": 0.31,
         "probe_rows": {"digit+speaker": [8 row indices of the training data]},
         "inter_task": {"norms": [K], "cosine": [[K x K]], "magnitude_similarity": [[...]],
                        "conflicting_parameters": [[...]], "conflict_fraction": 0.0},
         "inter_task_per_sample": {"norms": [n x [K]], "cosine": [n x [[K x K]]], ...,
                                   "conflict_fraction": 0.125},
         "inter_sample": {"digit": {"norms": [n], "cosine": [[n x n]], ..., "conflict_fraction": 0.39},
                          "speaker": {...}}}

    ``inter_task_per_sample`` is there when the block's tasks read the same rows (one task group);
    otherwise the tasks' samples differ and only the probe-level ``inter_task`` is measured. ``null``
    stands for NaN. A fresh run starts the file afresh; a resumed one keeps the records up to the step
    it resumes from and appends.

    Blocks with more tasks than ``num_samples`` measure that many tasks, drawn at random each time (Elich
    et al.: "8 random samples or tasks"). Iterable (streaming) task data gives its next rows instead of
    random ones.

    Args:
        trainer (`MultiTaskTrainer`): the trainer (its model, training data, collators, `log`).
        every_n_steps (`int`): measure after every this many optimizer steps (Elich et al.: 5).
        num_samples (`int`, *optional*, defaults to 8): probe rows per task group (at least 2).
        per_sample (`str`, *optional*, defaults to `"vmap"`): how per-sample gradients are computed
            (`per_sample_gradients`).
        file_name (`str`, *optional*, defaults to `"mtl_diagnostics.jsonl"`): the log, inside ``output_dir``.
    """

    def __init__(
        self,
        trainer: MultiTaskTrainer,
        every_n_steps: int,
        num_samples: int = 8,
        per_sample: str = "vmap",
        file_name: str = DIAGNOSTICS_FILE,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"`num_samples` must be an integer >= 2 (pairs of samples), got {num_samples!r}")
        if per_sample not in PER_SAMPLE_MODES:
            raise ValueError(f"`per_sample` must be one of {', '.join(PER_SAMPLE_MODES)}; got {per_sample!r}")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.per_sample = per_sample
        self.file_name = file_name
        self.blocks: list[ParameterBlock] = []
        self._streams: dict[str, Any] = {}

    @property
    def path(self) -> str:
        return os.path.join(self.trainer.args.output_dir, self.file_name)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        trainer = self.trainer
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                "`mtl_diagnostics_steps` needs the whole model on each process; it does not run under FSDP or DeepSpeed"
            )
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.blocks = parameter_blocks(model, list(trainer.tasks))
        if not self.blocks:
            logger.warning("gradient diagnostics: no trainable parameter is shared by two tasks, nothing to measure")
        if state.is_world_process_zero:
            self._start_file(state.global_step)
            if state.global_step == 0:
                self._measure(state, control)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero and state.global_step % self.every_n_steps == 0:
            self._measure(state, control)

    # ------------------------------------------------------------------ the log file
    def _start_file(self, step: int) -> None:
        """A fresh run starts the file afresh; a resumed one keeps the records up to its step."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        kept = []
        if step > 0 and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def _write(self, records: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=False) + "\n")

    # ------------------------------------------------------------------ measuring
    def _probe(self, group: Any, generator: torch.Generator) -> tuple[list[dict[str, Any]], list[int] | None]:
        """``num_samples`` rows of a task group and their indices: random ones, or a stream's next ones (no indices)."""
        if group.is_iterable:
            rows = []
            while len(rows) < self.num_samples:
                stream = self._streams.get(group.key)
                if stream is None:
                    stream = self._streams[group.key] = iter(group.dataset)
                try:
                    rows.append(dict(next(stream)))
                except StopIteration:
                    self._streams.pop(group.key)
                    if not rows:
                        raise ValueError(f"task group {group.key!r}: its data set yields no rows") from None
            return rows, None
        size = len(group.dataset)
        count = min(self.num_samples, size)
        indices = torch.randperm(size, generator=generator)[:count].tolist()
        return fetch_rows(group.dataset, indices), indices

    def measure(self, step: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """One measurement at the model's current weights: the records of every block and the logging
        scalars (neither written nor logged)."""
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        generator = step_generator(trainer.args.seed, _PROBE_SALT, step)
        chosen: dict[tuple[str, ...], list[str]] = {}
        for block in self.blocks:
            tasks = list(block.tasks)
            if len(tasks) > self.num_samples:
                picks = sorted(torch.randperm(len(tasks), generator=generator)[: self.num_samples].tolist())
                tasks = [tasks[i] for i in picks]
            chosen[block.tasks] = tasks
        groups = {task.name: group for group in trainer.train_groups or [] for task in group.tasks}
        probes: dict[str, ProbeGradients] = {}
        probe_rows: dict[str, list[int] | None] = {}
        was_training = model.training
        model.eval()
        try:
            for group in trainer.train_groups or []:
                tasks = [t.name for t in group.tasks if any(t.name in c for c in chosen.values())]
                if not tasks:
                    continue
                param_names = {
                    name for block in self.blocks if set(block.tasks) & set(tasks) for name, _ in block.params
                }
                params = [(name, p) for name, p in model.named_parameters() if name in param_names]
                rows, probe_rows[group.key] = self._probe(group, generator)
                sub_batch = trainer._prepare_inputs({group.key: group.collate(rows)})[group.key]
                probes[group.key] = self._gradients(model, group.key, sub_batch, tasks, params)
        finally:
            model.train(was_training)
        records, scalars = [], {}
        for block in self.blocks:
            tasks = chosen[block.tasks]
            names = [name for name, _ in block.params]
            # one matrix of every gradient of the block, task by task: its n samples, then its whole-probe row;
            # one Gramian and one sign count over it, and each measure is a sub-matrix (`GradientConflict.select`)
            parts, spans, start = [], {}, 0
            for key in dict.fromkeys(groups[t].key for t in tasks):
                probe = probes[key]
                flat = probe.flat(names)
                for task in (t for t in tasks if groups[t].key == key):
                    parts.append(flat[probe.tasks.index(task)])
                    spans[task] = (start, parts[-1].shape[0] - 1)
                    start += parts[-1].shape[0]
            offsets, sizes = [spans[t][0] for t in tasks], [spans[t][1] for t in tasks]
            every = gradient_conflict(torch.cat(parts))
            name = "+".join(block.tasks)
            inter_task = every.select([offset + size for offset, size in zip(offsets, sizes)])
            record: dict[str, Any] = {
                "step": step,
                "block": name,
                "tasks": tasks,
                "num_parameters": block.size,
                "num_samples": min(sizes),
                "per_sample": self.per_sample,
                "probe_rows": {groups[t].key: probe_rows[groups[t].key] for t in tasks},
                "inter_task": inter_task.to_dict(),
            }
            scalars.update(_scalars(f"diagnostics/{name}/", [inter_task]))
            if len({groups[t].key for t in tasks}) == 1:
                each = [every.select([offset + s for offset in offsets]) for s in range(sizes[0])]
                record["inter_task_per_sample"] = _stacked(each)
                scalars.update(_scalars(f"diagnostics/{name}/inter_task_per_sample/", each))
            record["inter_sample"] = {}
            for task, offset, size in zip(tasks, offsets, sizes):
                within = every.select(range(offset, offset + size))
                record["inter_sample"][task] = within.to_dict()
                scalars.update(_scalars(f"diagnostics/{name}/inter_sample/{task}/", [within]))
            records.append(record)
        return records, scalars

    def _gradients(
        self, model: nn.Module, key: str, sub_batch: Mapping[str, Any], tasks: list[str], params: list
    ) -> ProbeGradients:
        if self.per_sample == "vmap":
            try:
                return per_sample_gradients(model, key, sub_batch, tasks, params, mode="vmap")
            except Exception as error:  # an operator without a batching rule, ...: the loop computes the same
                logger.warning(
                    f"gradient diagnostics: the vmapped backward failed on {key!r} ({type(error).__name__}: "
                    f"{error}); per-sample gradients are computed one sample at a time from now on"
                )
                self.per_sample = "loop"
        return per_sample_gradients(model, key, sub_batch, tasks, params, mode="loop")

    def _measure(self, state: Any, control: Any) -> None:
        if not self.blocks:
            return
        start = time.perf_counter()
        records, scalars = self.measure(state.global_step)
        seconds = time.perf_counter() - start
        for record in records:
            record["epoch"] = state.epoch
            record["seconds"] = round(seconds, 4)
        self._write(records)
        scalars["diagnostics/seconds"] = round(seconds, 4)
        # `Trainer.log` ends with `on_log`, which clears `should_log`: keep the step's own logging decision
        should_log = control.should_log
        self.trainer.log(scalars)
        control.should_log = should_log


def read_diagnostics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/mtl_diagnostics.jsonl``, in order (``[]`` when the file is absent)."""
    path = os.path.join(run_dir, DIAGNOSTICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = [
    "DIAGNOSTICS_FILE",
    "GradientDiagnosticsCallback",
    "ProbeGradients",
    "per_sample_gradients",
    "read_diagnostics",
]

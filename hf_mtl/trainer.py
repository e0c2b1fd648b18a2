"""`MultiTaskTrainer`: a `transformers.Trainer` whose step is the multi-task engine's.

The trainer is thin. It builds the multi-task loader (`hf_mtl.data`), the gradient method
(`hf_mtl.methods`) and the engine (`hf_mtl.engine`), and hands every micro-step to the engine; the
ordinary Trainer loop does the rest (gradient clipping, optimizer and scheduler, logging,
checkpoints, callbacks, ``resume_from_checkpoint``, evaluation strategies, ``push_to_hub``).

What it adds to a plain `Trainer`:

- ``train_dataset`` / ``eval_dataset`` map task names to datasets; tasks given the same dataset
  object share one sub-batch (their encoder runs once for all of them).
- ``processing_class`` (or ``data_collator``) maps encoder keys to processors (or collators).
- the method's learnable parameters join the optimizer as their own parameter group;
- the engine's state (each method problem's, F-MTL's flat methods') is saved in every checkpoint
  (``mtl_state.pt``) and restored on resume;
- one optimizer step is one engine window: ``get_batch_samples`` opens it with the step's micro-batches;
- ``loss/<task>`` and ``weight/<task>`` join the training logs; ``evaluate()`` reports
  ``eval_<task>_<metric>``, ``eval_<task>_loss`` and ``eval_loss`` (the mean of the task losses), and
  ``eval_delta_m`` against single-task baselines (``mtl_baselines``), with a progress bar;
- ``predict()`` returns per-task logits and labels (dicts task -> array);
- the final save (``save_model``) writes a Hub-ready folder (`hf_mtl.hub`): the model, each encoder's processor
  and collator options, ``recipe.yaml``, ``eval_results.json``, ``baselines.json`` and the model card, all
  before ``push_to_hub`` uploads it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, PredictionOutput
from transformers.utils import logging

from . import hub
from .baselines import baseline_delta_m, load_baselines, metric_directions
from .data.collators import collator_for, default_collator
from .data.loader import TaskGroup, build_dataloader, check_labels, fetch_rows, group_tasks
from .engine import MultiTaskEngine
from .methods import get_method
from .metrics import resolve_metrics, score_present_labels
from .modeling import MultiTaskModel
from .sharpness import get_sharpness
from .training_args import MultiTaskTrainingArguments

logger = logging.get_logger(__name__)

#: File, inside each checkpoint folder, that holds the method's state.
MTL_STATE_NAME = "mtl_state.pt"
#: Folder, inside a saved model folder, that holds each encoder's processor (``processors/<encoder>``).
PROCESSORS_DIR = hub.PROCESSORS_DIR


class _MultiTaskCallback(TrainerCallback):
    """Runs the method's hooks that follow the optimizer step (FAMO) and the epoch (DWA)."""

    def __init__(self, trainer: MultiTaskTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.trainer.engine.after_optimizer_step(self.trainer.model)

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        for method in self.trainer.engine.methods:
            method.on_epoch_end(int(round(state.epoch or 0)))


class MultiTaskTrainer(Trainer):
    """A `Trainer` for a `MultiTaskModel` trained with a gradient method (and optionally SAM / F-MTL).

    Args:
        model (`MultiTaskModel`):
            The model; its tasks define the task order of the method.
        args (`MultiTaskTrainingArguments`):
            The arguments (`mtl_method`, `task_sampling`, `sam`, ... plus every `TrainingArguments` field).
        train_dataset (`dict[str, Dataset]`, *optional*):
            Task name -> training data: a `datasets.Dataset` (or any map-style dataset of dict rows), or an
            iterable / streaming dataset (then set `max_steps`). Pass the same object for tasks that label the
            same inputs (FSDD's digit and speaker) so that they travel as one sub-batch.
        eval_dataset (`dict[str, Dataset]`, *optional*):
            Task name -> evaluation data (map-style), same conventions.
        processing_class (`dict[str, processor]`, *optional*):
            Encoder key -> tokenizer, image processor or feature extractor; each becomes that encoder's collator
            (`hf_mtl.data.collator_for`) and is saved with the model under ``processors/<encoder>``.
        data_collator (`dict[str, Callable]`, *optional*):
            Encoder key -> a collator (rows -> encoder inputs), overriding `processing_class`.
        task_metrics (`dict[str, list[str | evaluate.EvaluationModule]]`, *optional*):
            Task -> metrics, overriding each `Task.metrics`: built-in names (offline) or any `evaluate` module.
        callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As for `transformers.Trainer`.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        args: MultiTaskTrainingArguments,
        train_dataset: Mapping[str, Any] | None = None,
        eval_dataset: Mapping[str, Any] | None = None,
        processing_class: Mapping[str, Any] | None = None,
        data_collator: Mapping[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] | None = None,
        task_metrics: Mapping[str, Sequence[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MultiTaskTrainingArguments):
            raise ValueError(f"`args` must be a MultiTaskTrainingArguments, got {type(args).__name__}")
        if not isinstance(model, MultiTaskModel):
            raise ValueError(f"`model` must be a MultiTaskModel, got {type(model).__name__}")
        for name, value in (
            ("train_dataset", train_dataset),
            ("eval_dataset", eval_dataset),
            ("processing_class", processing_class),
            ("data_collator", data_collator),
        ):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(
                    f"`{name}` must be a dict keyed by {'encoder' if name in ('processing_class', 'data_collator') else 'task'}, got {type(value).__name__}"
                )
        self.tasks = dict(model.tasks)
        self.processors = dict(processing_class or {})
        unknown = sorted(set(args.task_batch_sizes) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"`task_batch_sizes` names unknown task(s) {unknown}; the tasks are: {', '.join(self.tasks)}"
            )
        self.collators = self._build_collators(model, self.processors, data_collator or {})
        self._heads = model.heads
        self._train_batch_sizes = (dict(args.task_batch_sizes), args.per_device_train_batch_size)
        self.train_groups = self._groups(train_dataset, "train") if train_dataset is not None else None
        self.eval_groups = self._groups(eval_dataset, "eval") if eval_dataset is not None else None
        self.task_metric_modules = self._build_metrics(task_metrics or {})
        #: The single-task baselines of `args.mtl_baselines` (task -> metric -> value), for ``eval_delta_m``.
        self.baselines = load_baselines(args.mtl_baselines) if args.mtl_baselines else None
        if self.baselines is not None and self.eval_groups is not None:  # every evaluated task has one, checked now
            metric_directions(
                self.baselines, self.task_metric_modules, [task.name for g in self.eval_groups for task in g.tasks]
            )
        #: The recipe the run was built from (`hf_mtl.recipes.build_trainer` sets it); saved as ``recipe.yaml``.
        self.recipe = None
        #: The metrics of the last `evaluate()` on the full eval sets; saved as ``eval_results.json`` when they are
        #: the saved weights' (evaluated at the current step, and no best checkpoint loaded since).
        self.last_eval_metrics: dict[str, float] | None = None
        self._last_eval_step: int | None = None
        self._saving_checkpoint = False
        self.method = get_method(args.mtl_method, num_tasks=len(self.tasks), **args.mtl_method_kwargs)
        self.sharpness = (
            get_sharpness(
                args.sam, rho=args.sam_rho, adaptive=args.sam_adaptive, eta=args.sam_eta, scope=args.sam_scope
            )
            if args.sam
            else None
        )
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self._refuse_unsupported_distribution()
        device = next(model.parameters()).device
        self.method.to(device)
        self.engine = MultiTaskEngine(
            model,
            self.method,
            list(self.tasks),
            seed=args.seed,
            sharpness=self.sharpness,
            global_problem=args.mtl_blocks == "global",
            surgery_parameters=args.mtl_surgery_parameters,
            rows_dtype=torch.bfloat16 if args.mtl_rows_dtype == "bfloat16" else torch.float32,
            jacobian_mode=args.mtl_jacobian_mode,
            skip_non_finite=args.mtl_skip_non_finite_steps,
        )
        if self.engine.mode == "gramian" and self.train_groups is not None:
            self.engine._gramian.check_groups(self.train_groups)
        logger.info(f"hf_mtl: {self.engine.describe()}")
        self.add_callback(_MultiTaskCallback(self))
        if args.mtl_diagnostics_steps > 0:
            from .callbacks import GradientDiagnosticsCallback

            self.add_callback(
                GradientDiagnosticsCallback(
                    self,
                    every_n_steps=args.mtl_diagnostics_steps,
                    num_samples=args.mtl_diagnostics_samples,
                    per_sample=args.mtl_diagnostics_per_sample,
                )
            )

    # ------------------------------------------------------------------ set-up
    def _build_collators(
        self, model: MultiTaskModel, processors: Mapping[str, Any], collators: Mapping[str, Callable]
    ) -> dict[str, Callable]:
        encoders = set(model.encoders)
        for name, given in (("processing_class", processors), ("data_collator", collators)):
            unknown = sorted(set(given) - encoders)
            if unknown:
                raise ValueError(
                    f"`{name}` has entries for unknown encoder(s) {unknown}; the encoders are: {', '.join(sorted(encoders))}"
                )
        built: dict[str, Callable] = {}
        for key in model.encoders:
            if key in collators:
                built[key] = collators[key]
            elif key in processors:
                built[key] = collator_for(processors[key])
            else:
                built[key] = _default_collator(key, model.encoders[key])
        return built

    def _groups(self, datasets: Mapping[str, Any], split: str, require_labels: bool = True) -> list[TaskGroup]:
        """Groups the tasks by dataset, checked before any step: every task has data, labels are in range."""
        tasks = [self.tasks[name] for name in self.tasks if name in datasets or split == "train"]
        batch_sizes, default = self._train_batch_sizes if split == "train" else ({}, 1)
        groups = group_tasks(
            tasks,
            datasets,
            batch_sizes=batch_sizes,
            default_batch_size=default,
            collators=self.collators,
            label_collators={name: self._heads[name].collate_labels for name in self.tasks},
            split=split,
        )
        check_labels(groups, self._heads, split=split, require=require_labels)
        return groups

    def _build_metrics(self, task_metrics: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(task_metrics) - set(self.tasks))
        if unknown:
            raise ValueError(f"`task_metrics` names unknown task(s) {unknown}; the tasks are: {', '.join(self.tasks)}")
        return {name: resolve_metrics(task_metrics.get(name, task.metrics)) for name, task in self.tasks.items()}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus one parameter group for the method's learnable parameters."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not self.is_fsdp_enabled:  # under FSDP the group joins after Accelerate's preparation (`create_scheduler`)
            self._add_method_parameters(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The Trainer's scheduler. Under FSDP the method's parameter group joins the optimizer here, after Accelerate's
        FSDP2 preparation (which maps every optimizer parameter to a sharded model parameter) and before the scheduler
        reads the groups."""
        if self.is_fsdp_enabled:
            self._add_method_parameters(optimizer if optimizer is not None else self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def _add_method_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        method_params = [p for p in self.method.parameters() if p.requires_grad]
        if method_params and not any(
            p is q for group in optimizer.param_groups for q in group["params"] for p in method_params
        ):
            lr = self.args.mtl_method_learning_rate
            optimizer.add_param_group(
                {"params": method_params, "weight_decay": 0.0, "lr": self.args.learning_rate if lr is None else lr}
            )

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The multi-task loader (`hf_mtl.data.build_dataloader`), sharded for this rank.

        Not handed to ``accelerator.prepare``: it shards every group itself and every rank draws the same
        tasks in the same step; batches reach the device through `_prepare_inputs`.
        """
        if self.train_groups is None:
            raise ValueError("training requires a `train_dataset` (a dict task -> dataset)")
        args = self.args
        if any(group.is_iterable for group in self.train_groups) and args.max_steps <= 0:
            streams = [group.key for group in self.train_groups if group.is_iterable]
            raise ValueError(f"task group(s) {streams} stream iterable datasets, which have no length: set `max_steps`")
        return build_dataloader(
            self.train_groups,
            sampling=args.task_sampling,
            seed=args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
            drop_last=args.dataloader_drop_last,
            temperature=args.sampling_temperature,
            num_epochs=max(1, math.ceil(args.num_train_epochs)),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
        )

    # ------------------------------------------------------------------ the step
    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], None]:
        """The Trainer's prefetch of one optimizer step's micro-batches, opened as the engine's window: the batches
        go to the device, every task's labelled items are counted over the window and the ranks (each task's loss
        is normalised by its own count, as the Trainer's ``num_items_in_batch``), and a sharpness variant can
        replay the same micro-batches at its perturbed weights."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        batches = [self._prepare_inputs(batch) for batch in batches]
        if batches:
            scaler = getattr(self.accelerator, "scaler", None)
            # `scaler.scale` (not `get_scale`) creates the scaler's state on the first step, as a backward of
            # `scaler.scale(loss)` would; the engine multiplies every loss by this factor itself
            grad_scale = (
                float(scaler.scale(torch.ones((), device=self.args.device)))
                if scaler is not None and scaler.is_enabled()
                else 1.0
            )
            self._bind_engine_to_sharded_model()
            self.engine.begin_window(self.model, batches, step=self.state.global_step, grad_scale=grad_scale)
        return batches, None

    def _bind_engine_to_sharded_model(self) -> None:
        """Under Accelerate's FSDP2 the model's parameters are replaced by sharded ones when training starts (after
        the engine was built): the engine is rebuilt once over them, with its state (`hf_mtl.engine.fsdp`)."""
        if not self.is_fsdp_enabled or self.engine.sharded is not None:
            return
        model = self.accelerator.unwrap_model(self.model)
        self.method.to(self.args.device)
        self.engine = self.engine.rebuilt(model)
        if self.engine.sharded is None:
            raise ValueError(
                "Accelerate's FSDP plugin is on, but the model's trainable parameters are not sharded DTensors after "
                "its preparation: hf_mtl runs FSDP2 (`fsdp_config={'fsdp_version': 2}`) only"
            )
        logger.info(f"hf_mtl: {self.engine.describe()}")

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One micro-step through the engine; at the sync step the engine also reduces, combines and writes ``.grad``.

        Returns this micro-step's share of the logged loss (the mean over tasks of their mean losses over the
        step): the Trainer sums the shares of the micro-steps."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        # every backward runs without DDP's reducer: the engine reduces the flat buffer itself, and calls the model
        # itself (DDP's forward would pass the outputs through its unused-parameter sink, which cuts the shared
        # features that representation methods differentiate off the losses); under FSDP each backward reduce-scatters
        # (the engine keeps the sync on), so no `no_sync`
        sync = self.accelerator.no_sync(model) if self.engine.sharded is None else contextlib.nullcontext()
        with sync, self.compute_loss_context_manager():
            loss = self.engine.micro_step(self.accelerator.unwrap_model(model), inputs, step=self.state.global_step)
        if self.accelerator.sync_gradients:
            self.engine.finalize()
        return loss

    def _refuse_unsupported_distribution(self) -> None:
        """Refuses at start what cannot run exactly, with what to use instead (`hf_mtl.engine.fsdp`): DeepSpeed, and
        under FSDP the methods that need whole rows, the SAM variants, FSDP1, ..."""
        from accelerate.utils import DistributedType

        from .engine.fsdp import distribution_refusal

        kind = self.accelerator.distributed_type
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        refusal = distribution_refusal(
            kind,
            method=self.method,
            sharpness=self.sharpness,
            jacobian_mode=self.args.mtl_jacobian_mode,
            fsdp_version=getattr(plugin, "fsdp_version", None),
            saves_optimizer=self.args.save_strategy != "no" and not self.args.save_only_model,
        )
        if refusal is not None:
            raise ValueError(refusal)
        if self.args.fsdp and kind != DistributedType.FSDP:
            logger.warning(
                f"`fsdp` is set but Accelerate runs {kind} (it enables FSDP on accelerators only): the run is "
                "data-parallel, every rank holds the full parameters"
            )

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.engine.pop_logs())
        super().log(logs, start_time)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP estimate (``state.total_flos``) for a multi-task batch: its rule, 6 x input
        tokens x non-embedding parameters (forward and backward), per sub-batch with that sub-batch's encoder,
        summed. Heads, extra backwards and SAM's second pass are not counted."""
        model = self.accelerator.unwrap_model(self.model)
        total = 0
        for key, sub_batch in inputs.items():
            encoder = model.encoders[model.tasks[key.split("+")[0]].encoder]
            main_input = getattr(encoder, "main_input_name", "input_ids")
            if main_input in sub_batch and hasattr(encoder, "num_parameters"):
                total += 6 * sub_batch[main_input].numel() * encoder.num_parameters(exclude_embeddings=True)
        return total

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset: Mapping[str, Any] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Runs every task's eval set and returns ``{prefix}_<task>_<metric>``, ``{prefix}_<task>_loss``,
        ``{prefix}_loss`` (the mean of the task losses) and, with `mtl_baselines`, ``{prefix}_delta_m`` (Δm% against
        the single-task baselines, `hf_mtl.baselines`; lower is better). Each rank evaluates its shard; results are
        gathered. A progress bar follows the batches (``disable_tqdm`` turns it off, as for the Trainer's)."""
        groups = self._groups(eval_dataset, "eval") if eval_dataset is not None else self.eval_groups
        if groups is None:
            raise ValueError("evaluation requires an `eval_dataset` (a dict task -> dataset)")
        collected = self._evaluation_pass(groups, keep_logits=False)
        metrics = self._task_metrics(collected, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if eval_dataset is None and metric_key_prefix == "eval":
            self.last_eval_metrics, self._last_eval_step = dict(metrics), self.state.global_step
        return metrics

    def predict(
        self,
        test_dataset: Mapping[str, Any],
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> PredictionOutput:
        """Runs every task's data set and returns a `transformers.trainer_utils.PredictionOutput` whose
        ``predictions`` and ``label_ids`` are dicts task -> array, in the data set's row order: the logits
        (N, C) (token classification: (N, T, C), padded with -100 to the longest row) and the collated labels
        (``None`` for a task whose data has no label column), and ``metrics`` as `evaluate` reports them with
        ``metric_key_prefix`` (for the tasks that have labels)."""
        if not isinstance(test_dataset, Mapping):
            raise ValueError(f"`test_dataset` must be a dict task -> dataset, got {type(test_dataset).__name__}")
        groups = self._groups(test_dataset, "test", require_labels=False)
        collected = self._evaluation_pass(groups, keep_logits=True)
        metrics = self._task_metrics({t: c for t, c in collected.items() if c["references"]}, metric_key_prefix)
        predictions, label_ids = {}, {}
        for task, store in collected.items():
            order = np.argsort(np.asarray(store["indices"]), kind="stable")
            predictions[task] = _stack_padded([store["logits"][i] for i in order])
            label_ids[task] = _stack_padded([store["labels"][i] for i in order]) if store["labels"] else None
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=predictions, label_ids=label_ids, metrics=metrics)

    def _evaluation_pass(self, groups: Sequence[TaskGroup], keep_logits: bool) -> dict[str, dict[str, list]]:
        """One no-grad pass over every group's rows (this rank's stride): task -> predictions and references
        (what the metrics compare: present labels only for token classification), loss sums and counts, and, with
        ``keep_logits``, each row's logits, labels and index. Gathered over the ranks."""
        from accelerate.utils import gather_object

        model = self.model
        was_training = model.training
        model.eval()
        batch_size = self.args.eval_batch_size
        plan = [
            (group, list(range(self.args.process_index, len(group.dataset), self.args.world_size))) for group in groups
        ]
        # the Trainer's progress bar (ProgressCallback) counts the batches of `callback_handler.eval_dataloader`
        self.callback_handler.eval_dataloader = range(sum(math.ceil(len(indices) / batch_size) for _, indices in plan))
        collected: dict[str, dict[str, list]] = {}
        for group, indices in plan:
            for start in range(0, len(indices), batch_size):
                batch_indices = indices[start : start + batch_size]
                rows = fetch_rows(group.dataset, batch_indices)
                sub_batch = self._prepare_inputs(group.collate(rows))
                with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                    outputs = model({group.key: sub_batch}, tasks=[task.name for task in group.tasks])
                for task in group.tasks:
                    store = collected.setdefault(task.name, _empty_store())
                    head = model.heads[task.name]
                    logits = outputs.logits[task.name].float()
                    labels = sub_batch["labels"].get(task.name)
                    if keep_logits:
                        store["indices"].extend(batch_indices)
                        store["logits"].extend(list(logits.cpu().numpy()))
                        if labels is not None:
                            store["labels"].extend(list(labels.cpu().numpy()))
                    if labels is None:
                        continue
                    predictions, references = head.metric_inputs(
                        head.predictions(logits).cpu().numpy(), labels.cpu().numpy()
                    )
                    store["predictions"].extend(list(predictions))
                    store["references"].extend(list(references))
                    if task.name in outputs.losses:
                        store["loss"].append(float(outputs.losses[task.name]) * len(rows))
                        store["count"].append(len(rows))
                self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
            if self.engine.sharded is not None:
                # FSDP: each forward all-gathers parameters, so every rank runs as many forwards (results unused)
                per_rank = math.ceil(math.ceil(len(group.dataset) / self.args.world_size) / batch_size)
                for _ in range(per_rank - math.ceil(len(indices) / batch_size)):
                    with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                        model({group.key: self._prepare_inputs(group.collate(fetch_rows(group.dataset, [0])))})
        if self.args.world_size > 1:
            gathered = gather_object([collected])
            merged: dict[str, dict[str, list]] = {}
            for part in gathered:
                for task, store in part.items():
                    target = merged.setdefault(task, _empty_store())
                    for key in target:
                        target[key].extend(store[key])
            collected = merged
        if was_training:
            model.train()
        return collected

    def _task_metrics(self, collected: Mapping[str, Mapping[str, list]], prefix: str) -> dict[str, float]:
        """``{prefix}_<task>_<metric>``, ``{prefix}_<task>_loss``, ``{prefix}_loss`` and ``{prefix}_delta_m``."""
        metrics: dict[str, float] = {}
        task_losses = []
        for task_name in self.tasks:
            if task_name not in collected:
                continue
            store = collected[task_name]
            predictions, references = np.asarray(store["predictions"]), np.asarray(store["references"])
            for key, value in score_present_labels(
                self._heads[task_name], predictions, references, self.task_metric_modules[task_name]
            ).items():
                metrics[f"{prefix}_{task_name}_{key}"] = value
            if store["count"]:
                task_loss = sum(store["loss"]) / sum(store["count"])
                metrics[f"{prefix}_{task_name}_loss"] = task_loss
                task_losses.append(task_loss)
        if task_losses:
            metrics[f"{prefix}_loss"] = float(np.mean(task_losses))
        if self.baselines is not None:
            evaluated = [task for task in self.tasks if task in collected]
            directions = metric_directions(self.baselines, self.task_metric_modules, evaluated)
            metrics[f"{prefix}_delta_m"] = baseline_delta_m(metrics, self.baselines, directions, prefix)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):  # noqa: ANN201
        """`Trainer.train`, refusing to write into a non-empty `output_dir` unless told to (or resuming); saves
        ``trainer_state.json`` (`save_state`) into `output_dir` at the end."""
        output_dir = self.args.output_dir
        if (
            not resume_from_checkpoint
            and not self.args.overwrite_output_dir
            and output_dir
            and os.path.isdir(output_dir)
            and os.listdir(output_dir)
        ):
            raise ValueError(
                f"`output_dir` {output_dir!r} already exists and is not empty; pass `resume_from_checkpoint` to continue "
                "that run, `overwrite_output_dir=True` to write into it anyway, or choose another `output_dir`"
            )
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.save_state()  # `trainer_state.json` (the log history) beside the final model, for `hf-mtl report`
        return output

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.mtl_state_dict(), os.path.join(folder, MTL_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MTL_STATE_NAME)
        if os.path.isfile(path):
            self.load_mtl_state_dict(
                torch.load(path, map_location=next(self.model.parameters()).device, weights_only=False)
            )
        else:
            logger.warning(f"{resume_from_checkpoint} has no {MTL_STATE_NAME}: the method's state starts afresh")

    def mtl_state_dict(self) -> dict[str, Any]:
        """The engine's state (each method problem's, the sharpness variant's), for checkpoints."""
        return self.engine.state_dict()

    def load_mtl_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save`, plus each encoder's processor and collator options (``processors/<encoder>/``); the
        final save (not a checkpoint) also writes ``recipe.yaml``, ``eval_results.json``, ``baselines.json`` and
        the model card (`hf_mtl.hub`), so that the folder is complete before `push_to_hub` uploads it."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self._save_encoder_files(output_dir)
        if not self._saving_checkpoint:
            hub.write_run_files(
                output_dir,
                recipe=self.recipe,
                eval_results=self.last_eval_metrics if self._last_eval_step == self.state.global_step else None,
                baselines=self.args.mtl_baselines,
                settings=hub.training_settings(self.args),
                repo_id=self.hub_model_id,
            )

    def _load_best_model(self) -> None:
        """`Trainer._load_best_model`; the last evaluation is then not the loaded weights' any more."""
        super()._load_best_model()
        self._last_eval_step = None

    def _save_encoder_files(self, output_dir: str) -> None:
        datasets = {}
        for group in self.train_groups or []:
            datasets.setdefault(group.encoder, group.dataset)
        for key, collator in self.collators.items():
            rate = hub.observed_sampling_rate(collator, datasets.get(key))
            hub.save_encoder_files(output_dir, key, collator, self.processors.get(key), sampling_rate=rate)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes the hf_mtl model card (`hf_mtl.hub.build_model_card`) to ``output_dir/README.md``, which
        `push_to_hub` then uploads: tasks and their data, encoders, method and SAM settings, per-task metrics,
        Δm against the baselines, the command that reproduces the run. The arguments are the Trainer's; the
        ones a multi-task card has no place for (``finetuned_from``, ``tasks``, ``dataset*``) are ignored."""
        if not self.is_world_process_zero():
            return
        hub.write_model_card(
            self.args.output_dir,
            repo_id=self.hub_model_id,
            settings=hub.training_settings(self.args),
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`Trainer._push_from_checkpoint` (``hub_strategy`` pushes during training), with the processors,
        collator options and recipe copied beside the model files it copies, so that every pushed revision loads."""
        if self.is_world_process_zero() and self.args.should_save:
            self._save_encoder_files(self.args.output_dir)
            if self.recipe is not None:
                with open(os.path.join(self.args.output_dir, hub.RECIPE_NAME), "w", encoding="utf-8") as f:
                    f.write(self.recipe.to_yaml())
        super()._push_from_checkpoint(checkpoint_folder)


def _default_collator(key: str, encoder: nn.Module) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The collator of an encoder that got no processor (`hf_mtl.data.default_collator`)."""
    return default_collator(encoder)


def _empty_store() -> dict[str, list]:
    return {"predictions": [], "references": [], "loss": [], "count": [], "indices": [], "logits": [], "labels": []}


def _stack_padded(rows: Sequence[np.ndarray], pad_value: float = -100) -> np.ndarray:
    """Rows of one shape stacked; rows of different lengths (token classification) padded to the longest
    with ``pad_value`` first, as the Trainer pads predictions across batches."""
    if not rows:
        return np.zeros((0,))
    shapes = {row.shape for row in rows}
    if len(shapes) == 1:
        return np.stack(rows)
    length = max(row.shape[0] for row in rows)
    out = np.full((len(rows), length, *rows[0].shape[1:]), pad_value, dtype=np.result_type(*rows))
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out

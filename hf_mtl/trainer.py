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
- the method's state (and F-MTL's second method's) is saved in every checkpoint (``mtl_state.pt``) and
  restored on resume;
- ``loss/<task>`` and ``weight/<task>`` join the training logs; ``evaluate()`` reports
  ``eval_<task>_<metric>``, ``eval_<task>_loss`` and ``eval_loss`` (the mean of the task losses).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .data.collators import SpeechCollator, VisionCollator, collator_for
from .data.loader import TaskGroup, build_dataloader, check_labels, fetch_rows, group_tasks
from .engine import MultiTaskEngine
from .methods import get_method
from .metrics import compute_task_metrics, resolve_metrics
from .modeling import MultiTaskModel
from .sharpness import get_sharpness
from .training_args import MultiTaskTrainingArguments

logger = logging.get_logger(__name__)

#: File, inside each checkpoint folder, that holds the method's state.
MTL_STATE_NAME = "mtl_state.pt"
#: Folder, inside a saved model folder, that holds each encoder's processor (``processors/<encoder>``).
PROCESSORS_DIR = "processors"


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
        self.method = get_method(args.mtl_method, num_tasks=len(self.tasks), **args.mtl_method_kwargs)
        self.sharpness = (
            get_sharpness(args.sam, rho=args.sam_rho, adaptive=args.sam_adaptive, eta=args.sam_eta)
            if args.sam
            else None
        )
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        device = next(model.parameters()).device
        self.method.to(device)
        self.engine = MultiTaskEngine(model, self.method, list(self.tasks), seed=args.seed, sharpness=self.sharpness)
        self._micro_index = 0
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

    def _groups(self, datasets: Mapping[str, Any], split: str) -> list[TaskGroup]:
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
        check_labels(groups, self._heads, split=split)
        return groups

    def _build_metrics(self, task_metrics: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(task_metrics) - set(self.tasks))
        if unknown:
            raise ValueError(f"`task_metrics` names unknown task(s) {unknown}; the tasks are: {', '.join(self.tasks)}")
        return {name: resolve_metrics(task_metrics.get(name, task.metrics)) for name, task in self.tasks.items()}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus one parameter group for the method's learnable parameters."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        method_params = [p for p in self.method.parameters() if p.requires_grad]
        if method_params and not any(
            p is q for group in optimizer.param_groups for q in group["params"] for p in method_params
        ):
            lr = self.args.mtl_method_learning_rate
            optimizer.add_param_group(
                {"params": method_params, "weight_decay": 0.0, "lr": self.args.learning_rate if lr is None else lr}
            )
        return optimizer

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
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One micro-step through the engine; at the sync step the engine also reduces, combines and writes ``.grad``."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        scaler = getattr(self.accelerator, "scaler", None)
        # `scaler.scale` (not `get_scale`) creates the scaler's state on the first step, as a backward of
        # `scaler.scale(loss)` would; the engine multiplies every loss by this factor itself
        grad_scale = (
            float(scaler.scale(torch.ones((), device=self.args.device)))
            if scaler is not None and scaler.is_enabled()
            else 1.0
        )
        # every backward runs without DDP's reducer: the engine reduces the flat buffer itself
        with self.accelerator.no_sync(model), self.compute_loss_context_manager():
            loss = self.engine.micro_step(
                model,
                inputs,
                scale=scale,
                step=self.state.global_step,
                micro_index=self._micro_index,
                grad_scale=grad_scale,
            )
        self._micro_index += 1
        if self.accelerator.sync_gradients:
            self.engine.finalize(self.state.global_step)
            self._micro_index = 0
        return loss * scale

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
        """Runs every task's eval set and returns ``{prefix}_<task>_<metric>``, ``{prefix}_<task>_loss`` and
        ``{prefix}_loss`` (the mean of the task losses). Each rank evaluates its shard; results are gathered."""
        groups = self._groups(eval_dataset, "eval") if eval_dataset is not None else self.eval_groups
        if groups is None:
            raise ValueError("evaluation requires an `eval_dataset` (a dict task -> dataset)")
        from accelerate.utils import gather_object

        model = self.model
        was_training = model.training
        model.eval()
        collected: dict[str, dict[str, list]] = {}
        for group in groups:
            size = len(group.dataset)
            indices = list(range(self.args.process_index, size, self.args.world_size))
            batch_size = self.args.eval_batch_size
            for start in range(0, len(indices), batch_size):
                rows = fetch_rows(group.dataset, indices[start : start + batch_size])
                sub_batch = self._prepare_inputs(group.collate(rows))
                with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                    outputs = model({group.key: sub_batch})
                for task in group.tasks:
                    labels = sub_batch["labels"][task.name]
                    head = model.heads[task.name]
                    store = collected.setdefault(
                        task.name, {"predictions": [], "references": [], "loss": [], "count": []}
                    )
                    predictions = head.predictions(outputs.logits[task.name].float()).cpu().numpy()
                    references = labels.cpu().numpy()
                    if task.head == "token_classification":
                        length = min(predictions.shape[1], references.shape[1])
                        predictions, references = predictions[:, :length], references[:, :length]
                        keep = references != -100
                        predictions, references = predictions[keep], references[keep]
                    store["predictions"].extend(list(predictions))
                    store["references"].extend(list(references))
                    if task.name in outputs.losses:
                        store["loss"].append(float(outputs.losses[task.name]) * len(rows))
                        store["count"].append(len(rows))
        if self.args.world_size > 1:
            gathered = gather_object([collected])
            merged: dict[str, dict[str, list]] = {}
            for part in gathered:
                for task, store in part.items():
                    target = merged.setdefault(task, {"predictions": [], "references": [], "loss": [], "count": []})
                    for key in target:
                        target[key].extend(store[key])
            collected = merged
        metrics: dict[str, float] = {}
        task_losses = []
        for task_name in self.tasks:
            if task_name not in collected:
                continue
            store = collected[task_name]
            task = self.tasks[task_name]
            predictions, references = np.asarray(store["predictions"]), np.asarray(store["references"])
            kind = "classification" if task.head == "token_classification" else task.head
            for key, value in compute_task_metrics(
                kind, predictions, references, self.task_metric_modules[task_name]
            ).items():
                metrics[f"{metric_key_prefix}_{task_name}_{key}"] = value
            if store["count"]:
                task_loss = sum(store["loss"]) / sum(store["count"])
                metrics[f"{metric_key_prefix}_{task_name}_loss"] = task_loss
                task_losses.append(task_loss)
        if task_losses:
            metrics[f"{metric_key_prefix}_loss"] = float(np.mean(task_losses))
        if was_training:
            model.train()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
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
        super()._save_checkpoint(model, trial)
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
        """The method's state (and F-MTL's flat-gradient method's), for checkpoints."""
        state = {"method_name": self.args.mtl_method, "method": self.engine.method.state_dict()}
        if self.engine.flat_method is not None and self.engine.flat_method is not self.engine.method:
            state["flat_method"] = self.engine.flat_method.state_dict()
        return state

    def load_mtl_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method_name") != self.args.mtl_method:
            raise ValueError(
                f"the checkpoint was trained with `mtl_method`={state.get('method_name')!r}, not {self.args.mtl_method!r}"
            )
        self.engine.method.load_state_dict(state["method"])
        if "flat_method" in state and self.engine.flat_method is not None:
            self.engine.flat_method.load_state_dict(state["flat_method"])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            for key, processor in self.processors.items():
                if hasattr(processor, "save_pretrained"):
                    processor.save_pretrained(os.path.join(output_dir, PROCESSORS_DIR, key))


def _default_collator(key: str, encoder: nn.Module) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The collator of an encoder that got no processor, from the input it reads (``main_input_name``)."""
    main_input = getattr(encoder, "main_input_name", None)
    if main_input == "pixel_values":
        return VisionCollator()
    if main_input == "input_values":
        return SpeechCollator()
    raise ValueError(
        f"encoder {key!r} reads `{main_input}`: pass its processor in `processing_class` (e.g. "
        f"{{{key!r}: tokenizer}}) or a collator in `data_collator`"
    )

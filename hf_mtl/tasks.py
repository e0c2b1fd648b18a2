"""`Task`: what one task is (a name, the encoder it reads, its head, labels, metrics)."""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field
from typing import Any

_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass
class Task:
    """One task of a multi-task model.

    Args:
        name (`str`):
            Unique task name (letters, digits, ``_`` and ``-``; starts with a letter). Metrics are
            reported as ``eval_<name>_<metric>``, losses as ``loss/<name>``.
        encoder (`str`):
            Key of the encoder (in ``MultiTaskModel.from_encoders``) whose output this task reads.
        head (`str`, *optional*, defaults to `"classification"`):
            Head kind, one of `hf_mtl.list_heads()`: ``classification`` (single label),
            ``multilabel`` (several binary labels, missing ones masked), ``regression``,
            ``token_classification``, or a kind registered with ``@HEADS.register``.
        num_labels (`int`, *optional*):
            Number of classes (classification, token classification), of binary labels
            (multilabel), or of regression targets. Defaults to the length of `label_names` when
            given, else to the head's ``default_num_labels`` (1 for ``regression``, 2 for the others).
        label_column (`str`, *optional*):
            Dataset column holding this task's labels; defaults to ``name``. Several tasks may read
            different columns of the same dataset (they then share one encoder pass).
        metrics (`list[str]`, *optional*):
            Built-in metric names (``accuracy``, ``f1``, ``mse``, ``mae``) reported at evaluation;
            defaults to the head's ``default_metrics``. A user's `evaluate` module can be passed to the trainer.
        label_names (`list[str]`, *optional*):
            Class names in id order (target names for ``regression``), saved in the config for inference
            (`TaskHead.decode`). Labels given as names (``"LOC"``) are encoded with them.
        head_kwargs (`dict`, *optional*):
            Extra head options, e.g. ``{"pooling": "cls"}`` (default ``"mean"``).
    """

    #: Head constructor arguments that the model fills in itself.
    _BUILT_BY_MODEL = ("hidden_size", "num_labels", "dropout")

    name: str
    encoder: str
    head: str = "classification"
    num_labels: int | None = None
    label_column: str | None = None
    metrics: list[str] | None = None
    label_names: list[str] | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .modeling.heads import HEADS  # local import: heads pull in torch

        if not isinstance(self.name, str) or not _TASK_NAME.match(self.name):
            raise ValueError(
                f"`name` of a task must start with a letter and use only letters, digits, '_' and '-', "
                f"got {self.name!r}"
            )
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"task {self.name!r}: `encoder` must be the key of an encoder, got {self.encoder!r}")
        if self.head not in HEADS:
            raise ValueError(
                f"task {self.name!r}: unknown `head` {self.head!r}; valid heads are: {', '.join(HEADS.names())}"
            )
        head_class = HEADS.get(self.head)
        if self.label_names is not None:
            if isinstance(self.label_names, str) or not all(isinstance(n, str) for n in self.label_names):
                raise ValueError(
                    f"task {self.name!r}: `label_names` must be a list of strings, got {self.label_names!r}"
                )
            self.label_names = list(self.label_names)
            duplicates = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            if duplicates:
                raise ValueError(f"task {self.name!r}: `label_names` lists {duplicates} more than once")
        if self.num_labels is None:
            self.num_labels = len(self.label_names) if self.label_names is not None else head_class.default_num_labels
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: `num_labels` must be a positive integer, got {self.num_labels!r}")
        if self.label_column is None:
            self.label_column = self.name
        if not isinstance(self.label_column, str):
            raise ValueError(f"task {self.name!r}: `label_column` must be a column name, got {self.label_column!r}")
        if self.metrics is None:
            self.metrics = list(head_class.default_metrics)
        if not isinstance(self.head_kwargs, dict):
            raise ValueError(f"task {self.name!r}: `head_kwargs` must be a dict, got {self.head_kwargs!r}")
        valid = [
            name
            for name in inspect.signature(head_class.__init__).parameters
            if name not in ("self", *self._BUILT_BY_MODEL)
        ]
        unknown = sorted(set(self.head_kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"task {self.name!r}: unknown `head_kwargs` {unknown} for head {self.head!r}; valid keys are: {', '.join(valid)}"
            )
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(
                f"task {self.name!r}: `label_names` has {len(self.label_names)} names but `num_labels` is {self.num_labels}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """A task from a mapping of its fields; an unknown field raises a `ValueError` naming the valid ones."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown task field(s) {unknown}; valid fields are: {', '.join(sorted(known))}")
        return cls(**data)

"""Task heads: one small registered unit per head kind, which owns everything about its labels.

A head maps the encoder's hidden states (B, T, H) to logits and knows, for its kind of label:

| method | what it does |
| --- | --- |
| ``forward(hidden_states, mask)`` | the logits |
| ``loss(logits, labels)`` | the loss, in which missing labels are masked out, never counted as a class |
| ``collate_labels(values)`` | raw label values of a batch (ids, class names, 0/1 rows, floats, ``None``) -> a label tensor |
| ``check_labels(values)`` | the first value it cannot take, described, or ``None`` (run on a whole column before training) |
| ``predictions(logits)`` | what the metrics compare with the labels |
| ``metric_inputs(predictions, references)`` | flat (predictions, references) over the present labels, for the metrics |
| ``decode(logits, label_names)`` | what a user reads at inference: label names and scores, or values |
| ``label_names_from_feature(feature)`` / ``label_names_from_values(values)`` | the class names that a `datasets` feature (``ClassLabel``) or a column of strings gives |
| ``majority_accuracy(values)`` | the accuracy of always predicting the most frequent label, where that is a chance level |

and carries ``default_metrics`` (what a task reports when it names none) and ``default_num_labels``.
Registering a new class with ``@HEADS.register("name")`` makes the kind usable everywhere (`Task`,
`MultiTaskModel`, the trainer's training and evaluation, recipes, ``hf-mtl list``); nothing else
lists head kinds.

The built-in kinds and their missing labels:

- single-label ``classification``: a missing label (``None``, ``-100``, or ``-1``, which `datasets.ClassLabel`
  writes for a missing label) is ignored by the cross-entropy, in raw values and in label tensors alike;
  class names (strings) are encoded with the task's ``label_names``;
- ``multilabel``: each row is a list of 0/1 values (``None`` entries, ``-100`` or NaN in a tensor, are
  masked out of the BCE; a row that is ``None`` as a whole contributes nothing), or the list of the
  names of its positive labels;
- ``regression``: ``None`` / NaN targets are masked out of the MSE (a ``None`` row masks all its targets);
- ``token_classification``: one label per token, ``-100`` (or ``-1``) where a token has none.

A batch whose labels are all missing gives a zero loss that still depends on the logits, so every
rank and every task run the same backward graph.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry

IGNORE_INDEX = -100

HEADS: Registry[type[TaskHead]] = Registry("head")


def list_heads() -> list[str]:
    """The names of all registered head kinds."""
    return HEADS.names()


def masked_mean_pool(hidden_states: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``hidden_states`` (B, T, H) over the positions where ``mask`` (B, T) is 1."""
    if mask is None:
        return hidden_states.mean(dim=1)
    weights = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return False
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, (int, float, np.integer, np.floating)) and value == IGNORE_INDEX


def _is_missing_class(value: Any) -> bool:
    """A missing class label: ``None``, NaN, ``-100``, or ``-1`` (`datasets.ClassLabel`'s missing value)."""
    return _is_missing(value) or (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == -1)


def _ignore_missing_classes(labels: Tensor) -> Tensor:
    """Class labels with ``-1`` (`datasets.ClassLabel`'s missing value) turned into the ignored ``-100``."""
    return labels.masked_fill(labels == -1, IGNORE_INDEX)


def _is_string_feature(feature: Any) -> bool:
    """Whether a `datasets` feature holds strings (``Value("string")``, or a list of them)."""
    while feature is not None:
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return True
        feature = getattr(feature, "feature", None)
    return False


def _names_list(names: Sequence[str] | None) -> str:
    shown = ", ".join(map(str, list(names or [])[:20]))
    return shown + (", ..." if names is not None and len(names) > 20 else "")


class TaskHead(nn.Module):
    """Base head: a linear layer on pooled (or per-position) hidden states.

    Subclasses implement `loss`, `collate_labels` and `predictions`, and override the rest where their
    labels differ (see the module docstring for the whole contract).

    Args:
        hidden_size (`int`): width of the hidden states it reads.
        num_labels (`int`): output width.
        dropout (`float`, *optional*, defaults to 0.1): dropout before the output layer.
        pooling (`str`, *optional*, defaults to `"mean"`): ``"mean"`` (masked mean over positions) or
            ``"cls"`` (the first position); sequence-level heads only.

    Attributes:
        label_names (`list[str]` or `None`): the task's class names, set by `MultiTaskModel` from
            `Task.label_names`; class names found in the data are encoded with them.
    """

    name = ""
    #: one prediction per example (`True`) or per position (`False`)
    sequence_level = True
    #: the metrics a task of this kind reports when it names none
    default_metrics: tuple[str, ...] = ("accuracy",)
    #: `Task.num_labels` when neither `num_labels` nor `label_names` is given
    default_num_labels = 2

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.num_labels = num_labels
        self.label_names: list[str] | None = None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.sequence_level:
            features = hidden_states[:, 0] if self.pooling == "cls" else masked_mean_pool(hidden_states, mask)
        else:
            features = hidden_states
        return self.classifier(self.dropout(features))

    # ------------------------------------------------------------------ training
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        raise NotImplementedError

    def check_labels(self, values: Sequence[Any]) -> str | None:
        """Returns a description of the first label this head cannot take, or ``None`` when all are valid."""
        return None

    # ------------------------------------------------------------------ evaluation
    def predictions(self, logits: Tensor) -> Tensor:
        """What metrics compare with the labels."""
        raise NotImplementedError

    @classmethod
    def metric_inputs(cls, predictions: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat ``(predictions, references)`` over the present labels, what every metric of the task reads.

        Takes what `predictions` gives (as an array) and the collated labels, of one batch or of many
        already flattened; flat pairs map to themselves, so batches can be flattened one by one and then
        concatenated.
        """
        if predictions.shape != references.shape:
            raise cls._shape_error(predictions, references)
        return predictions.reshape(-1), references.reshape(-1)

    @classmethod
    def metric_kwargs(cls, metric: Any) -> dict[str, Any]:
        """Extra ``compute`` arguments of one metric (an `evaluate` module) for this kind of labels."""
        return {}

    @classmethod
    def _shape_error(cls, predictions: np.ndarray, references: np.ndarray) -> ValueError:
        return ValueError(
            f"{cls.name}: `predictions` of shape {predictions.shape} do not match `references` of shape {references.shape}"
        )

    def majority_accuracy(self, values: Sequence[Any]) -> float | None:
        """The accuracy of always predicting the most frequent label (a chance level), or ``None`` where that
        is not a meaningful baseline for this kind of labels."""
        return None

    # ------------------------------------------------------------------ inference
    def decode(self, logits: Tensor, label_names: Sequence[str] | None = None, **kwargs: Any) -> list[Any]:
        """What the model predicts for each example, in the form a user reads (label names and scores, values).

        Args:
            logits (`torch.Tensor`): this head's logits for a batch.
            label_names (`list[str]`, *optional*): the class names; defaults to `label_names`.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ labels from data
    @classmethod
    def label_names_from_feature(cls, feature: Any) -> list[str] | None:
        """The class names a `datasets` feature of the label column carries (a ``ClassLabel``), or ``None``."""
        return None

    @classmethod
    def label_names_from_values(cls, values: Sequence[Any]) -> list[str] | None:
        """The class names of a label column that holds names (strings) instead of ids, sorted (as
        `datasets.Dataset.class_encode_column` sorts them), or ``None`` when its labels are not names."""
        return None

    def count_items(self, labels: Tensor) -> Tensor:
        """The number of labelled items in a label tensor, the denominator of the loss's mean: the engine
        normalises every task's loss by its count over the whole step (all micro-batches, all ranks), as
        the Trainer's ``num_items_in_batch`` does. One per row by default."""
        return torch.tensor(labels.shape[0], device=labels.device)


def _class_id(value: Any, num_labels: int, names: Sequence[str] | None) -> int | str:
    """The id of one class label, or a description of why it is not one (missing labels give -100)."""
    if _is_missing_class(value):
        return IGNORE_INDEX
    if isinstance(value, str):
        if names is None:
            return (
                f"label {value!r} is a class name (a string), but the task has no `label_names` to encode it; "
                "give `label_names` (the class names, in id order)"
            )
        index = {name: i for i, name in enumerate(names)}.get(value)
        if index is None:
            return f"label {value!r} is not one of the `label_names`: {_names_list(names)}"
        return index
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"label {value!r} is not a class id (an integer) or a class name (a string)"
    if not float(value).is_integer():
        return f"label {value!r} is not a whole number, so not a class id"
    if not 0 <= int(value) < num_labels:
        return f"label {value!r} is outside [0, {num_labels - 1}]"
    return int(value)


def _encode_class(value: Any, num_labels: int, names: Sequence[str] | None) -> int:
    encoded = _class_id(value, num_labels, names)
    if isinstance(encoded, str):
        raise ValueError(encoded)
    return encoded


def _softmax_scores(logits: Tensor) -> Tensor:
    return logits.detach().float().softmax(dim=-1).cpu()


def _label(index: int, names: Sequence[str] | None) -> str | int:
    return names[index] if names is not None else index


@HEADS.register("classification")
class ClassificationHead(TaskHead):
    """Single-label classification: cross-entropy over ``num_labels`` classes, missing labels ignored.

    Labels are class ids (``0 .. num_labels - 1``) or class names listed in the task's ``label_names``.
    """

    default_metrics = ("accuracy", "f1")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = _ignore_missing_classes(labels)
        if (labels != IGNORE_INDEX).any():
            return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return logits.sum() * 0.0

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        return torch.tensor([_encode_class(v, self.num_labels, self.label_names) for v in values], dtype=torch.long)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.argmax(dim=-1)

    def count_items(self, labels: Tensor) -> Tensor:
        """Labels that are not missing (``-100`` / ``-1``); per token for token classification."""
        return ((labels != IGNORE_INDEX) & (labels != -1)).sum()

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for value in values:
            encoded = _class_id(value, self.num_labels, self.label_names)
            if isinstance(encoded, str):
                return encoded
        return None

    @classmethod
    def metric_inputs(cls, predictions: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class ids where the reference is present (not ``-100``); logits ``(N, C)`` are taken by arg-max."""
        if predictions.ndim == references.ndim + 1:
            predictions = predictions.argmax(axis=-1)
        if predictions.shape != references.shape:
            raise cls._shape_error(predictions, references)
        present = references != IGNORE_INDEX
        return predictions[present].astype(np.int64), references[present].astype(np.int64)

    def majority_accuracy(self, values: Sequence[Any]) -> float | None:
        """``max_c |{i : y_i = c}| / n`` over the present labels (ids or names); NaN when none is present."""
        present = [value for value in values if not _is_missing_class(value)]
        if not present:
            return math.nan
        return Counter(present).most_common(1)[0][1] / len(present)

    def decode(
        self, logits: Tensor, label_names: Sequence[str] | None = None, top_k: int | None = 1, **kwargs: Any
    ) -> list[Any]:
        """Per example ``{"label": name, "score": p}`` for the most probable class (``top_k=1``), or the
        ``top_k`` most probable as a list of such dicts (every class with ``top_k=None``); ``p`` is the softmax
        probability. The label is the class id where the task has no ``label_names``."""
        names = label_names if label_names is not None else self.label_names
        scores = _softmax_scores(logits)
        k = scores.shape[-1] if top_k is None else min(int(top_k), scores.shape[-1])
        values, indices = scores.topk(k, dim=-1)
        out = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            entries = [{"label": _label(i, names), "score": s} for s, i in zip(row_values, row_indices)]
            out.append(entries[0] if top_k == 1 else entries)
        return out

    @classmethod
    def label_names_from_feature(cls, feature: Any) -> list[str] | None:
        if getattr(feature, "num_classes", None):
            return list(feature.names)
        return None

    @classmethod
    def label_names_from_values(cls, values: Sequence[Any]) -> list[str] | None:
        present = [value for value in values if not _is_missing_class(value)]
        if not present or not all(isinstance(value, str) for value in present):
            return None
        return sorted(set(present))


@HEADS.register("token_classification")
class TokenClassificationHead(ClassificationHead):
    """Per-token classification: labels (B, T) padded with -100, which the loss ignores."""

    sequence_level = False
    default_metrics = ("accuracy",)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = _ignore_missing_classes(labels[:, : logits.shape[1]])
        if (labels != IGNORE_INDEX).any():
            return F.cross_entropy(
                logits[:, : labels.shape[1]].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
            )
        return logits.sum() * 0.0

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        """Pads the per-token labels with -100; a row that is ``None`` (no labels) is all -100."""
        values = [[] if sequence is None else sequence for sequence in values]
        length = max([len(v) for v in values] + [1])
        out = torch.full((len(values), length), IGNORE_INDEX, dtype=torch.long)
        for row, sequence in enumerate(values):
            if not len(sequence):
                continue
            out[row, : len(sequence)] = torch.tensor(
                [_encode_class(v, self.num_labels, self.label_names) for v in sequence], dtype=torch.long
            )
        return out

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for sequence in values:
            if sequence is None:
                continue
            if isinstance(sequence, str) or not hasattr(sequence, "__len__"):
                return f"label {sequence!r} is not a sequence of per-token labels"
            message = super().check_labels(list(sequence))
            if message:
                return message
        return None

    @classmethod
    def metric_inputs(cls, predictions: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions whose reference is present; predictions ``(B, T)`` or logits ``(B, T, C)``. When
        predictions and references were padded to different lengths, both are cut to the shorter one."""
        if predictions.ndim == references.ndim + 1:
            predictions = predictions.argmax(axis=-1)
        if predictions.ndim == references.ndim == 2:
            length = min(predictions.shape[1], references.shape[1])
            predictions, references = predictions[:, :length], references[:, :length]
        return super().metric_inputs(predictions, references)

    def majority_accuracy(self, values: Sequence[Any]) -> float | None:
        return None

    def decode(
        self,
        logits: Tensor,
        label_names: Sequence[str] | None = None,
        mask: Tensor | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Per example the list of ``{"label": name, "score": p}`` of its positions (those where ``mask`` is 1,
        all of them without a mask)."""
        names = label_names if label_names is not None else self.label_names
        scores = _softmax_scores(logits)
        best, indices = scores.max(dim=-1)
        out = []
        for row in range(scores.shape[0]):
            length = int(mask[row].sum()) if mask is not None else scores.shape[1]
            out.append(
                [
                    {"label": _label(int(i), names), "score": float(s)}
                    for s, i in zip(best[row, :length], indices[row, :length])
                ]
            )
        return out

    @classmethod
    def label_names_from_feature(cls, feature: Any) -> list[str] | None:
        return super().label_names_from_feature(getattr(feature, "feature", None))

    @classmethod
    def label_names_from_values(cls, values: Sequence[Any]) -> list[str] | None:
        return super().label_names_from_values([v for sequence in values if sequence is not None for v in sequence])


@HEADS.register("multilabel")
class MultiLabelHead(TaskHead):
    """Multi-label classification: one binary cross-entropy per label; ``None`` entries (partial
    labels) are masked out of the loss and of the mean.

    A label row is a list of ``num_labels`` values 0, 1 or ``None``, or the list of the names (in
    ``label_names``) of its positive labels (an empty list: none is positive).
    """

    default_metrics = ("accuracy", "f1")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        present = (labels != IGNORE_INDEX) & ~torch.isnan(labels)
        if not present.any():
            return logits.sum() * 0.0
        targets = torch.where(present, labels, torch.zeros_like(labels)).float()
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return per_entry[present].mean()

    def _row(self, row: Any) -> list[float] | str:
        """One label row as ``num_labels`` floats (-100 where missing), or a description of the problem."""
        if row is None:
            return [float(IGNORE_INDEX)] * self.num_labels
        if isinstance(row, str) or not isinstance(row, (Sequence, np.ndarray, Tensor)):
            return f"a label row must be a list, got {row!r}"
        row = list(row)
        names = self.label_names
        if names is not None and all(isinstance(v, str) for v in row):  # the names of the positive labels
            index = {name: i for i, name in enumerate(names)}
            unknown = [v for v in row if v not in index]
            if unknown:
                return f"label {unknown[0]!r} is not one of the `label_names`: {_names_list(names)}"
            encoded = [0.0] * self.num_labels
            for value in row:
                encoded[index[value]] = 1.0
            return encoded
        if any(isinstance(v, str) for v in row):
            return (
                f"the label row {row!r} holds class names, but the task has no `label_names` to encode them"
                if names is None
                else f"the label row {row!r} mixes class names and 0/1 values"
            )
        if len(row) != self.num_labels:
            return f"a label row has {len(row)} entries, expected num_labels={self.num_labels}"
        for value in row:
            if not _is_missing(value) and value not in (0, 1):
                return f"multilabel entry {value!r} is not 0, 1 or None"
        return [float(IGNORE_INDEX) if _is_missing(v) else float(v) for v in row]

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        rows = []
        for value in values:
            row = self._row(value)
            if isinstance(row, str):
                raise ValueError(row)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32)

    def predictions(self, logits: Tensor) -> Tensor:
        return (logits > 0).long()

    def count_items(self, labels: Tensor) -> Tensor:
        """Present label entries (the loss is their mean)."""
        return ((labels != IGNORE_INDEX) & ~torch.isnan(labels)).sum()

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for value in values:
            row = self._row(value)
            if isinstance(row, str):
                return row
        return None

    @classmethod
    def metric_inputs(cls, predictions: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``(N, L)`` 0/1 matrices flattened, without the entries whose reference is ``-100`` (or NaN):
        every metric sees one example per present (row, label) entry."""
        if predictions.shape != references.shape:
            raise cls._shape_error(predictions, references)
        present = references != IGNORE_INDEX
        if np.issubdtype(references.dtype, np.floating):
            present &= ~np.isnan(references)
        predictions, references = predictions[present], references[present]
        for field, values in (("predictions", predictions), ("references", references)):
            bad = values[(values != 0) & (values != 1)]
            if bad.size:
                raise ValueError(
                    f"multilabel: `{field}` must be 0 or 1 (references -100 where missing), found {bad[0].item()!r}; "
                    f"threshold logits first (the head predicts `logits > 0`)"
                )
        return predictions.astype(np.int64), references.astype(np.int64)

    @classmethod
    def metric_kwargs(cls, metric: Any) -> dict[str, Any]:
        """The built-in ``f1`` / ``precision`` / ``recall`` report the positive class of the flattened entries
        (``average="binary"``) unless built with an ``average`` other than the default."""
        from ..metrics import F1, Precision, Recall

        if isinstance(metric, (F1, Precision, Recall)) and metric.average == "macro":
            return {"average": "binary"}
        return {}

    def decode(
        self, logits: Tensor, label_names: Sequence[str] | None = None, threshold: float = 0.5, **kwargs: Any
    ) -> list[Any]:
        """Per example the list of ``{"label": name, "score": p}`` of its predicted labels (``p = sigmoid(logit) >
        threshold``, 0.5 by default: logit > 0), most probable first."""
        names = label_names if label_names is not None else self.label_names
        scores = logits.detach().float().sigmoid().cpu()
        out = []
        for row in scores.tolist():
            chosen = sorted(((s, i) for i, s in enumerate(row) if s > threshold), reverse=True)
            out.append([{"label": _label(i, names), "score": s} for s, i in chosen])
        return out

    @classmethod
    def label_names_from_values(cls, values: Sequence[Any]) -> list[str] | None:
        rows = [row for row in values if row is not None]
        names = [v for row in rows if not isinstance(row, str) for v in row]
        if not rows or not names or not all(isinstance(v, str) for v in names):
            return None
        return sorted(set(names))


@HEADS.register("regression")
class RegressionHead(TaskHead):
    """Regression: mean squared error over the present (non-``None``, non-NaN) targets."""

    default_metrics = ("mse", "mae")
    default_num_labels = 1

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = labels.view(logits.shape)
        present = ~torch.isnan(labels)
        if not present.any():
            return logits.sum() * 0.0
        return F.mse_loss(logits.float()[present], labels[present].float())

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        rows = []
        for value in values:
            entries = self._entries(value)
            rows.append([float("nan") if v is None else float(v) for v in entries])
        return torch.tensor(rows, dtype=torch.float32)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits

    def count_items(self, labels: Tensor) -> Tensor:
        """Present (non-NaN) targets (the loss is their mean)."""
        return (~torch.isnan(labels)).sum()

    def _entries(self, value: Any) -> list[Any]:
        """The targets of one row: a list, or a scalar (one target); ``None`` masks the whole row."""
        if value is None:
            return [None] * self.num_labels
        return list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for value in values:
            entries = self._entries(value)
            if len(entries) != self.num_labels:
                return f"a target has {len(entries)} values, expected num_labels={self.num_labels}"
            for entry in entries:
                if entry is not None and (
                    isinstance(entry, (str, bool)) or not isinstance(entry, (int, float, np.integer, np.floating))
                ):
                    return f"regression target {entry!r} is not a number"
        return None

    @classmethod
    def metric_inputs(cls, predictions: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All targets flattened, without the missing (NaN) ones: ``mse`` / ``mae`` average over them."""
        predictions = predictions.astype(np.float64)
        references = references.astype(np.float64)
        if predictions.shape != references.shape and predictions.squeeze().shape != references.squeeze().shape:
            raise cls._shape_error(predictions, references)
        predictions, references = predictions.reshape(-1), references.reshape(-1)
        present = ~np.isnan(references)
        return predictions[present], references[present]

    def decode(self, logits: Tensor, label_names: Sequence[str] | None = None, **kwargs: Any) -> list[Any]:
        """Per example the predicted value (one target), or ``{name: value}`` per target when the task names
        its targets in ``label_names``, else the list of values."""
        names = label_names if label_names is not None else self.label_names
        out = []
        for row in logits.detach().float().cpu().reshape(logits.shape[0], -1).tolist():
            if len(row) == 1 and names is None:
                out.append(row[0])
            elif names is not None:
                out.append(dict(zip(names, row)))
            else:
                out.append(row)
        return out

"""Task heads: one small registered unit per head kind.

A head maps the encoder's hidden states (B, T, H) to logits, turns a list of raw label values into
a label tensor (``collate_labels``), and computes a loss in which missing labels are masked out,
never counted as a class (DESIGN.md, step 2):

- single-label ``classification``: a missing label (``None``, ``-100``, or ``-1``, which `datasets.ClassLabel`
  writes for a missing label) is ignored by the cross-entropy, in raw values and in label tensors alike;
- ``multilabel``: each row is a list of 0/1 values, ``None`` entries (``-100`` or NaN in a tensor) are
  masked out of the BCE, and a row that is ``None`` as a whole contributes nothing;
- ``regression``: ``None`` / NaN targets are masked out of the MSE (a ``None`` row masks all its targets);
- ``token_classification``: one label per token, ``-100`` (or ``-1``) where a token has none.

A batch whose labels are all missing gives a zero loss that still depends on the logits, so every
rank and every task run the same backward graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


class TaskHead(nn.Module):
    """Base head.

    Args:
        hidden_size (`int`): width of the hidden states it reads.
        num_labels (`int`): output width.
        dropout (`float`, *optional*, defaults to 0.1): dropout before the output layer.
        pooling (`str`, *optional*, defaults to `"mean"`): ``"mean"`` (masked mean over positions) or
            ``"cls"`` (the first position); sequence-level heads only.
    """

    name = ""
    sequence_level = True

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.sequence_level:
            features = hidden_states[:, 0] if self.pooling == "cls" else masked_mean_pool(hidden_states, mask)
        else:
            features = hidden_states
        return self.classifier(self.dropout(features))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        raise NotImplementedError

    def predictions(self, logits: Tensor) -> Tensor:
        """What metrics compare with the labels."""
        raise NotImplementedError

    def check_labels(self, values: Sequence[Any]) -> str | None:
        """Returns a description of the first out-of-range label, or ``None`` when all are valid."""
        return None

    def count_items(self, labels: Tensor) -> Tensor:
        """The number of labelled items in a label tensor, the denominator of the loss's mean: the engine
        normalises every task's loss by its count over the whole step (all micro-batches, all ranks), as
        the Trainer's ``num_items_in_batch`` does. One per row by default."""
        return torch.tensor(labels.shape[0], device=labels.device)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == IGNORE_INDEX


def _is_missing_class(value: Any) -> bool:
    """A missing class label: ``None``, NaN, ``-100``, or ``-1`` (`datasets.ClassLabel`'s missing value)."""
    return _is_missing(value) or value == -1


def _ignore_missing_classes(labels: Tensor) -> Tensor:
    """Class labels with ``-1`` (`datasets.ClassLabel`'s missing value) turned into the ignored ``-100``."""
    return labels.masked_fill(labels == -1, IGNORE_INDEX)


@HEADS.register("classification")
class ClassificationHead(TaskHead):
    """Single-label classification: cross-entropy over ``num_labels`` classes, missing labels ignored."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = _ignore_missing_classes(labels)
        if (labels != IGNORE_INDEX).any():
            return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return logits.sum() * 0.0

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        return torch.tensor([IGNORE_INDEX if _is_missing_class(v) else int(v) for v in values], dtype=torch.long)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.argmax(dim=-1)

    def count_items(self, labels: Tensor) -> Tensor:
        """Labels that are not missing (``-100`` / ``-1``); per token for token classification."""
        return ((labels != IGNORE_INDEX) & (labels != -1)).sum()

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for value in values:
            if not _is_missing_class(value) and not 0 <= int(value) < self.num_labels:
                return f"label {value!r} is outside [0, {self.num_labels - 1}]"
        return None


@HEADS.register("token_classification")
class TokenClassificationHead(ClassificationHead):
    """Per-token classification: labels (B, T) padded with -100, which the loss ignores."""

    sequence_level = False

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
                [IGNORE_INDEX if _is_missing_class(v) else int(v) for v in sequence]
            )
        return out

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for sequence in values:
            message = super().check_labels(sequence or [])
            if message:
                return message
        return None


@HEADS.register("multilabel")
class MultiLabelHead(TaskHead):
    """Multi-label classification: one binary cross-entropy per label; ``None`` entries (partial
    labels) are masked out of the loss and of the mean."""

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        present = (labels != IGNORE_INDEX) & ~torch.isnan(labels)
        if not present.any():
            return logits.sum() * 0.0
        targets = torch.where(present, labels, torch.zeros_like(labels)).float()
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return per_entry[present].mean()

    def collate_labels(self, values: Sequence[Any]) -> Tensor:
        rows = []
        for row in values:
            if row is None:
                row = [None] * self.num_labels
            rows.append([float(IGNORE_INDEX) if _is_missing(v) else float(v) for v in row])
        return torch.tensor(rows, dtype=torch.float32)

    def predictions(self, logits: Tensor) -> Tensor:
        return (logits > 0).long()

    def count_items(self, labels: Tensor) -> Tensor:
        """Present label entries (the loss is their mean)."""
        return ((labels != IGNORE_INDEX) & ~torch.isnan(labels)).sum()

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for row in values:
            if row is None:
                continue
            if len(row) != self.num_labels:
                return f"a label row has {len(row)} entries, expected num_labels={self.num_labels}"
            for value in row:
                if not _is_missing(value) and value not in (0, 1):
                    return f"multilabel entry {value!r} is not 0, 1 or None"
        return None


@HEADS.register("regression")
class RegressionHead(TaskHead):
    """Regression: mean squared error over the present (non-``None``, non-NaN) targets."""

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
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def check_labels(self, values: Sequence[Any]) -> str | None:
        for value in values:
            entries = self._entries(value)
            if len(entries) != self.num_labels:
                return f"a target has {len(entries)} values, expected num_labels={self.num_labels}"
        return None

"""Data for multi-task training: built-in real data sets, task samplers, the multi-task loader and the
per-modality collators (DESIGN.md, step 1)."""

from .collators import SpeechCollator, TextCollator, VisionCollator, collator_for
from .datasets import load_digits, load_fsdd, load_trec
from .loader import (
    MultiTaskBatchSampler,
    MultiTaskCollator,
    MultiTaskDataLoader,
    MultiTaskDataset,
    MultiTaskIterableDataset,
    TaskGroup,
    build_dataloader,
    check_labels,
    dataset_size,
    group_tasks,
    is_iterable_dataset,
)
from .sampling import SAMPLERS, TaskSampler, get_sampler, list_samplers, step_generator

__all__ = [
    "SAMPLERS",
    "MultiTaskBatchSampler",
    "MultiTaskCollator",
    "MultiTaskDataLoader",
    "MultiTaskDataset",
    "MultiTaskIterableDataset",
    "SpeechCollator",
    "TaskGroup",
    "TaskSampler",
    "TextCollator",
    "VisionCollator",
    "build_dataloader",
    "check_labels",
    "collator_for",
    "dataset_size",
    "get_sampler",
    "group_tasks",
    "is_iterable_dataset",
    "list_samplers",
    "load_digits",
    "load_fsdd",
    "load_trec",
    "step_generator",
]

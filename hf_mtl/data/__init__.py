"""Data for multi-task training: built-in real data sets, task samplers, the multi-task loader and the
per-modality collators (docs/architecture.md, step 1)."""

from .collators import (
    EncoderInputsCollator,
    SpeechCollator,
    TextCollator,
    VisionCollator,
    collator_for,
    default_collator,
)
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
from .media import check_media, decode_audio, decode_image, decode_media
from .sampling import SAMPLERS, TaskSampler, get_sampler, list_samplers, step_generator

__all__ = [
    "SAMPLERS",
    "EncoderInputsCollator",
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
    "check_media",
    "collator_for",
    "decode_audio",
    "decode_image",
    "decode_media",
    "default_collator",
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

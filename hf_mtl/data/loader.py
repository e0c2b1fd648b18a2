"""The multi-task loader: one multi-task batch per micro-step (DESIGN.md, step 1).

A multi-task batch maps a group key (the ``+``-joined names of the tasks that share one dataset) to
that group's sub-batch: the encoder inputs made by the group's collator, plus ``labels``, a mapping
task -> label tensor made by the task's head. Tasks that share a dataset are encoded once.

Map-style datasets go through a plain `torch.utils.data.DataLoader` whose batch sampler,
`MultiTaskBatchSampler`, plans every step: which groups the task sampler draws, and which rows of
each group this rank reads (each rank reads its own shard of every group; every rank draws the same
groups). Because the plan is a batch sampler, Accelerate's ``skip_first_batches`` fast-forwards it
on resume without loading any data. Iterable (streaming) datasets go through
`MultiTaskIterableDataset`, which has no length: set ``max_steps``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import Sampler

from ..tasks import Task
from .sampling import TaskSampler, step_generator

Rows = list[dict[str, Any]]


@dataclass
class TaskGroup:
    """Tasks that share one dataset (and so one encoder pass).

    Args:
        tasks (`list[Task]`): the tasks, all reading the same encoder.
        dataset: their dataset (map-style with ``__len__``/``__getitem__``, or iterable).
        batch_size (`int`): rows per sub-batch on each process.
        collator (`Callable[[list[dict]], dict]`): turns rows into encoder inputs.
    """

    tasks: list[Task]
    dataset: Any
    batch_size: int
    collator: Callable[[Rows], dict[str, Any]]
    label_collators: dict[str, Callable[[Sequence[Any]], torch.Tensor]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "+".join(task.name for task in self.tasks)

    @property
    def encoder(self) -> str:
        return self.tasks[0].encoder

    @property
    def is_iterable(self) -> bool:
        return not (hasattr(self.dataset, "__len__") and hasattr(self.dataset, "__getitem__"))

    def collate(self, rows: Rows) -> dict[str, Any]:
        """Encoder inputs and ``labels`` (task -> tensor) for ``rows``."""
        sub_batch = dict(self.collator(rows))
        labels = {}
        for task in self.tasks:
            if task.label_column in rows[0]:
                labels[task.name] = self.label_collators[task.name]([row.get(task.label_column) for row in rows])
        sub_batch["labels"] = labels
        return sub_batch


def group_tasks(
    tasks: Sequence[Task],
    datasets: Mapping[str, Any],
    *,
    batch_sizes: Mapping[str, int],
    default_batch_size: int,
    collators: Mapping[str, Callable[[Rows], dict[str, Any]]],
    label_collators: Mapping[str, Callable[[Sequence[Any]], torch.Tensor]],
    split: str = "train",
) -> list[TaskGroup]:
    """Groups the tasks that read the same dataset object with the same encoder.

    Raises:
        `ValueError`: a task with no dataset, a dataset for an unknown task, a missing collator,
            or tasks of one group asking for different batch sizes.
    """
    names = [task.name for task in tasks]
    unknown = sorted(set(datasets) - set(names))
    if unknown:
        raise ValueError(f"`{split}_dataset` has data for unknown task(s) {unknown}; the tasks are: {', '.join(names)}")
    groups: list[TaskGroup] = []
    for task in tasks:
        if task.name not in datasets or datasets[task.name] is None:
            raise ValueError(
                f"task {task.name!r} has no data: `{split}_dataset` must map every task to a dataset "
                f"(it has: {', '.join(sorted(datasets)) or 'nothing'})"
            )
        dataset = datasets[task.name]
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"task {task.name!r} has no data: its `{split}_dataset` is empty")
        if task.encoder not in collators:
            raise ValueError(
                f"task {task.name!r}: no collator for encoder {task.encoder!r}; pass `processing_class` or "
                f"`data_collator` keyed by encoder (have: {', '.join(sorted(collators)) or 'none'})"
            )
        batch_size = int(batch_sizes.get(task.name, default_batch_size))
        for group in groups:
            if group.dataset is dataset and group.encoder == task.encoder:
                if group.batch_size != batch_size:
                    raise ValueError(
                        f"tasks {group.key!r} and {task.name!r} share one dataset but ask for different "
                        f"batch sizes ({group.batch_size} vs {batch_size}) in `task_batch_sizes`"
                    )
                group.tasks.append(task)
                group.label_collators[task.name] = label_collators[task.name]
                break
        else:
            groups.append(
                TaskGroup(
                    tasks=[task],
                    dataset=dataset,
                    batch_size=batch_size,
                    collator=collators[task.encoder],
                    label_collators={task.name: label_collators[task.name]},
                )
            )
    return groups


def fetch_rows(dataset: Any, indices: Sequence[int]) -> Rows:
    """Rows ``indices`` of a map-style dataset; one columnar read for a `datasets.Dataset`."""
    try:
        import datasets as hf_datasets

        if isinstance(dataset, hf_datasets.Dataset):
            columns = dataset[list(indices)]
            keys = list(columns)
            return [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return [dict(dataset[i]) for i in indices]


class MultiTaskBatchSampler(Sampler[list[tuple[int, int]]]):
    """Plans the steps of one epoch: yields, per step, the ``(group, row)`` pairs this rank reads.

    Each group's rows are shuffled per epoch and per pass (a group smaller than the epoch cycles),
    padded to a multiple of ``num_replicas`` by wrapping around, and split so that rank ``r`` reads
    positions ``r, r + R, r + 2R, ...``; all randomness comes from generators seeded by
    ``(seed, epoch, group, pass)`` and ``(seed, epoch, step)``.

    Args:
        group_sizes (`Sequence[int]`): rows per group.
        batch_sizes (`Sequence[int]`): per-process sub-batch size per group.
        task_sampler (`TaskSampler`): draws the groups of each step.
        seed (`int`): the run's seed.
        num_replicas (`int`, *optional*, defaults to 1) / rank (`int`, *optional*, defaults to 0).
        shuffle (`bool`, *optional*, defaults to `True`), drop_last (`bool`, *optional*, defaults to `False`).
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        batch_sizes: Sequence[int],
        task_sampler: TaskSampler,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.group_sizes = list(group_sizes)
        self.batch_sizes = list(batch_sizes)
        self.task_sampler = task_sampler
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_group(self) -> list[int]:
        counts = []
        for size, batch_size in zip(self.group_sizes, self.batch_sizes):
            per_rank = math.ceil(size / self.num_replicas)
            counts.append(max(1, per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)))
        return counts

    def __len__(self) -> int:
        return self.task_sampler.steps_per_epoch(self.batches_per_group())

    def _group_batches(self, group: int) -> Iterator[list[int]]:
        size, batch_size = self.group_sizes[group], self.batch_sizes[group]
        for pass_index in itertools.count():
            if self.shuffle:
                order = torch.randperm(size, generator=step_generator(self.seed, self.epoch, 1_000_003 + group, pass_index))
            else:
                order = torch.arange(size)
            total = math.ceil(size / self.num_replicas) * self.num_replicas
            if total > size:
                order = torch.cat([order, order[: total - size]])
            shard = order[self.rank :: self.num_replicas].tolist()
            stop = len(shard) - len(shard) % batch_size if self.drop_last and len(shard) >= batch_size else len(shard)
            for start in range(0, stop, batch_size):
                yield shard[start : start + batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        streams = [self._group_batches(g) for g in range(len(self.group_sizes))]
        for step in range(len(self)):
            items: list[tuple[int, int]] = []
            for group in self.task_sampler.draw(step, self.epoch):
                items.extend((group, row) for row in next(streams[group]))
            yield items


class MultiTaskDataset(torch.utils.data.Dataset):
    """Indexes the groups' datasets by ``(group, row)``; `__getitems__` reads each group in one go."""

    def __init__(self, groups: Sequence[TaskGroup]) -> None:
        self.groups = list(groups)

    def __len__(self) -> int:
        return sum(len(group.dataset) for group in self.groups)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, dict[str, Any]]:
        group, row = item
        return group, dict(self.groups[group].dataset[row])

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> dict[int, Rows]:
        by_group: dict[int, list[int]] = {}
        for group, row in items:
            by_group.setdefault(group, []).append(row)
        return {group: fetch_rows(self.groups[group].dataset, rows) for group, rows in by_group.items()}


class MultiTaskCollator:
    """Turns ``{group: rows}`` into a multi-task batch ``{group_key: sub_batch}``."""

    def __init__(self, groups: Sequence[TaskGroup]) -> None:
        self.groups = list(groups)

    def __call__(self, rows_by_group: Mapping[int, Rows] | Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        if not isinstance(rows_by_group, Mapping):  # items fetched one by one
            grouped: dict[int, Rows] = {}
            for group, row in rows_by_group:
                grouped.setdefault(group, []).append(row)
            rows_by_group = grouped
        return {self.groups[g].key: self.groups[g].collate(rows) for g, rows in sorted(rows_by_group.items())}


class MultiTaskDataLoader(torch.utils.data.DataLoader):
    """A `DataLoader` over `MultiTaskDataset` driven by a `MultiTaskBatchSampler`."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


def _shard_stream(dataset: Any, rank: int, num_replicas: int) -> Any:
    if num_replicas == 1:
        return dataset
    try:
        import datasets as hf_datasets
        from datasets.distributed import split_dataset_by_node

        if isinstance(dataset, hf_datasets.IterableDataset):
            return split_dataset_by_node(dataset, rank=rank, world_size=num_replicas)
    except ImportError:  # pragma: no cover
        pass
    return _Strided(dataset, rank, num_replicas)


class _Strided:
    def __init__(self, dataset: Iterable[Any], rank: int, num_replicas: int) -> None:
        self.dataset, self.rank, self.num_replicas = dataset, rank, num_replicas

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.rank, None, self.num_replicas)


class MultiTaskIterableDataset(TorchIterableDataset):
    """Multi-task batches from iterable (streaming) datasets; endless, so training needs ``max_steps``.

    Each group's stream is sharded across ranks (`datasets.distributed.split_dataset_by_node` for a
    `datasets.IterableDataset`, every R-th row otherwise) and restarted when it runs out (calling its
    ``set_epoch`` with the pass number where it has one, so shuffled streams reshuffle).
    """

    def __init__(self, groups: Sequence[TaskGroup], task_sampler: TaskSampler, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.groups = list(groups)
        self.task_sampler = task_sampler
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rows(self, group: TaskGroup) -> Iterator[dict[str, Any]]:
        stream = _shard_stream(group.dataset, self.rank, self.num_replicas)
        for pass_index in itertools.count():
            if hasattr(stream, "set_epoch"):
                stream.set_epoch(pass_index)
            empty = True
            for row in stream:
                empty = False
                yield dict(row)
            if empty:
                raise ValueError(f"task group {group.key!r}: its streaming dataset yields no rows on rank {self.rank}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        streams = [self._rows(group) for group in self.groups]
        for step in itertools.count():
            batch = {}
            for g in self.task_sampler.draw(step, self.epoch):
                group = self.groups[g]
                rows = list(itertools.islice(streams[g], group.batch_size))
                batch[group.key] = group.collate(rows)
            yield batch

"""The multi-task loader: one multi-task batch per micro-step (docs/architecture.md, step 1).

A multi-task batch maps a group key (the ``+``-joined names of the tasks that share one dataset) to
that group's sub-batch: the encoder inputs made by the group's collator, plus ``labels``, a mapping
task -> label tensor made by the task's head. Tasks that share a dataset are encoded once.

Map-style datasets go through a plain `torch.utils.data.DataLoader` whose batch sampler,
`MultiTaskBatchSampler`, plans every step: which groups the task sampler draws, and which rows of
each group this rank reads (each rank reads its own shard of every group; every rank draws the same
groups). Because the plan is a batch sampler, Accelerate's ``skip_first_batches`` fast-forwards it
on resume without loading any data. Iterable (streaming) datasets go through
`MultiTaskIterableDataset`, which has no length: set ``max_steps``. `build_dataloader` picks the path.

Training plans cycle: a group that runs out of rows before the epoch ends starts a new pass. With
``cycle=False`` (evaluation) every group is read exactly once: each step holds the next sub-batch of
every group that still has rows, whatever the task sampler, and the loader ends when all are read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import Sampler

from ..tasks import Task
from .sampling import TaskSampler, step_generator

Rows = list[dict[str, Any]]


def is_iterable_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is read by iterating (a `datasets.IterableDataset`, a torch
    `IterableDataset`, or anything without ``__len__``/``__getitem__``) rather than by index."""
    if isinstance(dataset, TorchIterableDataset):  # datasets.IterableDataset subclasses it
        return True
    return not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


def _is_dataset_dict(dataset: Any) -> bool:
    try:
        import datasets as hf_datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, (hf_datasets.DatasetDict, hf_datasets.IterableDatasetDict))


def _same_data(a: Any, b: Any) -> bool:
    """The same dataset object, or two `datasets.Dataset` with one fingerprint (hence one content)."""
    if a is b:
        return True
    fingerprint = getattr(a, "_fingerprint", None)
    try:
        import datasets as hf_datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return (
        isinstance(a, hf_datasets.Dataset)
        and isinstance(b, hf_datasets.Dataset)
        and fingerprint is not None
        and fingerprint == getattr(b, "_fingerprint", None)
    )


@dataclass
class TaskGroup:
    """Tasks that share one dataset (and so one encoder pass).

    Args:
        tasks (`list[Task]`): the tasks, all reading the same encoder.
        dataset: their dataset (map-style with ``__len__``/``__getitem__``, or iterable).
        batch_size (`int`): rows per sub-batch on each process.
        collator (`Callable[[list[dict]], dict]`): turns rows into encoder inputs.
        label_collators (`dict[str, Callable]`): task -> the head's ``collate_labels``.
    """

    tasks: list[Task]
    dataset: Any
    batch_size: int
    collator: Callable[[Rows], dict[str, Any]]
    label_collators: dict[str, Callable[[Sequence[Any]], torch.Tensor]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The key of this group's sub-batch: the ``+``-joined task names (``"digit+speaker"``)."""
        return "+".join(task.name for task in self.tasks)

    @property
    def encoder(self) -> str:
        return self.tasks[0].encoder

    @property
    def is_iterable(self) -> bool:
        return is_iterable_dataset(self.dataset)

    def collate(self, rows: Rows) -> dict[str, Any]:
        """Encoder inputs and ``labels`` (task -> tensor) for ``rows``; a task whose label column is
        absent from the rows (unlabelled evaluation data) gets no label tensor."""
        sub_batch = dict(self.collator(rows))
        labels = {}
        for task in self.tasks:
            if any(task.label_column in row for row in rows):
                if task.name not in self.label_collators:
                    raise ValueError(f"task group {self.key!r}: no label collator for task {task.name!r}")
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
    """Groups the tasks that read the same data with the same encoder, in task order.

    Two tasks share a group when their datasets are one object, or two `datasets.Dataset` with the same
    fingerprint (the same content), and they read the same encoder. A group's batch size is the one its
    tasks set in `batch_sizes` (they must agree), else `default_batch_size`. The ``Audio`` and ``Image``
    columns of a `datasets` data set are decoded by hf_mtl (`decode_media`: soundfile and PIL, no
    torchcodec), and a collator with ``check_columns`` is asked whether it can read the data set's columns.

    Raises:
        `ValueError`: a task with no dataset or an empty one, a dataset for an unknown task, a missing
            collator or label collator, a collator that cannot read the data set's columns, a batch size
            that is not a positive integer, or tasks of one group asking for different batch sizes.
    """
    from .media import decode_media

    names = [task.name for task in tasks]
    unknown = sorted(set(datasets) - set(names))
    if unknown:
        raise ValueError(f"`{split}_dataset` has data for unknown task(s) {unknown}; the tasks are: {', '.join(names)}")
    unknown = sorted(set(batch_sizes) - set(names))
    if unknown:
        raise ValueError(f"`task_batch_sizes` names unknown task(s) {unknown}; the tasks are: {', '.join(names)}")
    for name, size in [("default", default_batch_size), *batch_sizes.items()]:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            where = "the per-device batch size" if name == "default" else f"`task_batch_sizes[{name!r}]`"
            raise ValueError(f"{where} must be a positive integer, got {size!r}")
    groups: list[TaskGroup] = []
    explicit: dict[int, str] = {}  # group index -> the task that set its batch size
    decoded: dict[int, Any] = {}  # id(dataset) -> the data set with its media decoded by hf_mtl
    for task in tasks:
        if task.name not in datasets or datasets[task.name] is None:
            raise ValueError(
                f"task {task.name!r} has no data: `{split}_dataset` must map every task to a dataset "
                f"(it has: {', '.join(sorted(datasets)) or 'nothing'})"
            )
        dataset = datasets[task.name]
        if _is_dataset_dict(dataset):
            raise ValueError(
                f"task {task.name!r}: its `{split}_dataset` is a {type(dataset).__name__} with splits "
                f"{sorted(dataset)}; pass one split, e.g. dataset[{next(iter(sorted(dataset)), 'train')!r}]"
            )
        if not is_iterable_dataset(dataset) and len(dataset) == 0:
            raise ValueError(f"task {task.name!r} has no data: its `{split}_dataset` is empty")
        if task.encoder not in collators:
            raise ValueError(
                f"task {task.name!r}: no collator for encoder {task.encoder!r}; pass `processing_class` or "
                f"`data_collator` keyed by encoder (have: {', '.join(sorted(collators)) or 'none'})"
            )
        if task.name not in label_collators:
            raise ValueError(f"task {task.name!r}: no label collator (the head's `collate_labels`)")
        if id(dataset) not in decoded:
            decoded[id(dataset)] = (dataset, decode_media(dataset, f"the `{split}_dataset` of task {task.name!r}"))
        dataset = decoded[id(dataset)][1]
        check_columns = getattr(collators[task.encoder], "check_columns", None)
        columns = _column_names(dataset) if check_columns is not None and not is_iterable_dataset(dataset) else None
        problem = check_columns(columns) if columns is not None else None
        if problem:
            raise ValueError(f"task {task.name!r} (encoder {task.encoder!r}, its `{split}_dataset`): {problem}")
        index = next(
            (i for i, g in enumerate(groups) if g.encoder == task.encoder and _same_data(g.dataset, dataset)), None
        )
        if index is None:
            groups.append(
                TaskGroup(
                    tasks=[task],
                    dataset=dataset,
                    batch_size=int(batch_sizes.get(task.name, default_batch_size)),
                    collator=collators[task.encoder],
                    label_collators={task.name: label_collators[task.name]},
                )
            )
            if task.name in batch_sizes:
                explicit[len(groups) - 1] = task.name
            continue
        group = groups[index]
        if task.name in batch_sizes:
            size = int(batch_sizes[task.name])
            if index in explicit and size != group.batch_size:
                raise ValueError(
                    f"tasks {explicit[index]!r} and {task.name!r} share one dataset, so they travel in one "
                    f"sub-batch, but ask for different batch sizes ({group.batch_size} vs {size}) in `task_batch_sizes`"
                )
            group.batch_size, explicit[index] = size, task.name
        group.tasks.append(task)
        group.label_collators[task.name] = label_collators[task.name]
    return groups


def check_labels(
    groups: Sequence[TaskGroup], heads: Mapping[str, Any], split: str = "train", require: bool = True
) -> None:
    """Checks every task's labels before any step runs, with the task's head (``head.check_labels``).

    Map-style groups are read whole (one column read for a `datasets.Dataset`); iterable groups are
    not read (their rows are unknown until streamed).

    Args:
        groups (`Sequence[TaskGroup]`): the groups of `group_tasks`.
        heads (`Mapping[str, TaskHead]`): task -> head (``model.heads``).
        split (`str`, *optional*, defaults to `"train"`): named in the errors (``train_dataset``).
        require (`bool`, *optional*, defaults to `True`): a task's label column must be in its dataset.

    Raises:
        `ValueError`: naming the task, its label column and the offending value, or the missing column
            and the columns present.
    """
    for group in groups:
        if group.is_iterable:
            continue
        columns = _column_names(group.dataset)
        for task in group.tasks:
            column = task.label_column
            if columns is not None and column not in columns:
                if require:
                    raise ValueError(
                        f"task {task.name!r}: label column {column!r} (`label_column`) is not in its "
                        f"`{split}_dataset`; columns present: {', '.join(columns)}"
                    )
                continue
            values = label_values(group.dataset, column)
            problem = heads[task.name].check_labels(values)
            if problem:
                raise ValueError(
                    f"task {task.name!r}: {problem} in column {column!r} of its `{split}_dataset` "
                    f"(num_labels={task.num_labels}, head {task.head!r})"
                )


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    if len(dataset) and isinstance(dataset[0], Mapping):
        return list(dataset[0])
    return None


def label_values(dataset: Any, column: str) -> list[Any]:
    """Every value of ``column`` in a map-style dataset; one column read for a `datasets.Dataset`."""
    try:
        import datasets as hf_datasets

        if isinstance(dataset, hf_datasets.Dataset):
            return list(dataset.with_format(None)[column])
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return [dataset[i].get(column) for i in range(len(dataset))]


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

    Each group's rows are shuffled per epoch and per pass, padded to a multiple of ``num_replicas`` by
    wrapping around, and split so that rank ``r`` reads positions ``r, r + R, r + 2R, ...``: the ranks'
    shards are disjoint (up to the wrapped padding) and cover the group, and every rank makes the same
    number of steps. All randomness comes from generators seeded by ``(seed, epoch, group, pass)`` and
    ``(seed, epoch, step)``, so every rank draws the same groups in the same step and a resumed run
    repeats the plan.

    Args:
        group_sizes (`Sequence[int]`): rows per group.
        batch_sizes (`Sequence[int]`): per-process sub-batch size per group.
        task_sampler (`TaskSampler`): draws the groups of each step.
        seed (`int`): the run's seed.
        num_replicas (`int`, *optional*, defaults to 1): number of processes.
        rank (`int`, *optional*, defaults to 0): this process.
        shuffle (`bool`, *optional*, defaults to `True`): shuffle each group's rows every pass.
        drop_last (`bool`, *optional*, defaults to `False`): drop each pass's last partial sub-batch
            (a shard smaller than one batch is kept whole).
        cycle (`bool`, *optional*, defaults to `True`): `True` for training (the task sampler's
            schedule; groups that run out start a new pass); `False` for evaluation (every group read
            once, one sub-batch of each unfinished group per step, the sampler not consulted).
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
        cycle: bool = True,
    ) -> None:
        if len(group_sizes) != len(batch_sizes) or len(group_sizes) != len(task_sampler.sizes):
            raise ValueError(
                f"`group_sizes` ({len(group_sizes)}), `batch_sizes` ({len(batch_sizes)}) and the task sampler's "
                f"sizes ({len(task_sampler.sizes)}) must have one entry per task group"
            )
        if any(size < 1 for size in group_sizes) or any(size < 1 for size in batch_sizes):
            raise ValueError(f"group and batch sizes must be positive, got {list(group_sizes)} and {list(batch_sizes)}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, num_replicas={num_replicas}), got {rank}")
        self.group_sizes = [int(n) for n in group_sizes]
        self.batch_sizes = [int(n) for n in batch_sizes]
        self.task_sampler = task_sampler
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.cycle = cycle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_group(self) -> list[int]:
        """Sub-batches in one pass over each group, on every rank."""
        counts = []
        for size, batch_size in zip(self.group_sizes, self.batch_sizes):
            per_rank = math.ceil(size / self.num_replicas)
            counts.append(max(1, per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)))
        return counts

    def __len__(self) -> int:
        if not self.cycle:
            return max(self.batches_per_group())
        return self.task_sampler.steps_per_epoch(self.batches_per_group())

    def _shard(self, group: int, pass_index: int) -> list[int]:
        size = self.group_sizes[group]
        if self.shuffle:
            generator = step_generator(self.seed, self.epoch, 1_000_003 + group, pass_index)
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size)
        total = math.ceil(size / self.num_replicas) * self.num_replicas
        if total > size:  # wrap around, as often as needed when the group is smaller than the world
            order = order.repeat(math.ceil(total / size))[:total]
        return order[self.rank :: self.num_replicas].tolist()

    def _group_batches(self, group: int) -> Iterator[list[int]]:
        batch_size = self.batch_sizes[group]
        passes = itertools.count() if self.cycle else range(1)
        for pass_index in passes:
            shard = self._shard(group, pass_index)
            stop = len(shard) - len(shard) % batch_size if self.drop_last and len(shard) >= batch_size else len(shard)
            for start in range(0, stop, batch_size):
                yield shard[start : start + batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        streams = [self._group_batches(g) for g in range(len(self.group_sizes))]
        if not self.cycle:
            for batches in itertools.zip_longest(*streams):
                yield [(g, row) for g, batch in enumerate(batches) if batch is not None for row in batch]
            return
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
    """A `DataLoader` of multi-task batches: over `MultiTaskDataset` driven by a `MultiTaskBatchSampler`,
    or over a `MultiTaskIterableDataset` (``batch_size=None``). See `build_dataloader`."""

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the plan (map-style) or of the streams (iterable) before iterating."""
        if isinstance(self.batch_sampler, MultiTaskBatchSampler):
            self.batch_sampler.set_epoch(epoch)
        elif hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def _shard_stream(dataset: Any, rank: int, num_replicas: int) -> Any:
    """This rank's part of an iterable dataset. A `datasets.IterableDataset` is always split with
    `split_dataset_by_node` (with one process this makes a copy, so setting its epoch leaves the
    user's object alone); any other iterable is read every ``num_replicas``-th row."""
    try:
        import datasets as hf_datasets
        from datasets.distributed import split_dataset_by_node

        if isinstance(dataset, hf_datasets.IterableDataset):
            return split_dataset_by_node(dataset, rank=rank, world_size=num_replicas)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return dataset if num_replicas == 1 else _Strided(dataset, rank, num_replicas)


class _Strided:
    def __init__(self, dataset: Iterable[Any], rank: int, num_replicas: int) -> None:
        self.dataset, self.rank, self.num_replicas = dataset, rank, num_replicas

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.rank, None, self.num_replicas)


# Stream epochs are ``epoch * _PASS_STRIDE + pass``, distinct for every (epoch, pass) of a run.
_PASS_STRIDE = 1_000_003


class MultiTaskIterableDataset(TorchIterableDataset):
    """Multi-task batches from iterable (streaming) datasets.

    Each group's stream is sharded across ranks (`datasets.distributed.split_dataset_by_node` for a
    `datasets.IterableDataset`, every R-th row otherwise). With ``cycle=True`` (training) the loader is
    endless, so training needs ``max_steps``: each step holds the groups the task sampler draws for
    ``(seed, epoch, step)``, and a stream that runs out restarts (its ``set_epoch`` called with a new
    pass number where it has one, so shuffled streams reshuffle). With ``cycle=False`` (evaluation)
    each stream is read once: a step holds the next sub-batch of every unfinished group, and the
    loader ends when all are read (ranks whose shards differ in length may then make different
    numbers of steps).

    Rows must be read in one sequence per process, so a `DataLoader` over it may use at most one
    worker.

    Args:
        groups (`Sequence[TaskGroup]`): the task groups.
        task_sampler (`TaskSampler`): draws the groups of each step.
        seed (`int`): the run's seed.
        num_replicas (`int`, *optional*, defaults to 1) / rank (`int`, *optional*, defaults to 0): processes.
        cycle (`bool`, *optional*, defaults to `True`): endless training stream, or one pass (evaluation).
    """

    def __init__(
        self,
        groups: Sequence[TaskGroup],
        task_sampler: TaskSampler,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        cycle: bool = True,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, num_replicas={num_replicas}), got {rank}")
        self.groups = list(groups)
        self.task_sampler = task_sampler
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.cycle = cycle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rows(self, group: TaskGroup) -> Iterator[dict[str, Any]]:
        stream = _shard_stream(group.dataset, self.rank, self.num_replicas)
        for pass_index in itertools.count() if self.cycle else range(1):
            if hasattr(stream, "set_epoch"):
                stream.set_epoch(self.epoch * _PASS_STRIDE + pass_index)
            empty = True
            for row in stream:
                empty = False
                yield dict(row)
            if empty and self.cycle:
                raise ValueError(f"task group {group.key!r}: its streaming dataset yields no rows on rank {self.rank}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(
                f"streaming multi-task data is read in one sequence per process: set `dataloader_num_workers` to 0 "
                f"or 1, got {worker.num_workers}"
            )
        streams = [self._rows(group) for group in self.groups]
        if not self.cycle:
            active = list(range(len(self.groups)))
            while active:
                batch = {}
                for g in list(active):
                    group = self.groups[g]
                    rows = list(itertools.islice(streams[g], group.batch_size))
                    if rows:
                        batch[group.key] = group.collate(rows)
                    if len(rows) < group.batch_size:
                        active.remove(g)
                if batch:
                    yield batch
            return
        for step in itertools.count():
            batch = {}
            for g in self.task_sampler.draw(step, self.epoch):
                group = self.groups[g]
                batch[group.key] = group.collate(list(itertools.islice(streams[g], group.batch_size)))
            yield batch


def dataset_size(dataset: Any) -> int | None:
    """Rows in ``dataset``: its length, or for a streaming `datasets.IterableDataset` the size its
    info records for its split; `None` when unknown."""
    if not is_iterable_dataset(dataset):
        return len(dataset)
    splits = getattr(getattr(dataset, "info", None), "splits", None)
    split = getattr(dataset, "split", None)
    if splits and split is not None and str(split) in splits:
        return splits[str(split)].num_examples or None
    return None


def _as_is(batch: Any) -> Any:
    return batch


def build_dataloader(
    groups: Sequence[TaskGroup],
    *,
    sampling: str | TaskSampler = "all",
    seed: int = 42,
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    cycle: bool = True,
    temperature: float = 2.0,
    num_epochs: int = 1,
    **dataloader_kwargs: Any,
) -> MultiTaskDataLoader:
    """The multi-task `DataLoader` for ``groups``, already sharded for ``rank`` of ``num_replicas``.

    All groups map-style: a loader driven by a `MultiTaskBatchSampler` (has a length, resumes with
    ``skip_first_batches``). Any group iterable: a loader over a `MultiTaskIterableDataset` (endless
    when ``cycle=True``, at most one worker). Both have ``set_epoch``.

    The loader does its own sharding: do not hand it to ``accelerator.prepare`` (that would shard the
    steps again, so ranks would train different tasks in one step, and for iterable data it would
    dispatch batches from rank 0); move batches to the device as `Trainer._prepare_inputs` does.

    Args:
        groups (`Sequence[TaskGroup]`): the groups of `group_tasks`.
        sampling (`str` or `TaskSampler`, *optional*, defaults to `"all"`): a name of `list_samplers()` or a
            ready sampler.
        seed (`int`, *optional*, defaults to 42): the run's seed (the trainer's ``args.seed``).
        num_replicas (`int`, *optional*, defaults to 1) / rank (`int`, *optional*, defaults to 0): processes.
        shuffle (`bool`, *optional*, defaults to `True`), drop_last (`bool`, *optional*, defaults to `False`):
            map-style groups only.
        cycle (`bool`, *optional*, defaults to `True`): `False` reads every group once (evaluation).
        temperature (`float`, *optional*, defaults to 2.0), num_epochs (`int`, *optional*, defaults to 1):
            for the ``temperature`` and ``annealed`` samplers.
        **dataloader_kwargs: passed to `DataLoader` (``num_workers``, ``pin_memory``, ...).

    Raises:
        `ValueError`: an unknown sampler name, or a size-weighted sampler over a stream of unknown length.
    """
    from .sampling import SAMPLERS

    sizes = [dataset_size(group.dataset) for group in groups]
    if isinstance(sampling, TaskSampler):
        if len(sampling.sizes) != len(groups):
            raise ValueError(f"the task sampler has {len(sampling.sizes)} group sizes for {len(groups)} task groups")
        task_sampler = sampling
    else:
        sampler_class = SAMPLERS.get(sampling)
        unknown = [group.key for group, size in zip(groups, sizes) if size is None]
        if unknown and sampler_class.needs_sizes:
            raise ValueError(
                f"`task_sampling`={sampling!r} weighs task groups by their size, but the streaming data of "
                f"{unknown} has no known length; use one of: "
                f"{', '.join(n for n in SAMPLERS.names() if not SAMPLERS.get(n).needs_sizes)}"
            )
        task_sampler = sampler_class(
            [size or 1 for size in sizes], seed=seed, temperature=temperature, num_epochs=num_epochs
        )
    if any(group.is_iterable for group in groups):
        workers = dataloader_kwargs.get("num_workers", 0)
        if workers > 1:
            raise ValueError(
                f"streaming multi-task data is read in one sequence per process: set `dataloader_num_workers` to 0 "
                f"or 1, got {workers}"
            )
        dataset = MultiTaskIterableDataset(
            groups, task_sampler, seed, num_replicas=num_replicas, rank=rank, cycle=cycle
        )
        return MultiTaskDataLoader(dataset, batch_size=None, collate_fn=_as_is, **dataloader_kwargs)
    batch_sampler = MultiTaskBatchSampler(
        [int(size) for size in sizes],
        [group.batch_size for group in groups],
        task_sampler,
        seed,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        drop_last=drop_last,
        cycle=cycle,
    )
    return MultiTaskDataLoader(
        MultiTaskDataset(groups), batch_sampler=batch_sampler, collate_fn=MultiTaskCollator(groups), **dataloader_kwargs
    )

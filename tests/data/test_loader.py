"""The multi-task loader: grouping, per-task batch sizes, sharding over simulated ranks, the
iterable (streaming) path, and label checks."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from datasets import Dataset

from hf_mtl import Task
from hf_mtl.data import (
    MultiTaskBatchSampler,
    SpeechCollator,
    TextCollator,
    build_dataloader,
    check_labels,
    get_sampler,
    group_tasks,
    load_trec,
)


class Recording:
    """A collator that returns the row ids and counts its calls (one call = one encoder pass)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rows):
        self.calls += 1
        return {"ids": torch.tensor([row["id"] for row in rows])}


def _toy(n, num_labels=3, offset=0):
    return Dataset.from_dict(
        {"id": [offset + i for i in range(n)], "y": [i % num_labels for i in range(n)], "z": [i % 2 for i in range(n)]}
    )


def _groups(tasks, datasets, make_heads, collators, batch_sizes=None, default_batch_size=4):
    heads = make_heads(tasks)
    return group_tasks(
        tasks,
        datasets,
        batch_sizes=batch_sizes or {},
        default_batch_size=default_batch_size,
        collators=collators,
        label_collators={name: head.collate_labels for name, head in heads.items()},
    )


# ------------------------------------------------------------------------------ batch sampler plan


def _plan(rank, num_replicas=2, cycle=False, sampler="all", sizes=(10, 7, 1), batch_sizes=(3, 2, 4), **kwargs):
    task_sampler = get_sampler(sampler, list(sizes), seed=5)
    plan = MultiTaskBatchSampler(
        list(sizes),
        list(batch_sizes),
        task_sampler,
        seed=5,
        num_replicas=num_replicas,
        rank=rank,
        cycle=cycle,
        **kwargs,
    )
    return plan, list(plan)


def _rows_by_group(steps):
    rows: dict[int, list[int]] = {}
    for items in steps:
        for group, row in items:
            rows.setdefault(group, []).append(row)
    return rows


def test_shards_are_disjoint_and_cover_every_group():
    sizes = (10, 7, 1)
    (plan0, steps0), (_, steps1) = _plan(0), _plan(1)
    assert len(steps0) == len(steps1) == len(plan0) == max(plan0.batches_per_group())
    rows0, rows1 = _rows_by_group(steps0), _rows_by_group(steps1)
    for group, size in enumerate(sizes):
        padded = -(-size // 2) * 2  # each shard is padded (wrapping around) to the same length
        assert len(rows0[group]) == len(rows1[group]) == padded // 2
        assert set(rows0[group]) | set(rows1[group]) == set(range(size))
        assert len(rows0[group]) + len(rows1[group]) - len(set(rows0[group]) | set(rows1[group])) == padded - size
    assert not set(rows0[0]) & set(rows1[0])  # 10 rows over 2 ranks: no padding, no overlap


def test_groups_smaller_than_the_world():
    # one row, four ranks: every rank reads that row (once per pass) and the plan ends
    for rank in range(4):
        plan, steps = _plan(rank, num_replicas=4, cycle=True, sizes=(1, 9), batch_sizes=(2, 2))
        assert len(steps) == len(plan) == 2
        assert [row for group, row in steps[0] if group == 0] == [0]


def test_same_groups_on_every_rank_each_step():
    plans = [
        _plan(rank, num_replicas=3, cycle=True, sampler="proportional", sizes=(40, 25, 9), batch_sizes=(2, 3, 1))[1]
        for rank in range(3)
    ]
    assert len({len(steps) for steps in plans}) == 1
    for step in zip(*plans):
        assert len({tuple(sorted({group for group, _ in items})) for items in step}) == 1
    # in each step the ranks read different rows of a drawn group (no padding: 40 = 3 x 13 + 1 aside)
    for step in zip(*plans):
        rows = [{(group, row) for group, row in items if group == 0} for items in step]
        if rows[0]:
            assert not rows[0] & rows[1] and not rows[1] & rows[2] and not rows[0] & rows[2]


def test_plan_is_reproducible_and_changes_with_the_epoch():
    plan, first = _plan(0, cycle=True, sampler="uniform")
    assert list(plan) == first
    again, _ = _plan(0, cycle=True, sampler="uniform")
    assert list(again) == first
    plan.set_epoch(1)
    assert list(plan) != first
    unshuffled, steps = _plan(0, cycle=False, shuffle=False, sizes=(6,), batch_sizes=(2,))
    assert steps == [[(0, 0), (0, 2)], [(0, 4)]]


def test_cycling_groups_and_drop_last():
    plan, steps = _plan(0, num_replicas=1, cycle=True, sizes=(10, 4), batch_sizes=(3, 3), drop_last=True)
    assert plan.batches_per_group() == [3, 1] and len(steps) == 3
    for items in steps:  # every sub-batch full: the 4-row group cycles through new passes
        assert Counter(group for group, _ in items) == {0: 3, 1: 3}


def test_bad_plan_arguments():
    sampler = get_sampler("all", [4, 4])
    with pytest.raises(ValueError, match="one entry per task group"):
        MultiTaskBatchSampler([4], [2], sampler, seed=0)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, num_replicas=2\), got 2"):
        MultiTaskBatchSampler([4, 4], [2, 2], sampler, seed=0, num_replicas=2, rank=2)


# ------------------------------------------------------------------------------ groups and batches


def test_tasks_sharing_a_dataset_travel_as_one_sub_batch(fsdd_sample, make_heads):
    tasks = [Task("digit", "speech", num_labels=10), Task("speaker", "speech", num_labels=6)]
    speech = SpeechCollator(sampling_rate=8000)
    calls = []

    def counting(rows):
        calls.append(rows)
        return speech(rows)

    train = fsdd_sample["train"]
    groups = _groups(tasks, {"digit": train, "speaker": train}, make_heads, {"speech": counting}, default_batch_size=6)
    assert [group.key for group in groups] == ["digit+speaker"]
    batches = list(itertools.islice(build_dataloader(groups, seed=0), 3))
    assert len(calls) == 3  # one encoder input per step for both tasks
    for batch, rows in zip(batches, calls):
        assert list(batch) == ["digit+speaker"]
        sub_batch = batch["digit+speaker"]
        assert (
            sub_batch["input_values"].shape[0] == 6
            and sub_batch["attention_mask"].shape == sub_batch["input_values"].shape
        )
        assert set(sub_batch["labels"]) == {"digit", "speaker"}
        assert sub_batch["labels"]["digit"].tolist() == [row["digit"] for row in rows]
        assert sub_batch["labels"]["speaker"].tolist() == [row["speaker"] for row in rows]


def test_equal_content_is_shared_other_data_is_not(make_heads):
    tasks = [
        Task("coarse", "text", num_labels=6),
        Task("fine", "text", num_labels=60),
        Task("other", "text", num_labels=6, label_column="coarse"),
    ]
    a, b = load_trec()["train"], load_trec()["train"]  # two loads, one fingerprint
    groups = _groups(tasks, {"coarse": a, "fine": b, "other": a.select(range(10))}, make_heads, {"text": Recording()})
    assert [group.key for group in groups] == ["coarse+fine", "other"]


def test_per_task_batch_sizes(make_heads, tokenizer):
    tasks = [
        Task("y", "text", num_labels=3),
        Task("z", "text", num_labels=2),
        Task("q", "speech", num_labels=3, label_column="y"),
    ]
    text = _toy(50)
    text = text.add_column("text", ["what is the city ?"] * 50)
    speech = Dataset.from_dict({"audio": [[0.1] * (10 + i) for i in range(30)], "y": [i % 3 for i in range(30)]})
    collators = {"text": TextCollator(tokenizer), "speech": SpeechCollator()}
    # `z` shares `y`'s dataset and takes the batch size `y` sets; `q` falls back to the default
    groups = _groups(
        tasks, {"y": text, "z": text, "q": speech}, make_heads, collators, batch_sizes={"y": 5}, default_batch_size=3
    )
    assert [(group.key, group.batch_size) for group in groups] == [("y+z", 5), ("q", 3)]
    loader = build_dataloader(groups, sampling="proportional", seed=1, drop_last=True)
    seen = Counter()
    for batch in loader:
        for key, sub_batch in batch.items():
            rows = {"y+z": 5, "q": 3}[key]
            first = sub_batch["input_ids"] if key == "y+z" else sub_batch["input_values"]
            assert first.shape[0] == rows and all(labels.shape == (rows,) for labels in sub_batch["labels"].values())
            seen[key] += 1
    assert seen["y+z"] > seen["q"] > 0 and sum(seen.values()) == len(loader) == 10 + 10


def test_grouping_errors(make_heads):
    tasks = [Task("y", "text", num_labels=3), Task("z", "text", num_labels=2)]
    data = _toy(8)
    collators = {"text": Recording()}
    with pytest.raises(
        ValueError, match="share one dataset.* different batch sizes \\(4 vs 8\\) in `task_batch_sizes`"
    ):
        _groups(tasks, {"y": data, "z": data}, make_heads, collators, batch_sizes={"y": 4, "z": 8})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['w'\]; the tasks are: y, z"):
        _groups(tasks, {"y": data, "z": data, "w": data}, make_heads, collators)
    with pytest.raises(ValueError, match=r"task 'z' has no data: `train_dataset` must map every task .*\(it has: y\)"):
        _groups(tasks, {"y": data}, make_heads, collators)
    with pytest.raises(ValueError, match="task 'z' has no data: its `train_dataset` is empty"):
        _groups(tasks, {"y": data, "z": data.select([])}, make_heads, collators)
    with pytest.raises(
        ValueError,
        match=r"task 'y': its `train_dataset` is a DatasetDict with splits \['test', 'train'\]; pass one split",
    ):
        _groups(tasks, {"y": load_trec(), "z": data}, make_heads, collators)
    with pytest.raises(ValueError, match="no collator for encoder 'text'"):
        _groups(tasks, {"y": data, "z": data}, make_heads, {"speech": Recording()})
    with pytest.raises(ValueError, match=r"`task_batch_sizes\['y'\]` must be a positive integer, got 0"):
        _groups(tasks, {"y": data, "z": data}, make_heads, collators, batch_sizes={"y": 0})
    with pytest.raises(ValueError, match=r"`task_batch_sizes` names unknown task\(s\) \['digit'\]"):
        _groups(tasks, {"y": data, "z": data}, make_heads, collators, batch_sizes={"digit": 2})


def test_map_loader_ranks_and_epochs(make_heads):
    tasks = [Task("y", "toy", num_labels=3), Task("w", "toy", num_labels=3, label_column="y")]
    datasets = {"y": _toy(21), "w": _toy(8, offset=100)}
    ids = []
    for rank in range(2):
        groups = _groups(tasks, datasets, make_heads, {"toy": Recording()}, default_batch_size=4)
        loader = build_dataloader(groups, seed=3, num_replicas=2, rank=rank, cycle=False)
        batches = list(loader)
        assert len(batches) == len(loader) == 3  # ceil(ceil(21 / 2) / 4)
        ids.append([[sub["ids"].tolist() for sub in batch.values()] for batch in batches])
    flat = [set(itertools.chain.from_iterable(itertools.chain.from_iterable(rank_ids))) for rank_ids in ids]
    assert flat[0] | flat[1] == set(range(21)) | set(range(100, 108))
    loader.set_epoch(1)
    assert [[sub["ids"].tolist() for sub in batch.values()] for batch in loader] != ids[1]


# ------------------------------------------------------------------------------------ label checks


def test_check_labels_uses_the_heads(make_heads):
    tasks = [Task("y", "toy", num_labels=3), Task("z", "toy", num_labels=2)]
    heads = make_heads(tasks)
    good = _toy(12)
    groups = _groups(tasks, {"y": good, "z": good}, make_heads, {"toy": Recording()})
    check_labels(groups, heads)
    bad = Dataset.from_dict({"id": [0, 1, 2], "y": [0, 3, None], "z": [1, 0, 1]})
    groups = _groups(tasks, {"y": bad, "z": bad}, make_heads, {"toy": Recording()})
    with pytest.raises(
        ValueError, match=r"task 'y': label 3 is outside \[0, 2\] in column 'y' of its `train_dataset` \(num_labels=3"
    ):
        check_labels(groups, heads)
    missing = Dataset.from_dict({"id": [0, 1], "y": [0, 1]})
    groups = _groups(tasks, {"y": missing, "z": missing}, make_heads, {"toy": Recording()})
    with pytest.raises(
        ValueError,
        match=r"task 'z': label column 'z' \(`label_column`\) is not in its `eval_dataset`; columns present: id, y",
    ):
        check_labels(groups, heads, split="eval")
    check_labels(groups, heads, split="eval", require=False)


def test_missing_labels_are_masked_not_counted(make_heads):
    tasks = [Task("y", "toy", num_labels=3)]
    partial = Dataset.from_dict({"id": [0, 1, 2, 3], "y": [2, None, 0, None]})
    groups = _groups(tasks, {"y": partial}, make_heads, {"toy": Recording()})
    check_labels(groups, make_heads(tasks))
    batch = next(iter(build_dataloader(groups, shuffle=False, cycle=False)))
    assert batch["y"]["labels"]["y"].tolist() == [2, -100, 0, -100]


# ---------------------------------------------------------------------------------- iterable path


def test_iterable_dataset_path(make_heads):
    tasks = [
        Task("y", "toy", num_labels=3),
        Task("z", "toy", num_labels=2),
        Task("w", "toy", num_labels=3, label_column="y"),
    ]
    stream = _toy(23).to_iterable_dataset(num_shards=1)
    other = _toy(9, offset=100).to_iterable_dataset()
    per_rank = []
    for rank in range(2):
        collator = Recording()
        groups = _groups(
            tasks, {"y": stream, "z": stream, "w": other}, make_heads, {"toy": collator}, default_batch_size=5
        )
        assert [group.key for group in groups] == ["y+z", "w"] and all(group.is_iterable for group in groups)
        # training: endless, the sampler's draws are the same on every rank
        loader = build_dataloader(groups, sampling="uniform", seed=11, num_replicas=2, rank=rank)
        steps = list(itertools.islice(loader, 40))
        sampler = get_sampler("uniform", [1, 1], seed=11)
        assert [list(batch) for batch in steps] == [[groups[g].key for g in sampler.draw(step)] for step in range(40)]
        assert collator.calls == 40
        first = next(batch for batch in steps if "y+z" in batch)["y+z"]
        assert first["ids"].shape == (5,) and set(first["labels"]) == {"y", "z"}
        # evaluation: one pass over each shard, then the loader ends
        evaluation = list(build_dataloader(groups, seed=11, num_replicas=2, rank=rank, cycle=False))
        per_rank.append(
            {
                key: [i for batch in evaluation if key in batch for i in batch[key]["ids"].tolist()]
                for key in ("y+z", "w")
            }
        )
    for key, rows in (("y+z", range(23)), ("w", range(100, 109))):
        assert not set(per_rank[0][key]) & set(per_rank[1][key])
        assert sorted(per_rank[0][key] + per_rank[1][key]) == list(rows)


def test_iterable_path_errors(make_heads):
    tasks = [Task("y", "toy", num_labels=3)]
    groups = _groups(tasks, {"y": _toy(6).to_iterable_dataset()}, make_heads, {"toy": Recording()})
    with pytest.raises(
        ValueError,
        match=r"`task_sampling`='temperature' weighs task groups by their size.*use one of: all, round_robin, uniform",
    ):
        build_dataloader(groups, sampling="temperature")
    with pytest.raises(ValueError, match="`dataloader_num_workers` to 0 or 1, got 2"):
        build_dataloader(groups, num_workers=2)
    empty_rank = _groups(tasks, {"y": _toy(1).to_iterable_dataset()}, make_heads, {"toy": Recording()})
    with pytest.raises(ValueError, match="yields no rows on rank 1"):
        next(iter(build_dataloader(empty_rank, num_replicas=2, rank=1)))


def test_full_fsdd_three_tasks_over_two_ranks(fsdd_full, make_heads):
    tasks = [
        Task("digit", "speech", num_labels=10),
        Task("speaker", "speech", num_labels=6),
        Task("accent", "speech", num_labels=4),
    ]
    heads = make_heads(tasks)
    train = fsdd_full["train"].select_columns(["file", "digit", "speaker", "accent"])  # no audio: fast

    def files(rows):
        return {"files": [row["file"] for row in rows]}

    seen = []
    for rank in range(2):
        groups = _groups(
            tasks,
            {name: train for name in ("digit", "speaker", "accent")},
            make_heads,
            {"speech": files},
            default_batch_size=64,
        )
        check_labels(groups, heads)
        loader = build_dataloader(groups, seed=0, num_replicas=2, rank=rank, cycle=False)
        assert len(loader) == 22  # ceil(1350 / 64)
        rank_files = []
        for batch in loader:
            sub_batch = batch["digit+speaker+accent"]
            rank_files += sub_batch["files"]
            # labels line up with the rows: the digit is the first character of the file name
            assert sub_batch["labels"]["digit"].tolist() == [int(name[0]) for name in sub_batch["files"]]
        seen.append(rank_files)
    assert len(seen[0]) == len(seen[1]) == 1350 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(train["file"])

"""Single-task baselines and Δm in the loop.

`hf-mtl baseline RECIPE` trains every task of a recipe alone: the recipe with only that task, its encoder and
its data, the same training budget (steps, batch size, learning rate, schedule, seed, SAM) and the method
``ew`` (with one task, the plain loss). Each run is an ordinary saved run under
``<output_dir>-baselines/<task>/``; their evaluation metrics are collected in
``<output_dir>-baselines/baselines.json``, beside the multi-task run's folder (not inside it, so that a
baseline neither makes the run's ``output_dir`` non-empty nor is uploaded with the run)::

    {"tasks": {"coarse": {"accuracy": 0.91, "f1": 0.84}, ...},     # each task's eval metrics, alone
     "runs": {"coarse": "coarse", ...},                            # the run folders, relative to this file
     "recipe": "quickstart", "method": "ew"}

A multi-task run reads them through the training argument ``mtl_baselines`` (the file, or its folder), which
``hf-mtl train`` fills in from the default location when it exists; ``evaluate()`` then reports
``eval_delta_m``, Δm% of every task metric against its baseline (`hf_mtl.metrics.delta_m`: the mean over the
metrics of the signed relative change, lower is better, negative beats the baselines), each metric's
direction read from the metric itself (`hf_mtl.metrics.metric_greater_is_better`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The file, in the baselines folder, that holds every task's single-task metrics.
BASELINES_NAME = "baselines.json"
#: Training arguments that make no sense for a single-task baseline run and are reset.
_MULTI_TASK_ONLY = ("mtl_method_kwargs", "mtl_baselines", "push_to_hub", "hub_model_id", "resume_from_checkpoint")


def default_baselines_dir(output_dir: str | os.PathLike) -> str:
    """Where `hf-mtl baseline` writes the baselines of a run whose `output_dir` is ``output_dir``:
    the sibling folder ``<output_dir>-baselines``."""
    return os.path.normpath(str(output_dir)) + "-baselines"


def baselines_file(path: str | os.PathLike) -> str:
    """The ``baselines.json`` that ``path`` names: the file itself, or the one inside a folder."""
    path = str(path)
    return os.path.join(path, BASELINES_NAME) if os.path.isdir(path) else path


def load_baselines(path: str | os.PathLike, field: str = "mtl_baselines") -> dict[str, dict[str, float]]:
    """Reads a ``baselines.json`` (or the one in a folder): task -> metric name -> single-task value.

    Raises:
        `ValueError`: naming `field`, when the file is missing, is not JSON, or does not map tasks to metrics.
    """
    file = baselines_file(path)
    if not os.path.isfile(file):
        raise ValueError(
            f"`{field}`: {file!r} does not exist; `hf-mtl baseline RECIPE` writes it (by default to "
            f"<output_dir>-baselines/{BASELINES_NAME})"
        )
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`{field}`: {file!r} is not a JSON file: {error}") from error
    tasks = data.get("tasks") if isinstance(data, Mapping) else None
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f'`{field}`: {file!r} must hold {{"tasks": {{task: {{metric: value}}}}}}, got {data!r}')
    baselines: dict[str, dict[str, float]] = {}
    for task, metrics in tasks.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise ValueError(f"`{field}`: task {task!r} of {file!r} must map metric names to values, got {metrics!r}")
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{field}`: {task}.{name} of {file!r} must be a number, got {value!r}")
        baselines[str(task)] = {str(name): float(value) for name, value in metrics.items()}
    return baselines


def metric_directions(
    baselines: Mapping[str, Mapping[str, float]],
    task_metrics: Mapping[str, Mapping[str, Any]],
    tasks: list[str],
) -> dict[str, dict[str, bool]]:
    """Task -> baseline metric -> whether higher is better, for the evaluated ``tasks``; checked before training.

    A result name belongs to the metric module whose name it is or starts with (``f1`` for ``f1``, ``f1_0`` for
    a per-class ``f1``), and takes that module's direction (`hf_mtl.metrics.metric_greater_is_better`).

    Args:
        baselines: `load_baselines`' output.
        task_metrics: task -> metric name -> `evaluate.EvaluationModule` (the trainer's resolved metrics).
        tasks: the tasks that are evaluated.

    Raises:
        `ValueError`: for an evaluated task without a baseline, a baseline metric that is not one of the task's
        metrics, or a metric that does not say its direction.
    """
    from .metrics import metric_greater_is_better

    directions: dict[str, dict[str, bool]] = {}
    for task in tasks:
        if task not in baselines:
            raise ValueError(
                f"`mtl_baselines` has no single-task result for task {task!r} (it has: {', '.join(baselines)}); "
                "rerun `hf-mtl baseline` on this recipe"
            )
        modules = task_metrics.get(task, {})
        directions[task] = {}
        for result in baselines[task]:
            owner = next(
                (
                    name
                    for name in sorted(modules, key=len, reverse=True)
                    if result == name or result.startswith(f"{name}_")
                ),
                None,
            )
            if owner is None:
                raise ValueError(
                    f"`mtl_baselines`: metric {result!r} of task {task!r} is not one of the task's metrics "
                    f"({', '.join(modules) or 'none'}); rerun `hf-mtl baseline` with the same metrics"
                )
            direction = metric_greater_is_better(modules[owner])
            if direction is None:
                raise ValueError(
                    f"metric {owner!r} of task {task!r} does not say whether higher is better, which Δm needs: set "
                    "`greater_is_better = True` (or `False`) on the evaluate module"
                )
            directions[task][result] = direction
    return directions


def baseline_delta_m(
    metrics: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, bool]],
    prefix: str = "eval",
) -> float:
    """Δm% of a run's ``{prefix}_<task>_<metric>`` results against the single-task ``baselines``, over every
    metric of the tasks in ``directions`` (`hf_mtl.metrics.delta_m`: lower is better). NaN, with a warning,
    when a value is missing or not finite (a task without any present label)."""
    from .metrics import delta_m

    values, base, higher = {}, {}, {}
    for task, names in directions.items():
        for name, direction in names.items():
            key = f"{task}_{name}"
            base[key], higher[key] = baselines[task][name], direction
            value = metrics.get(f"{prefix}_{key}")
            if value is None or not math.isfinite(float(value)):
                logger.warning(f"Δm: {prefix}_{key} is {value!r}; {prefix}_delta_m is NaN")
                return math.nan
            values[key] = float(value)
    return delta_m(values, base, higher)


# ---------------------------------------------------------------------------------------------- training them
def single_task_recipe(recipe: Any, task: str, output_dir: str) -> Any:
    """The baseline recipe of one task: only that task, its encoder and its data, the same training budget,
    method ``ew``, written to ``output_dir``.

    A `metric_for_best_model` of ``delta_m`` (which needs baselines) becomes ``loss``.
    """
    from .recipes import Recipe

    data = copy.deepcopy(recipe.source)
    entries = [entry for entry in data["tasks"] if entry.get("name") == task]
    if not entries:
        names = [entry.get("name") for entry in data["tasks"]]
        raise ValueError(f"no task named {task!r}; the tasks are: {', '.join(map(str, names))}")
    entry = entries[0]
    data["tasks"] = [entry]
    data["encoders"] = {entry["encoder"]: data["encoders"][entry["encoder"]]}
    data["data"] = {entry["data"]: data["data"][entry["data"]]}
    data["name"] = f"{recipe.name or 'recipe'} ({task} alone)"
    training = dict(data.get("training") or {})
    for key in _MULTI_TASK_ONLY:
        training.pop(key, None)
    training["mtl_method"] = "ew"
    training["output_dir"] = output_dir
    sizes = training.get("task_batch_sizes")
    if isinstance(sizes, str):
        sizes = json.loads(sizes)
    if isinstance(sizes, Mapping):
        training["task_batch_sizes"] = {name: size for name, size in sizes.items() if name == task} or None
    if training.get("metric_for_best_model") in ("delta_m", "eval_delta_m"):
        training["metric_for_best_model"] = "loss"
        training.pop("greater_is_better", None)
    data["training"] = training
    return Recipe.from_dict(data)


def task_results(metrics: Mapping[str, float], task: str, prefix: str = "eval") -> dict[str, float]:
    """A task's metrics from ``{prefix}_<task>_<metric>`` results (its loss left out)."""
    start = f"{prefix}_{task}_"
    return {
        key[len(start) :]: float(value)
        for key, value in metrics.items()
        if key.startswith(start) and key != f"{start}loss"
    }


def train_baselines(
    recipe: Any, output_dir: str | None = None, overwrite: bool = False, tasks: list[str] | None = None
) -> tuple[str, dict[str, dict[str, float]]]:
    """Trains each task of ``recipe`` alone (`single_task_recipe`), saves each run under ``<folder>/<task>`` and
    writes ``<folder>/baselines.json``.

    Args:
        recipe (`Recipe`): the multi-task recipe.
        output_dir (`str`, *optional*): the baselines folder; defaults to ``<output_dir of the recipe>-baselines``.
        overwrite (`bool`, *optional*, defaults to `False`): write into a baselines folder that already holds files.
        tasks (`list[str]`, *optional*): only these tasks (default: every task with an eval split).

    Returns:
        `(str, dict)`: the path of ``baselines.json`` and task -> metric -> value.
    """
    from .recipes import build_trainer, training_arguments

    args = training_arguments(recipe)
    folder = output_dir or default_baselines_dir(args.output_dir)
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise ValueError(
            f"the baselines folder {folder!r} already exists and is not empty; set `overwrite_output_dir=true` to "
            "train the baselines again into it, or choose another folder"
        )
    names = [entry["name"] for entry in recipe.tasks]
    unknown = sorted(set(tasks or []) - set(names))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are: {', '.join(names)}")
    evaluated = {entry["name"] for entry in recipe.tasks if recipe.data[entry["data"]].eval_split is not None}
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    for name in tasks or names:
        if name not in evaluated:
            logger.warning(f"task {name!r} has no eval split: no baseline is trained for it")
            continue
        single = single_task_recipe(recipe, name, os.path.join(folder, name))
        single_args = training_arguments(single)
        single_args.overwrite_output_dir = overwrite
        trainer = build_trainer(single, single_args)
        trainer.train()
        metrics = trainer.evaluate()
        trainer.save_model(single_args.output_dir)
        results[name] = task_results(metrics, name)
        runs[name] = name
        logger.info(f"baseline {name}: {results[name]}")
    file = os.path.join(folder, BASELINES_NAME)
    os.makedirs(folder, exist_ok=True)
    with open(file, "w", encoding="utf-8") as f:
        json.dump({"tasks": results, "runs": runs, "recipe": recipe.name, "method": "ew"}, f, indent=2)
    return file, results

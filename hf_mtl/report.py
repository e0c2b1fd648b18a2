"""`hf-mtl report RUN_DIR`: PNG plots of a training run, from the files the run leaves in its folder.

Reads ``RUN_DIR/trainer_state.json`` (the Trainer's ``log_history``; `MultiTaskTrainer.train` writes it at
the end, and every checkpoint holds one: the newest checkpoint's is used when the run folder has none)
and, when the run measured them (``mtl_diagnostics_steps``), ``RUN_DIR/mtl_diagnostics.jsonl``. Writes into
``RUN_DIR/plots/`` the plots there is data for, under stable names (the model card links them):

| file | what it shows |
| --- | --- |
| ``training_loss.png`` | the training loss and each task's (``loss``, ``loss/<task>``) over the steps |
| ``eval_metrics.png`` | each evaluation metric of each task (``eval_<task>_<metric>``) over the steps, one panel per metric |
| ``task_weights.png`` | the method's task weights (``weight/<task>``) over the steps |
| ``cosine_heatmap.png`` | the inter-task cosine matrix of each block of shared parameters, averaged over the measurements (or the last one) |
| ``conflict.png`` | inter-task vs inter-sample conflict over training, per block: cosine (angle), magnitude similarity and the ratio of conflicting parameters; the mean over the pairs with their interquartile range |

matplotlib is an optional dependency (``pip install hf-mtl[report]``), imported only here; the figures are
drawn on `matplotlib.figure.Figure` objects, so no pyplot state or backend of the caller is touched.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .callbacks import DIAGNOSTICS_FILE, read_diagnostics

logger = logging.get_logger(__name__)

#: Folder, inside the run folder, that receives the plots.
PLOTS_DIR = "plots"
#: Plot name -> file name inside ``plots/``. Stable: model cards and READMEs link these names.
PLOT_FILES = {
    "training_loss": "training_loss.png",
    "eval_metrics": "eval_metrics.png",
    "task_weights": "task_weights.png",
    "cosine_heatmap": "cosine_heatmap.png",
    "conflict": "conflict.png",
}
STATE_FILE = "trainer_state.json"
#: Resolution of the PNG files (small files, readable on a README).
_DPI = 80

#: The measures of `conflict.png`: record key -> axis label.
_CONFLICT_MEASURES = {
    "cosine": "cosine similarity",
    "magnitude_similarity": "magnitude similarity",
    "conflicting_parameters": "conflicting parameters",
}


@dataclass
class Series:
    """One plotted line: ``values[i]`` at ``steps[i]``; ``low`` / ``high`` bound a shaded band (conflict plot)."""

    label: str
    steps: list[int]
    values: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


@dataclass
class Heatmap:
    """The inter-task cosine matrix of one block: ``matrix[i][j]`` between ``tasks[i]`` and ``tasks[j]``, the
    mean over the measurements at ``steps`` (one step with ``heatmap="last"``)."""

    block: str
    tasks: list[str]
    matrix: list[list[float]]
    steps: list[int]


@dataclass
class Report:
    """What `make_report` wrote and the data of every plot.

    Attributes:
        files (`dict[str, str]`): plot name (`PLOT_FILES`) -> path of the PNG written.
        series (`dict[str, dict[str, list[Series]]]`): plot name -> panel -> its lines, for the line plots.
        heatmaps (`list[Heatmap]`): the matrices of ``cosine_heatmap.png``, one per block.
        skipped (`dict[str, str]`): plot name -> why it was not drawn (no data in the run).
    """

    files: dict[str, str] = field(default_factory=dict)
    series: dict[str, dict[str, list[Series]]] = field(default_factory=dict)
    heatmaps: list[Heatmap] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "`hf-mtl report` draws its plots with matplotlib, which is not installed: "
            "pip install 'hf-mtl[report]' (or pip install matplotlib)"
        ) from error
    return matplotlib


def load_log_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``log_history`` of ``run_dir/trainer_state.json``, or of its newest checkpoint's when the run folder
    has none (a run stopped before its end); ``[]`` when neither exists."""
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        checkpoints = glob.glob(os.path.join(run_dir, "checkpoint-*", STATE_FILE))
        steps = [(int(m.group(1)), p) for p in checkpoints if (m := re.search(r"checkpoint-(\d+)", p))]
        if not steps:
            return []
        path = max(steps)[1]
        logger.warning(f"{run_dir} has no {STATE_FILE}: using {path}")
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).get("log_history", []))


def _task_names(history: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], run_dir: str) -> list[str]:
    """The run's tasks, in task order where it is known: from ``config.json`` (a saved `MultiTaskModel`), the
    diagnostics records, then the ``loss/<task>`` logs."""
    names: list[str] = []
    config = os.path.join(run_dir, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            tasks = json.load(f).get("tasks")
        if isinstance(tasks, list):
            names = [t["name"] for t in tasks if isinstance(t, Mapping) and "name" in t]
        elif isinstance(tasks, Mapping):
            names = list(tasks)
    for record in records:
        names += list(record.get("tasks", []))
    for entry in history:  # trainer_state.json sorts its keys: the task order is lost here
        names += [key[len("loss/") :] for key in entry if key.startswith("loss/")]
    return list(dict.fromkeys(names))


def _line(history: Sequence[Mapping[str, Any]], key: str, label: str | None = None) -> Series | None:
    points = [(int(e["step"]), float(e[key])) for e in history if key in e and "step" in e and e[key] is not None]
    if not points:
        return None
    return Series(label=label or key, steps=[s for s, _ in points], values=[v for _, v in points])


def training_loss_series(history: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, list[Series]]:
    """``{"loss": [the training loss, then each task's]}`` from the training logs (entries with ``loss``)."""
    train = [e for e in history if "loss" in e]
    lines = [_line(train, "loss", "total (the Trainer's loss)")] + [_line(train, f"loss/{t}", t) for t in tasks]
    lines = [line for line in lines if line is not None]
    return {"loss": lines} if lines else {}


def eval_metric_series(history: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, list[Series]]:
    """Metric -> one line per task, from the ``eval_<task>_<metric>`` logs (task names matched longest first)."""
    ordered = sorted(tasks, key=len, reverse=True)
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for entry in history:
        for key, value in entry.items():
            if not key.startswith("eval_") or not isinstance(value, (int, float)) or "step" not in entry:
                continue
            rest = key[len("eval_") :]
            task = next((t for t in ordered if rest.startswith(f"{t}_")), None)
            if task is None:
                continue
            metric = rest[len(task) + 1 :]
            panels.setdefault(metric, {}).setdefault(task, []).append((int(entry["step"]), float(value)))
    return {
        metric: [
            Series(label=task, steps=[s for s, _ in by_task[task]], values=[v for _, v in by_task[task]])
            for task in tasks
            if task in by_task
        ]
        for metric, by_task in sorted(panels.items(), key=lambda item: (item[0] == "loss", item[0]))
    }


def task_weight_series(history: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, list[Series]]:
    """``{"weight": one line per task}`` from the ``weight/<task>`` logs."""
    lines = [line for t in tasks if (line := _line(history, f"weight/{t}", t)) is not None]
    return {"weight": lines} if lines else {}


def cosine_heatmaps(records: Sequence[Mapping[str, Any]], heatmap: str = "mean") -> list[Heatmap]:
    """Per block, the inter-task cosine matrix averaged over its measurements (``"mean"``; those with the block's
    most frequent task list, when tasks were drawn) or the last one (``"last"``)."""
    if heatmap not in ("mean", "last"):
        raise ValueError(f"`heatmap` must be 'mean' or 'last', got {heatmap!r}")
    maps = []
    for block in dict.fromkeys(r["block"] for r in records):
        mine = [r for r in records if r["block"] == block]
        if heatmap == "last":
            chosen = [mine[-1]]
        else:
            lists = [tuple(r["tasks"]) for r in mine]
            common = max(dict.fromkeys(lists), key=lists.count)
            chosen = [r for r in mine if tuple(r["tasks"]) == common]
        k = len(chosen[0]["tasks"])
        matrix = [[_mean([r["inter_task"]["cosine"][i][j] for r in chosen]) for j in range(k)] for i in range(k)]
        maps.append(
            Heatmap(block=block, tasks=list(chosen[0]["tasks"]), matrix=matrix, steps=[r["step"] for r in chosen])
        )
    return maps


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _pairs(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """The entries ``i < j`` of a square matrix (``None`` left out)."""
    return [matrix[i][j] for i in range(len(matrix)) for j in range(i + 1, len(matrix)) if matrix[i][j] is not None]


def conflict_series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Series]]:
    """Panel ``"<block>/<measure>"`` -> lines over the measurement steps: inter-task per sample (the pairs of
    tasks on each probe sample, when the block's tasks share their rows), inter-task on the probe (the task
    gradients of the whole probe) and inter-sample per task (the pairs of probe samples). Each value is the
    mean over the pairs; ``low`` / ``high`` their 25th / 75th percentiles."""
    panels: dict[str, list[Series]] = {}
    for block in dict.fromkeys(r["block"] for r in records):
        mine = [r for r in records if r["block"] == block]
        for measure in _CONFLICT_MEASURES:
            sources: dict[str, list[tuple[int, list[float]]]] = {}
            for r in mine:
                if measure not in r["inter_task"]:
                    continue
                if "inter_task_per_sample" in r:
                    pooled = [v for matrix in r["inter_task_per_sample"][measure] for v in _pairs(matrix)]
                    sources.setdefault("inter-task (per sample)", []).append((r["step"], pooled))
                sources.setdefault("inter-task (probe batch)", []).append((r["step"], _pairs(r["inter_task"][measure])))
                for task, entry in r["inter_sample"].items():
                    sources.setdefault(f"inter-sample: {task}", []).append((r["step"], _pairs(entry[measure])))
            lines = []
            for label, points in sources.items():
                points = [(step, values) for step, values in points if values]
                if not points:
                    continue
                lines.append(
                    Series(
                        label=label,
                        steps=[step for step, _ in points],
                        values=[sum(v) / len(v) for _, v in points],
                        low=[_quantile(v, 0.25) for _, v in points],
                        high=[_quantile(v, 0.75) for _, v in points],
                    )
                )
            if lines:
                panels[f"{block}/{measure}"] = lines
    return panels


# ------------------------------------------------------------------------------- drawing


def _draw_lines(panels: Mapping[str, list[Series]], title: str, ylabels: Mapping[str, str] | None = None) -> Any:
    """One panel per entry; lines over the steps (with their bands), or grouped bars when every series of a
    panel has a single point (e.g. one final evaluation)."""
    from matplotlib.figure import Figure

    names = list(panels)
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, name in enumerate(names):
        ax = axes[index // columns][index % columns]
        lines = panels[name]
        if all(len(series.steps) == 1 for series in lines):
            positions = range(len(lines))
            bars = ax.bar(positions, [series.values[0] for series in lines], color=[f"C{i}" for i in positions])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_xticks(positions, [series.label for series in lines], rotation=30, ha="right", fontsize=8)
            steps = sorted({series.steps[0] for series in lines})
            ax.set_xlabel(f"task (step {', '.join(map(str, steps))})")
        else:
            for series in lines:
                marker = "o" if len(series.steps) < 3 else None
                (line,) = ax.plot(series.steps, series.values, label=series.label, marker=marker, linewidth=1.4)
                if series.low is not None and series.high is not None and len(series.steps) > 1:
                    ax.fill_between(
                        series.steps, series.low, series.high, color=line.get_color(), alpha=0.15, linewidth=0
                    )
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        if len(names) > 1:
            ax.set_title(name, fontsize=10)
        ax.set_ylabel((ylabels or {}).get(name, name))
        ax.grid(alpha=0.3)
    for index in range(len(names), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.suptitle(title, fontsize=11)
    return figure


def _draw_heatmaps(maps: Sequence[Heatmap], heatmap: str) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6 * len(maps) + 0.8, 3.4), dpi=_DPI, layout="constrained")
    axes = figure.subplots(1, len(maps), squeeze=False)[0]
    image = None
    for ax, item in zip(axes, maps):
        image = ax.imshow(item.matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        ax.set_xticks(range(len(item.tasks)), item.tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(item.tasks)), item.tasks, fontsize=8)
        for i, row in enumerate(item.matrix):
            for j, value in enumerate(row):
                color = "white" if abs(value) > 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        what = f"mean of {len(item.steps)} steps" if heatmap == "mean" else f"step {item.steps[-1]}"
        ax.set_title(f"{item.block}\n({what})", fontsize=9)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="inter-task cosine")
    return figure


def _save_png(figure: Any, path: str) -> None:
    """Saves a figure as a PNG with a 256-colour palette (Pillow, a matplotlib dependency): a few times smaller
    than full RGBA for plots, with no visible change."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


def conflict_summary(panels: Mapping[str, Sequence[Series]]) -> list[tuple[str, str, int, float, float, float]]:
    """``(panel, line, measurements, mean, min, max)`` of each line of the conflict plot (`conflict_series`): the
    mean, smallest and largest of its per-measurement values over training, as ``hf-mtl report`` prints them."""
    return [
        (panel, line.label, len(line.values), _mean(line.values), min(line.values), max(line.values))
        for panel, lines in panels.items()
        for line in lines
    ]


def make_report(
    run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, heatmap: str = "mean"
) -> Report:
    """Draws the plots of a run (module docstring) into ``output_dir`` (default ``RUN_DIR/plots``).

    Args:
        run_dir (`str` or `os.PathLike`): the run's ``output_dir``.
        output_dir (`str` or `os.PathLike`, *optional*): where the PNG files go; defaults to ``RUN_DIR/plots``.
        heatmap (`str`, *optional*, defaults to `"mean"`): the cosine heatmap of the mean over the
            measurements (``"mean"``) or of the last one (``"last"``).

    Returns:
        `Report`: the files written and the data of every plot (``series``, ``heatmaps``).

    Raises:
        `ValueError`: ``run_dir`` is no folder, or holds neither a ``trainer_state.json`` (itself or in a
            checkpoint) nor a ``mtl_diagnostics.jsonl``.
        `ImportError`: matplotlib is not installed (the message says how to install it).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"run folder {run_dir!r} does not exist")
    if heatmap not in ("mean", "last"):
        raise ValueError(f"`heatmap` must be 'mean' or 'last', got {heatmap!r}")
    history = load_log_history(run_dir)
    records = read_diagnostics(run_dir)
    if not history and not records:
        raise ValueError(
            f"{run_dir!r} holds no {STATE_FILE} (in the folder or a checkpoint-*/) and no {DIAGNOSTICS_FILE}: "
            "pass the `output_dir` of a training run"
        )
    _matplotlib()
    tasks = _task_names(history, records, run_dir)
    report = Report()
    out = os.fspath(output_dir) if output_dir is not None else os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)

    def save(name: str, figure: Any) -> None:
        path = os.path.join(out, PLOT_FILES[name])
        _save_png(figure, path)
        report.files[name] = path

    line_plots = {
        "training_loss": (training_loss_series(history, tasks), "Training loss", {"loss": "training loss"}),
        "eval_metrics": (eval_metric_series(history, tasks), "Evaluation metrics", None),
        "task_weights": (task_weight_series(history, tasks), "Task weights of the method", {"weight": "weight"}),
    }
    for name, (panels, title, ylabels) in line_plots.items():
        if panels:
            report.series[name] = panels
            save(name, _draw_lines(panels, title, ylabels))
        else:
            report.skipped[name] = "no such logs in trainer_state.json"
    if records:
        report.heatmaps = cosine_heatmaps(records, heatmap)
        save("cosine_heatmap", _draw_heatmaps(report.heatmaps, heatmap))
        panels = conflict_series(records)
        report.series["conflict"] = panels
        ylabels = {name: _CONFLICT_MEASURES[name.rsplit("/", 1)[1]] for name in panels}
        save(
            "conflict",
            _draw_lines(panels, "Inter-task vs inter-sample gradient conflict (mean and IQR over pairs)", ylabels),
        )
    else:
        for name in ("cosine_heatmap", "conflict"):
            report.skipped[name] = f"no {DIAGNOSTICS_FILE} (train with `mtl_diagnostics_steps`)"
    return report


__all__ = [
    "PLOTS_DIR",
    "PLOT_FILES",
    "Heatmap",
    "Report",
    "Series",
    "conflict_series",
    "cosine_heatmaps",
    "eval_metric_series",
    "load_log_history",
    "make_report",
    "task_weight_series",
    "training_loss_series",
]

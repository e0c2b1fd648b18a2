"""The study: where multi-task learning, gradient surgery and F-MTL help on speech, text and vision.

    python scripts/study.py                      # every run not done yet, then the table
    python scripts/study.py --list               # the plan: run ids and their commands
    python scripts/study.py --only 'mtl/ew/*'    # the runs whose id matches (fnmatch), e.g. one table row
    python scripts/study.py --table --write_readme README.md   # the table from the result files only
    python scripts/study.py --max_steps 5 --seeds 1 --results /tmp/smoke --only 'mtl/ew/*'   # a smoke test

Every training run is ``hf-mtl train recipes/quickstart.yaml`` plus overrides (``--set``): the full FSDD
(digit, speaker), the full TREC (coarse, fine, on the pretrained all-MiniLM-L6-v2) and the UCI digits,
``--max_steps`` steps of 16 examples per task. It runs as its own process and leaves one JSON file per run
in ``--results`` (committed); a run whose file exists is skipped, so an interrupted study resumes where
it stopped. Model folders go to ``--work`` (not committed). The runs:

- ``stl/<task>/seed<s>``: single-task baselines, the recipe with one task (``ew``);
- ``mtl/<method>/seed<s>``: all five tasks with ``ew``, ``pcgrad``, ``cagrad``, ``mgda``, ``imtl``, ``nash_mtl``,
  ``upgrad``; ``mtl/fmtl+<method>`` (F-MTL over ``pcgrad``, ``cagrad``, ``mgda``, ``imtl``); ``mtl/sam+ew``.
  The ``ew`` runs also measure gradient conflict (``--mtl_diagnostics_steps 5``, 8 samples: Elich et al.'s
  protocol), which gives the inter-task vs inter-sample table (the diagnostics do not change the run);
- ``opt/<optimizer>/<method>/lr<lr>/val``: AdamW and SGD with momentum 0.9, for ``ew`` and ``cagrad``, on a
  small learning-rate grid, trained on the training split minus a seeded, stratified 15 % validation split
  and evaluated on it (seed 0); the learning rate with the best mean validation accuracy over the five
  tasks is then run on the test split with every seed (``opt/<optimizer>/<method>/best/seed<s>``);
- ``corruption/<model>/<corruption>/seed<s>``: the corruption check of Elich et al. (App. A6) in small: the
  encoders of the STL and the ``ew`` MTL models are frozen, the heads of the speech and vision tasks are
  fine-tuned (``--corruption_steps`` steps) on corrupted training data and evaluated on the same corruption
  of the test data: additive white noise at SNR 20, 10, 0 dB (audio), Gaussian noise (sigma 0.1, 0.2, 0.4)
  and Gaussian blur (sigma 0.5, 1.0 px) (images), and the same fine-tuning on clean data as the reference.
  delta_t = mean over corruptions and severities of -(M_MTL,corr / M_MTL,clean - M_STL,corr / M_STL,clean)
  (accuracy, higher is better): delta_t < 0 favours the MTL encoder.

The table (``--table``, also at the end of a run) has the per-task test accuracy as mean ± std over the
seeds, delta-m (`hf_mtl.metrics.delta_m`, over the accuracy and macro F1 of the five tasks, against the
means of the single-task runs), the mean time of a run and the command of each row.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "recipes/quickstart.yaml"
TASKS = ("digit", "speaker", "coarse", "fine", "handwritten")
MODALITY = {"digit": "speech", "speaker": "speech", "coarse": "text", "fine": "text", "handwritten": "vision"}
DATA_OF = {"speech": "fsdd", "text": "trec", "vision": "uci_digits"}
JACOBIAN = ("pcgrad", "cagrad", "mgda", "imtl", "nash_mtl", "upgrad")
FMTL_BASES = ("pcgrad", "cagrad", "mgda", "imtl")
OPTIMIZERS = {
    "adamw": {"grid": (5e-4, 2e-3, 5e-3), "options": []},
    "sgd": {"grid": (0.01, 0.05, 0.2), "options": ["--optim", "sgd", "--optim_args", "momentum=0.9"]},
}
OPT_METHODS = ("ew", "cagrad")
VALIDATION_FRACTION = 0.15
VALIDATION_SEED = 0
STRATIFY = {"fsdd": "digit", "trec": "coarse", "uci_digits": "label"}
CORRUPTIONS = {
    "speech": [("noise_snr_db", 20.0), ("noise_snr_db", 10.0), ("noise_snr_db", 0.0)],
    "vision": [("gaussian_noise", 0.1), ("gaussian_noise", 0.2), ("gaussian_noise", 0.4), ("blur", 0.5), ("blur", 1.0)],
}
CORRUPTED_TASKS = {"speech": ("digit", "speaker"), "vision": ("handwritten",)}


@dataclass
class Run:
    """One run of the study: an id (``mtl/pcgrad/seed0``), the table row it belongs to, and what to run."""

    id: str
    row: str
    seed: int
    kind: str = "train"  # "train" or "corruption"
    overrides: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the plan


def _common(args: argparse.Namespace, run_id: str, seed: int) -> tuple[list[str], list[str]]:
    """Overrides and options every training run shares: the full data, the budget, its folder and seed."""
    overrides = [
        f"max_steps={args.max_steps}",
        f"warmup_steps={max(1, args.max_steps // 10)}",
        f"logging_steps={max(1, args.max_steps // 8)}",
        f"seed={seed}",
    ]
    folder = os.path.join(args.work, run_id)
    if os.path.abspath(folder).startswith(ROOT + os.sep):
        folder = os.path.relpath(folder, ROOT)  # the recorded command runs from the repository root anywhere
    options = ["--output_dir", folder, "--overwrite_output_dir", "true"]
    return overrides, options


def _full_data(args: argparse.Namespace) -> list[str]:
    """The full FSDD and TREC instead of the samples shipped with hf_mtl (the UCI digits are whole already)."""
    return [
        f"data.fsdd.data_dir={os.path.join(args.data_root, 'fsdd')}",
        f"data.trec.data_dir={os.path.join(args.data_root, 'trec')}",
    ]


def _single_task(args: argparse.Namespace, task: str) -> list[str]:
    """The recipe with one task and its data set (the other encoders are built but read by no task)."""
    entry = {"name": task, "encoder": MODALITY[task], "data": DATA_OF[MODALITY[task]]}
    if task == "handwritten":
        entry["label_column"] = "label"
    key = DATA_OF[MODALITY[task]]
    spec: dict[str, Any] = {"loader": "digits"} if key == "uci_digits" else {"loader": key}
    if key != "uci_digits":
        spec["data_dir"] = os.path.join(args.data_root, key)
    return [f"tasks=[{json.dumps(entry)}]", f"data={json.dumps({key: spec})}"]


def _validation_data(args: argparse.Namespace) -> list[str]:
    """Overrides that read the training split minus a validation split (parquet files prepared in ``--work``)."""
    folder = os.path.join(args.work, "validation_data")
    overrides = []
    for key in ("fsdd", "trec", "uci_digits"):
        files = {split: os.path.join(folder, key, f"{split}.parquet") for split in ("train", "validation")}
        spec = {
            "loader": "load_dataset",
            "path": "parquet",
            "data_dir": None,
            "options": {"data_files": files},
            "eval_split": "validation",
        }
        overrides.append(f"data.{key}={json.dumps(spec)}")
    return overrides


def plan(args: argparse.Namespace, results: Mapping[str, Mapping[str, Any]]) -> list[Run]:
    """Every run of the study, in the order they run (the best learning rates need the validation runs)."""
    seeds = list(range(args.seeds))
    runs: list[Run] = []

    def train(run_id: str, row: str, seed: int, overrides: Sequence[str] = (), options: Sequence[str] = (), **meta):
        common, folder = _common(args, run_id, seed)
        runs.append(Run(run_id, row, seed, "train", [*common, *overrides], [*folder, *options], dict(meta)))

    for task in TASKS:
        for seed in seeds:
            train(
                f"stl/{task}/seed{seed}",
                f"stl/{task}",
                seed,
                _single_task(args, task),
                ["--mtl_method", "ew"],
                task=task,
            )
    for method in ("ew", *JACOBIAN):
        diagnostics = ["--mtl_diagnostics_steps", "5", "--mtl_diagnostics_samples", "8"] if method == "ew" else []
        for seed in seeds:
            options = ["--mtl_method", method, *diagnostics]
            train(f"mtl/{method}/seed{seed}", method, seed, _full_data(args), options, method=method)
    for method in FMTL_BASES:
        for seed in seeds:
            options = ["--mtl_method", method, "--sam", "fmtl"]
            train(
                f"mtl/fmtl+{method}/seed{seed}",
                f"fmtl+{method}",
                seed,
                _full_data(args),
                options,
                method=method,
                sam="fmtl",
            )
    for seed in seeds:
        options = ["--mtl_method", "ew", "--sam", "sam"]
        train(f"mtl/sam+ew/seed{seed}", "sam+ew", seed, _full_data(args), options, method="ew", sam="sam")
    for optimizer, spec in OPTIMIZERS.items():
        for method in OPT_METHODS:
            base = f"opt/{optimizer}/{method}"
            for lr in spec["grid"]:
                options = ["--mtl_method", method, "--learning_rate", str(lr), *spec["options"]]
                train(
                    f"{base}/lr{lr:g}/val",
                    f"{base}/lr{lr:g}/val",
                    VALIDATION_SEED,
                    _validation_data(args),
                    options,
                    method=method,
                    optimizer=optimizer,
                    learning_rate=lr,
                    split="validation",
                )
            best = best_learning_rate(results, base, spec["grid"])
            for seed in seeds:
                options = ["--mtl_method", method, "--learning_rate", str(best or "BEST"), *spec["options"]]
                train(
                    f"{base}/best/seed{seed}",
                    f"{base}/best",
                    seed,
                    _full_data(args),
                    options,
                    method=method,
                    optimizer=optimizer,
                    learning_rate=best,
                    needs_validation=best is None,
                )
    for modality, tasks in CORRUPTED_TASKS.items():
        for corruption, severity in [("clean", 0.0), *CORRUPTIONS[modality]]:
            for seed in seeds:
                models = {"mtl": f"mtl/ew/seed{seed}", **{f"stl_{t}": f"stl/{t}/seed{seed}" for t in tasks}}
                for model, source in models.items():
                    name = f"{corruption}{severity:g}" if corruption != "clean" else "clean"
                    runs.append(
                        Run(
                            f"corruption/{modality}/{model}/{name}/seed{seed}",
                            f"corruption/{modality}/{model}/{name}",
                            seed,
                            "corruption",
                            meta={
                                "modality": modality,
                                "model": model,
                                "source": source,
                                "tasks": list(tasks) if model == "mtl" else [model[len("stl_") :]],
                                "corruption": corruption,
                                "severity": severity,
                            },
                        )
                    )
    return runs


def best_learning_rate(results: Mapping[str, Mapping[str, Any]], base: str, grid: Sequence[float]) -> float | None:
    """The grid's learning rate with the best mean validation accuracy over the tasks (None until all ran)."""
    scores = {}
    for lr in grid:
        result = results.get(f"{base}/lr{lr:g}/val")
        if result is None:
            return None
        scores[lr] = statistics.fmean(result["metrics"][f"eval_{t}_accuracy"] for t in TASKS)
    return max(scores, key=scores.get)


def command(run: Run, args: argparse.Namespace) -> list[str]:
    """The command that reproduces a run: ``hf-mtl train`` for training, this script for the corruption check."""
    if run.kind == "corruption":
        return [
            "python",
            "scripts/study.py",
            "--only",
            run.id,
            "--max_steps",
            str(args.max_steps),
            "--corruption_steps",
            str(args.corruption_steps),
        ]
    sets = [part for override in run.overrides for part in ("--set", override)]
    return ["hf-mtl", "train", RECIPE, *sets, *run.options]


# ------------------------------------------------------------------------------- running


def _result_path(args: argparse.Namespace, run_id: str) -> str:
    return os.path.join(args.results, run_id.replace("/", "__") + ".json")


def load_results(folder: str) -> dict[str, dict[str, Any]]:
    results = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        results[result["id"]] = result
    return results


def prepare_validation_data(args: argparse.Namespace) -> None:
    """Writes each data set's training split minus a seeded, stratified validation split as parquet files."""
    from hf_mtl.data import load_digits, load_fsdd, load_trec

    folder = os.path.join(args.work, "validation_data")
    loaders = {
        "fsdd": lambda: load_fsdd(os.path.join(args.data_root, "fsdd")),
        "trec": lambda: load_trec(os.path.join(args.data_root, "trec")),
        "uci_digits": load_digits,
    }
    for key, load in loaders.items():
        target = os.path.join(folder, key)
        if os.path.isfile(os.path.join(target, "validation.parquet")):
            continue
        split = load()["train"].train_test_split(
            test_size=VALIDATION_FRACTION, seed=VALIDATION_SEED, stratify_by_column=STRATIFY[key]
        )
        os.makedirs(target, exist_ok=True)
        split["train"].to_parquet(os.path.join(target, "train.parquet"))
        split["test"].to_parquet(os.path.join(target, "validation.parquet"))


def _diagnostics_summary(run_dir: str) -> dict[str, Any]:
    """Per task: the inter-task (per sample) and inter-sample cosine and magnitude similarity, pooled over every
    pair of every measurement: mean, quartiles, and the fraction of pairs with cosine < 0."""
    from hf_mtl.callbacks import read_diagnostics

    records = read_diagnostics(run_dir)
    pooled: dict[str, dict[str, dict[str, list[float]]]] = {}

    def pairs(matrix: Sequence[Sequence[float | None]]) -> list[float]:
        return [matrix[i][j] for i in range(len(matrix)) for j in range(i + 1, len(matrix)) if matrix[i][j] is not None]

    for record in records:
        for task in record["tasks"]:
            entry = pooled.setdefault(task, {"inter_task": {}, "inter_sample": {}})
            for measure in ("cosine", "magnitude_similarity", "conflicting_parameters"):
                if "inter_task_per_sample" in record:
                    values = [v for m in record["inter_task_per_sample"][measure] for v in pairs(m)]
                    entry["inter_task"].setdefault(measure, []).extend(values)
                entry["inter_sample"].setdefault(measure, []).extend(pairs(record["inter_sample"][task][measure]))
    summary: dict[str, Any] = {"measurements": len({r["step"] for r in records})}
    for task, kinds in pooled.items():
        summary[task] = {}
        for kind, measures in kinds.items():
            summary[task][kind] = {}
            for measure, values in measures.items():
                if not values:
                    continue
                quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
                stats = {"mean": statistics.fmean(values), "q1": quartiles[0], "median": quartiles[1]}
                stats.update({"q3": quartiles[2], "pairs": len(values)})
                if measure == "cosine":
                    stats["conflict_fraction"] = sum(v < 0 for v in values) / len(values)
                summary[task][kind][measure] = stats
    summary["seconds"] = sum(r["seconds"] for r in records if r["block"] == records[0]["block"]) if records else 0.0
    return summary


def execute_training(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    if run.meta.get("needs_validation"):
        raise RuntimeError(f"{run.id}: its learning rate comes from the validation runs, which have not all run")
    if run.meta.get("split") == "validation":
        prepare_validation_data(args)
    cmd = command(run, args)
    run_dir = os.path.join(args.work, run.id)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads))}
    start = time.perf_counter()
    # `hf-mtl` of this interpreter's environment
    completed = subprocess.run(
        [sys.executable, "-m", "hf_mtl.cli", *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    os.makedirs(os.path.join(args.work, "logs"), exist_ok=True)
    log_path = os.path.join(args.work, "logs", run.id.replace("/", "__") + ".log")
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(completed.stdout + "\n" + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"{run.id} failed (exit {completed.returncode}); its output is in {log_path}")
    with open(os.path.join(run_dir, "eval_results.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    train_seconds = next((e["train_runtime"] for e in history if "train_runtime" in e), None)
    result = {
        "id": run.id,
        "row": run.row,
        "seed": run.seed,
        "kind": run.kind,
        "command": shlex.join(cmd),
        "seconds": round(seconds, 1),
        "train_seconds": train_seconds,
        "max_steps": args.max_steps,
        "metrics": metrics,
        **run.meta,
    }
    if os.path.isfile(os.path.join(run_dir, "mtl_diagnostics.jsonl")):
        result["diagnostics"] = _diagnostics_summary(run_dir)
    return result


# ------------------------------------------------------------------------------- the corruption check


def _corrupt(
    batch: dict[str, list], indices: list[int], corruption: str, severity: float, seed: int, column: str
) -> dict[str, list]:
    """One corruption of a batch of clips or images; the noise of row i comes from a generator seeded by (seed, i)."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    out = []
    for index, value in zip(indices, batch[column]):
        rng = np.random.default_rng((seed, index))
        x = np.asarray(value, dtype=np.float32)
        if corruption == "noise_snr_db":  # white noise of power P_signal / 10^(SNR / 10)
            power = float(np.mean(x**2)) / (10.0 ** (severity / 10.0))
            x = x + rng.normal(0.0, math.sqrt(power), size=x.shape).astype(np.float32)
        elif corruption == "gaussian_noise":  # pixels in [0, 1]
            x = np.clip(x + rng.normal(0.0, severity, size=x.shape).astype(np.float32), 0.0, 1.0)
        elif corruption == "blur":
            x = gaussian_filter(x, sigma=severity).astype(np.float32)
        out.append(x.tolist())
    return {column: out}


def execute_corruption(run: Run, args: argparse.Namespace, results: Mapping[str, Any]) -> dict[str, Any]:
    """Freezes the encoder of a trained model, fine-tunes the heads of one modality's tasks on corrupted training
    data and evaluates them on the same corruption of the test data."""
    import torch

    from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
    from hf_mtl.data import SpeechCollator, load_digits, load_fsdd

    meta = run.meta
    source_dir = os.path.join(args.work, meta["source"])
    if not os.path.isfile(os.path.join(source_dir, "model.safetensors")):
        if meta["source"] not in results:
            raise RuntimeError(f"{run.id}: its model {meta['source']} has not been trained yet")
        source = next(r for r in plan(args, results) if r.id == meta["source"])
        execute_training(source, args)  # the study's runs are seeded: the same model again
    trained = MultiTaskModel.from_pretrained(source_dir)
    modality, tasks = meta["modality"], meta["tasks"]
    encoder = trained.encoders[modality]
    for param in encoder.parameters():
        param.requires_grad_(False)
    task_objects = [Task(**trained.tasks[t].to_dict()) for t in tasks]
    model = MultiTaskModel.from_encoders({modality: encoder}, task_objects, head_dropout=0.0)
    for task in tasks:
        model.heads[task].load_state_dict(trained.heads[task].state_dict())
    if modality == "speech":
        data, column = load_fsdd(os.path.join(args.data_root, "fsdd")), "audio"
        collators = {"data_collator": {"speech": SpeechCollator(max_length_seconds=1.0)}}
    else:
        data, column = load_digits(), "pixel_values"
        collators = {}
    if meta["corruption"] != "clean":
        data = {
            split: data[split].map(
                _corrupt,
                batched=True,
                with_indices=True,
                fn_kwargs={
                    "corruption": meta["corruption"],
                    "severity": meta["severity"],
                    "seed": 1000 * run.seed + index,
                    "column": column,
                },
                load_from_cache_file=False,
            )
            for index, split in enumerate(("train", "test"))
        }
    output = os.path.join(args.work, run.id)
    training = MultiTaskTrainingArguments(
        output_dir=output,
        overwrite_output_dir=True,
        max_steps=args.corruption_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=2e-3,
        warmup_steps=0,
        logging_steps=max(1, args.corruption_steps // 4),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=run.seed,
        mtl_method="ew",
        dataloader_pin_memory=False,
    )
    torch.manual_seed(run.seed)
    trainer = MultiTaskTrainer(
        model=model,
        args=training,
        train_dataset={t: data["train"] for t in tasks},
        eval_dataset={t: data["test"] for t in tasks},
        **collators,
    )
    start = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - start
    shutil.rmtree(output, ignore_errors=True)
    return {
        "id": run.id,
        "row": run.row,
        "seed": run.seed,
        "kind": run.kind,
        "command": shlex.join(command(run, args)),
        "seconds": round(seconds, 1),
        "corruption_steps": args.corruption_steps,
        "max_steps": args.max_steps,
        "metrics": metrics,
        **meta,
    }


# ------------------------------------------------------------------------------- the table


def _mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _rows(results: Mapping[str, Mapping[str, Any]], prefix: str) -> dict[str, list[Mapping[str, Any]]]:
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for result in results.values():
        if result["kind"] == "train" and result["id"].startswith(prefix) and result.get("split") != "validation":
            rows.setdefault(result["row"], []).append(result)
    return rows


def _seed_command(result: Mapping[str, Any]) -> str:
    return result["command"].replace(f"seed={result['seed']}", "seed=S").replace(f"seed{result['seed']}", "seedS")


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The README's results tables (markdown), from the result files."""
    lines: list[str] = []
    stl = _rows(results, "stl/")
    baseline = {}
    for task in TASKS:
        for metric in ("accuracy", "f1"):
            values = [r["metrics"][f"eval_{task}_{metric}"] for r in stl.get(f"stl/{task}", [])]
            if values:
                baseline[f"eval_{task}_{metric}"] = statistics.fmean(values)
    any_result = next(iter(results.values()), None)
    steps = any_result["max_steps"] if any_result else "?"
    lines.append(
        f"Test accuracy, mean ± std over seeds ({steps} steps of 16 examples per task; delta-m in %, lower is "
        "better, over the accuracy and macro F1 of the five tasks against the single-task means).\n"
    )
    header = "| run | " + " | ".join(TASKS) + " | delta-m % | seeds | s / run |"
    lines += [header, "|" + " --- |" * (len(TASKS) + 4)]
    commands = []
    ordered = [f"stl/{t}" for t in TASKS] + ["ew", *JACOBIAN] + [f"fmtl+{m}" for m in FMTL_BASES] + ["sam+ew"]
    ordered += [f"opt/{o}/{m}/best" for o in OPTIMIZERS for m in OPT_METHODS]
    rows = {**stl, **_rows(results, "mtl/"), **_rows(results, "opt/")}
    for row in ordered:
        runs = sorted(rows.get(row, []), key=lambda r: r["seed"])
        if not runs:
            continue
        cells = []
        for task in TASKS:
            key = f"eval_{task}_accuracy"
            values = [r["metrics"][key] for r in runs if key in r["metrics"]]
            cells.append(_mean_std(values) if values else "")
        deltas = []
        if not row.startswith("stl/") and len(baseline) == 2 * len(TASKS):
            from hf_mtl.metrics import delta_m

            deltas = [delta_m(r["metrics"], baseline, dict.fromkeys(baseline, True)) for r in runs]
        label = row
        if row.startswith("opt/"):
            label = f"{row} (lr {runs[0].get('learning_rate')})"
        time_cell = f"{statistics.fmean(r['seconds'] for r in runs):.0f}"
        if runs[0].get("diagnostics"):
            time_cell += f" ({statistics.fmean(r['diagnostics']['seconds'] for r in runs):.0f} diagnostics)"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_mean_std(deltas, digits=2) if deltas else ''} | {len(runs)} | "
            f"{time_cell} |"
        )
        commands.append(f"- `{row}`: `{_seed_command(runs[0])}` (S = {', '.join(str(r['seed']) for r in runs)})")
    lines += ["", "<details><summary>The command of each row</summary>", "", *commands, "", "</details>", ""]
    lines += _optimizer_table(results) + _conflict_table(results) + _corruption_table(results)
    total = sum(r["seconds"] for r in results.values())
    line = f"Wall time of the {len(results)} runs: {total / 3600:.2f} h (sum of the runs' times)"
    if all("finished" in r for r in results.values()):  # from the first run's start to the last run's end
        first_start = min(r["finished"] - r["seconds"] for r in results.values())
        span = max(r["finished"] for r in results.values()) - first_start
        line += f"; {span / 3600:.2f} h from the first run's start to the last one's end"
    lines.append(line + ".")
    return "\n".join(lines)


def _optimizer_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    val = [r for r in results.values() if r.get("split") == "validation"]
    if not val:
        return []
    lines = ["Learning-rate grid on the validation split (seed 0; mean validation accuracy over the five tasks):\n"]
    lines += ["| optimizer | method | learning rate | mean val. accuracy | s |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(val, key=lambda r: (r["optimizer"], r["method"], r["learning_rate"])):
        score = statistics.fmean(r["metrics"][f"eval_{t}_accuracy"] for t in TASKS)
        lines.append(
            f"| {r['optimizer']} | {r['method']} | {r['learning_rate']:g} | {score:.3f} | {r['seconds']:.0f} |"
        )
    return [*lines, ""]


def _conflict_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    runs = [r for r in results.values() if r["row"] == "ew" and r.get("diagnostics")]
    if not runs:
        return []
    lines = [
        f"Gradient conflict in the `ew` runs ({len(runs)} seed(s), every 5 steps, 8 probe samples; pairs pooled over the "
        "measurements, mean over seeds): inter-task = two tasks on the same sample, inter-sample = two samples of "
        "the task.\n",
        "| task | cosine inter-task | cosine inter-sample | cos < 0 inter-task | cos < 0 inter-sample | "
        "magnitude sim. inter-task | magnitude sim. inter-sample |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        if not all(task in r["diagnostics"] for r in runs):
            continue

        def get(kind: str, measure: str, stat: str, task: str = task) -> list[float]:
            found = [r["diagnostics"][task][kind].get(measure) for r in runs]
            return [entry[stat] for entry in found if entry is not None]

        cells = [
            _mean_std(get("inter_task", "cosine", "mean")),
            _mean_std(get("inter_sample", "cosine", "mean")),
            _mean_std(get("inter_task", "cosine", "conflict_fraction")),
            _mean_std(get("inter_sample", "cosine", "conflict_fraction")),
            _mean_std(get("inter_task", "magnitude_similarity", "mean")),
            _mean_std(get("inter_sample", "magnitude_similarity", "mean")),
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _corruption_table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    runs = [r for r in results.values() if r["kind"] == "corruption"]
    if not runs:
        return []
    lines = [
        "Corruption check (frozen encoders, heads fine-tuned on the corrupted data): delta_t per task, mean ± std "
        "over seeds; negative favours the MTL (`ew`) encoder.\n",
        "| task | delta_t | corruptions | seeds |",
        "| --- | --- | --- | --- |",
    ]
    index = {(r["modality"], r["model"], r["corruption"], r["severity"], r["seed"]): r for r in runs}
    for modality, tasks in CORRUPTED_TASKS.items():
        for task in tasks:
            per_seed = []
            for seed in sorted({r["seed"] for r in runs}):
                terms = []
                for corruption, severity in CORRUPTIONS[modality]:
                    try:
                        mtl_c, mtl_0 = (
                            index[(modality, "mtl", c, s, seed)] for c, s in ((corruption, severity), ("clean", 0.0))
                        )
                        stl_c, stl_0 = (
                            index[(modality, f"stl_{task}", c, s, seed)]
                            for c, s in ((corruption, severity), ("clean", 0.0))
                        )
                    except KeyError:
                        continue
                    key = f"eval_{task}_accuracy"
                    ratio_mtl = mtl_c["metrics"][key] / mtl_0["metrics"][key]
                    ratio_stl = stl_c["metrics"][key] / stl_0["metrics"][key]
                    terms.append(-(ratio_mtl - ratio_stl))  # (-1)^p with p = 1: accuracy, higher is better
                if len(terms) == len(CORRUPTIONS[modality]):
                    per_seed.append(statistics.fmean(terms))
            if per_seed:
                names = ", ".join(f"{c} {s:g}" for c, s in CORRUPTIONS[modality])
                lines.append(f"| {task} | {_mean_std(per_seed, digits=4)} | {names} | {len(per_seed)} |")
    return [*lines, ""]


def write_readme(path: str, text: str) -> None:
    """Replaces the block between the study markers of a README with ``text``."""
    start, end = "<!-- study-table:start -->", "<!-- study-table:end -->"
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "study"))
    parser.add_argument("--work", default=os.path.join(ROOT, "out", "study"), help="model folders (not committed)")
    parser.add_argument("--data_root", default="../shared/data", help="holds fsdd/ and trec/ (relative to the repo)")
    parser.add_argument("--max_steps", type=int, default=200, help="training steps of every run")
    parser.add_argument("--corruption_steps", type=int, default=100, help="steps of each head fine-tuning")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (unless set)")
    parser.add_argument("--only", action="append", default=[], help="run ids to run (fnmatch; repeatable)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--table", action="store_true", help="only print the table from the result files")
    parser.add_argument("--write_readme", default=None, help="put the table between the study markers of this file")
    args = parser.parse_args(argv)
    args.work = os.path.abspath(args.work)
    os.makedirs(args.results, exist_ok=True)
    results = load_results(args.results)
    if not args.table:
        runs = plan(args, results)
        if args.only:
            runs = [r for r in runs if any(fnmatch.fnmatch(r.id, pattern) for pattern in args.only)]
        if args.list:
            for run in runs:
                print(f"{run.id}\n    {shlex.join(command(run, args))}")
            return 0
        todo = [r for r in runs if r.id not in results]
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done; {len(todo)} to run", flush=True)
        for index, run in enumerate(todo, 1):
            if run.kind == "train" and run.meta.get("needs_validation"):
                results = load_results(args.results)
                run = next(r for r in plan(args, results) if r.id == run.id)
            start = time.perf_counter()
            if run.kind == "train":
                result = execute_training(run, args)
            else:
                result = execute_corruption(run, args, results)
            result["finished"] = time.time()  # seconds since the epoch: the table's elapsed time of the study
            with open(_result_path(args, run.id), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            results[run.id] = result
            print(f"[{index}/{len(todo)}] {run.id}: {time.perf_counter() - start:.0f} s", flush=True)
    text = table(load_results(args.results))
    print(text)
    if args.write_readme:
        write_readme(args.write_readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

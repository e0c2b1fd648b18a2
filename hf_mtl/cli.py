"""The ``hf-mtl`` command.

    hf-mtl train RECIPE.yaml [--set key=value ...]     train, evaluate every task, save the model
    hf-mtl baseline RECIPE.yaml [--set key=value ...]  train each task alone: the single-task baselines of Δm
    hf-mtl check RECIPE.yaml [--set key=value ...]     validate a recipe and build the run, no training
    hf-mtl push RUN_DIR REPO_ID                        upload a saved run with its model card to the Hub
    hf-mtl predict RUN_DIR [--task T] INPUT ...        predict on raw text, image files or audio files
    hf-mtl list                                        methods, samplers, heads, SAM variants, data loaders
    hf-mtl report RUN_DIR                              PNG plots of a run into RUN_DIR/plots

``hf-mtl train --help`` documents the recipe sections and every training argument; each training argument is
also an option (``--learning_rate 1e-3``) that overrides the recipe. Bad input exits with status 2 and a message
naming the field and the valid values, before any data set or model is loaded where it can be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from transformers import HfArgumentParser

from . import recipes
from .training_args import MultiTaskTrainingArguments

if TYPE_CHECKING:
    from .trainer import MultiTaskTrainer

_RECIPE_HELP = """\
A recipe is a YAML file with the sections encoders, trunk, data, tasks, training and (optional)
callbacks (see hf_mtl/recipes.py and recipes/quickstart.yaml). Override any value with --set, by dotted path:

  --set training.max_steps=20           (or simply --set max_steps=20 for a training argument)
  --set data.fsdd.data_dir=../shared/data/fsdd
  --set tasks.digit.num_labels=10       (tasks are addressed by name)
  --set training.mtl_method_kwargs='{c: 0.4}'

Values are read as YAML. Every field of MultiTaskTrainingArguments is also an option of its own
(--learning_rate 0.001, --mtl_method cagrad); options win over --set, which wins over the recipe.
Bad input (an unknown key, encoder, head, method, sampling strategy, data loader or data set, labels
outside num_labels, a non-empty output_dir) exits with status 2 before any training.
"""

_TRAINING_GROUP = "training arguments (MultiTaskTrainingArguments; each overrides the recipe's `training` section)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and widens the option column a little."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _add_training_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Adds one option per `MultiTaskTrainingArguments` field to ``parser``, in their own group, with the
    field's help, choices and default. Options left out are absent from the parsed namespace (default
    `argparse.SUPPRESS`), so that only the ones given override the recipe. Returns the fields."""
    group = parser.add_argument_group(_TRAINING_GROUP)
    fields = []
    for action in HfArgumentParser(MultiTaskTrainingArguments, add_help=False)._actions:
        default = action.default
        action.default = argparse.SUPPRESS
        if (
            action.help is not None
            and default is not None
            and not action.dest.startswith("no_")
            and not action.option_strings[0].startswith("--no_")
        ):
            action.help = f"{action.help} (default: {str(default).replace('%', '%%')})"
        group._add_action(action)
        if action.dest not in fields:
            fields.append(action.dest)
    return fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-mtl", description="Multi-task training for the Hugging Face Trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in (
        ("train", "train, evaluate and save a model from a recipe"),
        (
            "baseline",
            "train each task of a recipe alone (method ew, same encoder, data and budget): the baselines of Δm",
        ),
        ("check", "validate a recipe and build the run (data, encoders, model), without training"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=_RECIPE_HELP,
            formatter_class=_HelpFormatter,
            allow_abbrev=False,
            usage=f"hf-mtl {name} [-h] RECIPE [--set KEY=VALUE ...] [--<training argument> VALUE ...]",
        )
        sub.add_argument(
            "recipe",
            help="the recipe: a YAML file, a folder holding recipe.yaml, or a Hub repository id (ORG/NAME[@REVISION]) "
            "holding recipe.yaml (read from the Hugging Face cache when offline)",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe value by dotted path (repeatable)",
        )
        if name == "baseline":
            sub.add_argument(
                "--baselines_dir",
                default=None,
                help="where the baseline runs and baselines.json go (default: <output_dir>-baselines, where "
                "`hf-mtl train` of the same recipe finds them)",
            )
            sub.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks")
        sub.set_defaults(training_fields=_add_training_arguments(sub))
    push = commands.add_parser(
        "push",
        help="upload a saved run (model, processors, recipe, results, model card) to a Hub repository",
        description="Rebuilds the model card of RUN_DIR from its files (linking plots/*.png when there are any), "
        "then uploads the folder to REPO_ID (created if missing) with huggingface_hub.",
    )
    push.add_argument("run_dir", help="the saved run folder (the output_dir of `hf-mtl train`)")
    push.add_argument("repo_id", help="the Hub repository, e.g. my-org/my-mtl-model")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="a Hub token with write access (default: the saved login)")
    push.add_argument("--revision", default=None, help="the branch to push to (default: main)")
    push.add_argument("--commit_message", default="Upload hf_mtl run", help="the commit message")
    push.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    predict = commands.add_parser(
        "predict",
        help="predict with a saved run on raw text, image files or audio files",
        description="Loads the model and its processors from RUN_DIR (a folder or a Hub repository id) and prints "
        "one JSON line per input with each task's label names and scores. An input is a text, or the path of an "
        "image or audio file.",
    )
    predict.add_argument("run_dir", help="the saved run folder or Hub repository id")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="texts, image files or audio files")
    predict.add_argument(
        "--task",
        action="append",
        default=None,
        help="a task to predict (repeatable; default: every task of the input's modality)",
    )
    predict.add_argument("--top_k", type=int, default=1, help="classification labels per task (default: 1)")
    predict.add_argument("--threshold", type=float, default=None, help="multilabel threshold (default: 0.5)")
    predict.add_argument("--sampling_rate", type=int, default=None, help="the rate of raw audio inputs")
    predict.add_argument("--batch_size", type=int, default=1, help="inputs per forward pass (default: 1)")
    commands.add_parser("list", help="list the registered methods, samplers, heads, SAM variants and data loaders")
    report = commands.add_parser(
        "report",
        help="draw PNG plots of a run (losses, metrics, task weights, gradient conflict) into RUN_DIR/plots",
        description="Draw PNG plots of a training run from its trainer_state.json and mtl_diagnostics.jsonl "
        "(hf_mtl/report.py lists them); needs matplotlib: pip install 'hf-mtl[report]'.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the output_dir of a training run")
    report.add_argument("--output_dir", default=None, help="where the PNG files go (default: RUN_DIR/plots)")
    report.add_argument(
        "--heatmap", choices=["mean", "last"], default="mean", help="cosine heatmap of the mean or the last measurement"
    )
    return parser


def _check_output_dir(args: MultiTaskTrainingArguments) -> None:
    """Refuses a non-empty `output_dir` before anything is built (the trainer would refuse it at `train()`)."""
    output_dir = args.output_dir
    if args.resume_from_checkpoint or args.overwrite_output_dir or not output_dir or not os.path.isdir(output_dir):
        return
    if os.listdir(output_dir):
        raise ValueError(
            f"`output_dir` {output_dir!r} already exists and is not empty; set `overwrite_output_dir=true` to write "
            "into it anyway, `resume_from_checkpoint` to continue that run, or choose another `output_dir`"
        )


def _majority_baselines(trainer: MultiTaskTrainer) -> dict[str, float]:
    """Task -> the accuracy of always predicting its most frequent eval label (where the task's head kind has
    such a chance level, `TaskHead.majority_accuracy`; map-style data)."""
    from .data.loader import label_values

    baselines = {}
    for group in trainer.eval_groups or []:
        if group.is_iterable:
            continue
        for task in group.tasks:
            value = trainer.model.heads[task.name].majority_accuracy(label_values(group.dataset, task.label_column))
            if value is not None:
                baselines[task.name] = value
    return baselines


def _metrics_table(
    metrics: Mapping[str, float], task_names: Sequence[str], baselines: Mapping[str, float] | None = None
) -> str:
    """A per-task table of the ``eval_<task>_<metric>`` values, and a ``majority`` column for `baselines`."""
    rows = []
    for task in task_names:
        prefix = f"eval_{task}_"
        values = {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
        if baselines and task in baselines:
            values["majority"] = baselines[task]
        rows.append((task, values))
    columns = sorted(
        {metric for _, values in rows for metric in values}, key=lambda m: (m == "majority", m == "loss", m)
    )
    width = max([len("task")] + [len(task) for task, _ in rows])
    header = "task".ljust(width) + "".join(f"  {c:>10}" for c in columns)
    lines = [header, "-" * len(header)]
    for task, values in rows:
        lines.append(
            task.ljust(width) + "".join(f"  {values[c]:>10.4f}" if c in values else f"  {'':>10}" for c in columns)
        )
    if "majority" in columns:
        lines.append("(majority: the accuracy of always predicting the most frequent label of the eval set)")
    return "\n".join(lines)


def _fill_baselines(recipe: recipes.Recipe) -> str | None:
    """Sets `mtl_baselines` to the default baselines of the recipe's `output_dir` (``<output_dir>-baselines``)
    when the recipe names none and `hf-mtl baseline` wrote them there; returns the path used."""
    from .baselines import baselines_file, default_baselines_dir

    if recipe.training.get("mtl_baselines"):
        return None
    path = baselines_file(default_baselines_dir(recipe.training.get("output_dir") or "trainer_output"))
    if not os.path.isfile(path):
        return None
    recipe.training["mtl_baselines"] = path
    recipe.source.setdefault("training", {})["mtl_baselines"] = path
    return path


def _push(args: argparse.Namespace) -> int:
    from .hub import push_run

    try:
        info = push_run(
            args.run_dir,
            args.repo_id,
            token=args.token,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except ValueError as error:
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {args.run_dir} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from transformers import pipeline

    from .pipeline import PIPELINE_TASK

    call: dict = {"top_k": args.top_k, "batch_size": args.batch_size}
    if args.task:
        call["tasks"] = args.task
    if args.threshold is not None:
        call["threshold"] = args.threshold
    if args.sampling_rate is not None:
        call["sampling_rate"] = args.sampling_rate
    try:
        classify = pipeline(PIPELINE_TASK, model=args.run_dir, device="cpu" if not _has_gpu() else None)
        results = classify(list(args.inputs), **call)
    except (ValueError, OSError) as error:
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    for given, result in zip(args.inputs, results):
        print(json.dumps({"input": given, "predictions": result}))
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _baseline(args: argparse.Namespace, given: dict) -> int:
    from .baselines import default_baselines_dir, train_baselines

    try:
        recipe = recipes.Recipe.from_yaml(args.recipe, args.overrides, training=given)
        training_args = recipes.training_arguments(recipe)
        folder = args.baselines_dir or default_baselines_dir(training_args.output_dir)
        path, results = train_baselines(
            recipe, output_dir=folder, overwrite=training_args.overwrite_output_dir, tasks=args.tasks
        )
    except ValueError as error:
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    print(
        _metrics_table({f"eval_{t}_{m}": v for t, values in results.items() for m, v in values.items()}, list(results))
    )
    print(f"baselines saved to {path} (`hf-mtl train` of this recipe reads them and reports eval_delta_m)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "push":
        return _push(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "list":
        from .data import list_samplers
        from .methods import list_methods
        from .modeling import list_heads
        from .sharpness import list_sharpness

        for title, names in (
            ("methods", list_methods()),
            ("task sampling", list_samplers()),
            ("heads", list_heads()),
            ("sam", list_sharpness()),
            ("data loaders", recipes.list_data_loaders()),
        ):
            print(f"{title}: {', '.join(names)}")
        return 0
    if args.command == "report":
        from .report import conflict_summary, make_report

        try:
            report = make_report(args.run_dir, args.output_dir, heatmap=args.heatmap)
        except (ValueError, ImportError) as error:
            print(f"hf-mtl: error: {error}", file=sys.stderr)
            return 2
        for path in report.files.values():
            print(path)
        for name, reason in report.skipped.items():
            print(f"({name}: not drawn, {reason})")
        if "conflict" in report.series:
            print("gradient conflict over the measurements (mean over the pairs at each one): mean [min, max]")
            for panel, line, count, mean, low, high in conflict_summary(report.series["conflict"]):
                print(f"  {panel:<40} {line:<26} n={count:<4} {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        return 0
    given = {name: getattr(args, name) for name in args.training_fields if hasattr(args, name)}
    if args.command == "baseline":
        return _baseline(args, given)
    try:
        recipe = recipes.Recipe.from_yaml(args.recipe, args.overrides, training=given)
        baselines = _fill_baselines(recipe)
        training_args = recipes.training_arguments(recipe)
        if args.command == "train":  # `check` validates the run without writing, so an existing folder is fine
            _check_output_dir(training_args)
        output_existed = bool(training_args.output_dir) and os.path.exists(training_args.output_dir)
        trainer = recipes.build_trainer(recipe, training_args)
    except ValueError as error:
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        output_dir = training_args.output_dir
        if output_dir and not output_existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)  # the Trainer makes `output_dir` when it is built; a check leaves no trace
        print(
            f"recipe {args.recipe}: {len(trainer.tasks)} tasks ({', '.join(trainer.tasks)}), method {trainer.args.mtl_method}: OK"
        )
        try:
            _check_output_dir(training_args)
        except ValueError as error:
            print(f"note: `train` would stop here: {error}")
        return 0
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except ValueError as error:  # refused before the first step (e.g. a streaming data set without `max_steps`)
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    metrics = trainer.evaluate() if trainer.eval_groups else {}
    output_dir = trainer.args.output_dir
    # the final save writes the model, processors, recipe.yaml, eval_results.json and the model card, and then (with
    # `push_to_hub`) uploads that folder
    trainer.save_state()  # trainer_state.json again, with the final evaluation in its log history (before the push)
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        if metrics:
            print(_metrics_table(metrics, list(trainer.tasks), _majority_baselines(trainer)))
        if "eval_delta_m" in metrics:
            print(
                f"delta-m against the single-task baselines in {baselines or training_args.mtl_baselines}: "
                f"{metrics['eval_delta_m']:+.2f}% (lower is better)"
            )
        print(
            f"model saved to {output_dir} (AutoModel.from_pretrained loads it after `import hf_mtl`; "
            f"`hf-mtl predict {output_dir} ...` predicts)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

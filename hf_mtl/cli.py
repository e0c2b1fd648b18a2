"""The ``hf-mtl`` command.

    hf-mtl train RECIPE.yaml [--set key=value ...]     train, evaluate every task, save the model
    hf-mtl check RECIPE.yaml [--set key=value ...]     validate a recipe and build the run, no training
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
A recipe is a YAML file with the sections encoders, trunk, data, tasks and training (see
hf_mtl/recipes.py and recipes/quickstart.yaml). Override any value with --set, by dotted path:

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
        sub.add_argument("recipe", help="path of the recipe YAML file")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe value by dotted path (repeatable)",
        )
        sub.set_defaults(training_fields=_add_training_arguments(sub))
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
    """Task -> the accuracy of always predicting its most frequent eval label (single-label tasks, map-style data)."""
    from .data.loader import label_values
    from .metrics import majority_class_accuracy

    baselines = {}
    for group in trainer.eval_groups or []:
        if group.is_iterable:
            continue
        for task in group.tasks:
            if task.head == "classification":
                baselines[task.name] = majority_class_accuracy(label_values(group.dataset, task.label_column))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        from .report import make_report

        try:
            report = make_report(args.run_dir, args.output_dir, heatmap=args.heatmap)
        except (ValueError, ImportError) as error:
            print(f"hf-mtl: error: {error}", file=sys.stderr)
            return 2
        for path in report.files.values():
            print(path)
        for name, reason in report.skipped.items():
            print(f"({name}: not drawn, {reason})")
        return 0
    given = {name: getattr(args, name) for name in args.training_fields if hasattr(args, name)}
    try:
        recipe = recipes.Recipe.from_yaml(args.recipe, args.overrides, training=given)
        training_args = recipes.training_arguments(recipe)
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
        return 0
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except ValueError as error:  # refused before the first step (e.g. a streaming data set without `max_steps`)
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    metrics = trainer.evaluate() if trainer.eval_groups else {}
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json again, with the final evaluation in its log history
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "recipe.yaml"), "w", encoding="utf-8") as f:
            f.write(recipe.to_yaml())
        with open(os.path.join(output_dir, "eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        if metrics:
            print(_metrics_table(metrics, list(trainer.tasks), _majority_baselines(trainer)))
        print(f"model saved to {output_dir} (MultiTaskModel.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``hf-mtl`` command.

    hf-mtl train RECIPE.yaml [--set key=value ...]     train, evaluate every task, save the model
    hf-mtl check RECIPE.yaml [--set key=value ...]     validate a recipe and build the run, no training
    hf-mtl list                                        methods, samplers, heads, SAM variants, data loaders

``hf-mtl train --help`` documents the recipe sections and every training argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

from transformers import HfArgumentParser

from . import recipes
from .training_args import MultiTaskTrainingArguments

_RECIPE_HELP = """\
A recipe is a YAML file with the sections encoders, trunk, data, tasks and training (see
hf_mtl/recipes.py and recipes/quickstart.yaml). Override any value with --set, by dotted path:

  --set training.max_steps=20           (or simply --set max_steps=20 for a training argument)
  --set data.fsdd.data_dir=../shared/data/fsdd
  --set tasks.digit.num_labels=10       (tasks are addressed by name)
  --set training.mtl_method_kwargs='{c: 0.4}'

Values are read as YAML. The `training` section takes every field of MultiTaskTrainingArguments:
"""


def _training_arguments_help() -> str:
    parser = HfArgumentParser(MultiTaskTrainingArguments)
    lines = parser.format_help().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("options:") or line.strip().startswith("optional arguments:")), 0)
    return "\n".join(lines[start + 1 :])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-mtl", description="Multi-task training for the Hugging Face Trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in (("train", "train, evaluate and save a model from a recipe"), ("check", "validate a recipe and build the run")):
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=_RECIPE_HELP + _training_arguments_help() if name == "train" else _RECIPE_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("recipe", help="path of the recipe YAML file")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe value by dotted path (repeatable)")
    commands.add_parser("list", help="list the registered methods, samplers, heads, SAM variants and data loaders")
    return parser


def _metrics_table(metrics: Mapping[str, float], task_names: Sequence[str]) -> str:
    """A per-task table of the ``eval_<task>_<metric>`` values."""
    rows = []
    for task in task_names:
        prefix = f"eval_{task}_"
        values = {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
        rows.append((task, values))
    columns = sorted({metric for _, values in rows for metric in values}, key=lambda m: (m == "loss", m))
    width = max([len("task")] + [len(task) for task, _ in rows])
    header = "task".ljust(width) + "".join(f"  {c:>10}" for c in columns)
    lines = [header, "-" * len(header)]
    for task, values in rows:
        lines.append(task.ljust(width) + "".join(f"  {values[c]:>10.4f}" if c in values else f"  {'':>10}" for c in columns))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        from .data import list_samplers
        from .methods import list_methods
        from .modeling import list_heads
        from .sharpness import list_sharpness

        for title, names in (("methods", list_methods()), ("task sampling", list_samplers()), ("heads", list_heads()),
                             ("sam", list_sharpness()), ("data loaders", recipes.list_data_loaders())):
            print(f"{title}: {', '.join(names)}")
        return 0
    try:
        recipe = recipes.Recipe.from_yaml(args.recipe, args.overrides)
        trainer = recipes.build_trainer(recipe)
    except ValueError as error:
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"recipe {args.recipe}: {len(trainer.tasks)} tasks ({', '.join(trainer.tasks)}), method {trainer.args.mtl_method}: OK")
        return 0
    try:
        trainer.train()
    except ValueError as error:  # e.g. a non-empty output_dir
        print(f"hf-mtl: error: {error}", file=sys.stderr)
        return 2
    metrics = trainer.evaluate() if trainer.eval_groups else {}
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "recipe.yaml"), "w", encoding="utf-8") as f:
            f.write(recipe.to_yaml())
        with open(os.path.join(output_dir, "eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        if metrics:
            print(_metrics_table(metrics, list(trainer.tasks)))
        print(f"model saved to {output_dir} (MultiTaskModel.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

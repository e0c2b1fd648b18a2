"""What the gradient diagnostics cost: step times of a recipe with ``mtl_diagnostics_steps`` off and on.

    python scripts/diagnostics_cost.py recipes/quickstart.yaml --every 10 [--set max_steps=100] [--json out.json]

Trains the recipe in this process with the diagnostics off, on (``vmap``) and on (``loop``), ``--repeats``
times alternated (the same seed, so the same steps), and reports the medians of: the time of a training
step (between ``on_step_begin`` and ``on_step_end``, so without the measurement itself), the training time
per step (measurements included), the seconds of one measurement, and the overhead of the diagnostics on the
training time. Results go to stdout and, with ``--json``, to a file. The figures are only as steady as the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from transformers import TrainerCallback

from hf_mtl import recipes
from hf_mtl.callbacks import GradientDiagnosticsCallback


class _StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.durations.append(time.perf_counter() - self._start)


def _run(recipe_path: str, overrides: list[str], every: int, per_sample: str) -> dict:
    output = tempfile.mkdtemp(prefix="diagnostics_cost_")
    training = {"output_dir": output, "disable_tqdm": True, "mtl_diagnostics_steps": every}
    training["mtl_diagnostics_per_sample"] = per_sample
    recipe = recipes.Recipe.from_yaml(recipe_path, overrides, training=training)
    trainer = recipes.build_trainer(recipe, recipes.training_arguments(recipe))
    timer = _StepTimer()
    # the timer's on_step_end runs before the diagnostics callback's: step times exclude the measurement
    trainer.callback_handler.callbacks.insert(0, timer)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    diagnostics = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradientDiagnosticsCallback)]
    measurement = [e["diagnostics/seconds"] for e in trainer.state.log_history if "diagnostics/seconds" in e]
    return {
        "every": every,
        "per_sample": per_sample,
        "registered": bool(diagnostics),
        "steps": len(timer.durations),
        "median_step_seconds": statistics.median(timer.durations),
        "train_seconds": total,
        "measurements": len(measurement),
        "median_measurement_seconds": statistics.median(measurement) if measurement else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=2, help="off / on / loop runs, alternated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"off": [], "on": [], "loop": []}
    for _ in range(args.repeats):  # alternated, so that a change of the machine's load hits both
        runs["off"].append(_run(args.recipe, args.overrides, 0, "vmap"))
        runs["on"].append(_run(args.recipe, args.overrides, args.every, "vmap"))
        runs["loop"].append(_run(args.recipe, args.overrides, args.every, "loop"))

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    result = {"recipe": args.recipe, "overrides": args.overrides, "every": args.every, "runs": runs}
    for kind in runs:
        result[kind] = {
            "median_step_seconds": median(kind, "median_step_seconds"),
            "train_seconds_per_step": statistics.median(r["train_seconds"] / r["steps"] for r in runs[kind]),
            "median_measurement_seconds": median(kind, "median_measurement_seconds"),
        }
    result["overhead_per_step_ratio"] = (
        result["on"]["train_seconds_per_step"] / result["off"]["train_seconds_per_step"] - 1.0
    )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

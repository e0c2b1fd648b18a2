"""Step time of every gradient method (and of SAM, ASAM, F-MTL with a few of them) relative to ``ew``,
on the quickstart recipe (``recipes/quickstart.yaml``: FSDD digit and speaker on a small Wav2Vec2, TREC
coarse and fine on the pretrained MiniLM, the UCI digits on a small ViT).

The recipe is built once by hf_mtl's own recipe code (`Recipe.from_yaml` + `build_trainer`); each variant
then trains a fresh copy of the same initial model with the same data, loader and seed, for ``--warmup``
+ ``--steps`` optimizer steps, through `MultiTaskTrainer.train()`. A step is timed by a callback from
``on_step_begin`` (the batch is in hand) to ``on_step_end`` (forward, per-task backward, the method,
clipping, optimizer step; FAMO's extra forward after the step included); the table gives the median
over the measured steps and its ratio to ``ew``'s. Every variant sees the same batches in the same order
(same seed, task sampling ``all``).

    python benchmarks/bench_methods.py                                  # every method, ~3 minutes on 1 CPU thread
    python benchmarks/bench_methods.py --methods ew,pcgrad,upgrad --sam-methods none
    python benchmarks/bench_methods.py --set encoders.text.pretrained=null ...   # any recipe override
    python benchmarks/bench_methods.py --output benchmarks/results/methods_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

DEFAULT_RECIPE = common.ROOT / "recipes" / "quickstart.yaml"
DEFAULT_SAM_METHODS = "ew,pcgrad,upgrad"


def variants(methods: list[str], sam_methods: list[str], sams: list[str]) -> list[tuple[str, str, str | None]]:
    """(label, method, sam): ``ew`` first (the reference), then every method, then the SAM variants."""
    ordered = ["ew"] + [m for m in methods if m != "ew"]
    items = [(m, m, None) for m in ordered]
    items += [(f"{m}+{s}", m, s) for s in sams for m in sam_methods]
    return items


def main() -> None:
    from transformers import HfArgumentParser

    from hf_mtl import MultiTaskTrainer, MultiTaskTrainingArguments
    from hf_mtl.methods import list_methods
    from hf_mtl.recipes import Recipe, build_trainer
    from hf_mtl.sharpness import list_sharpness

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override key=value (repeatable)"
    )
    parser.add_argument("--methods", default="all", help="comma-separated methods, or all (default)")
    parser.add_argument(
        "--sam-methods", default=DEFAULT_SAM_METHODS, help="methods combined with each SAM variant, or none"
    )
    parser.add_argument("--sam", default=",".join(list_sharpness()), help="SAM variants to combine (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, 4 with CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default=None,
        help="the measure ratios use: process CPU time (default on CPU) or wall time (default with CUDA)",
    )
    parser.add_argument("--output", default=None)
    options = parser.parse_args()

    device = common.pick_device(options.device)
    threads = common.set_threads(options.threads if options.threads is not None else (1 if device.type == "cpu" else 4))
    timer = options.timer or ("cpu" if device.type == "cpu" else "wall")
    import datasets

    datasets.disable_progress_bars()
    registered = list_methods()
    methods = registered if options.methods == "all" else [m for m in options.methods.split(",") if m]
    sam_methods = [] if options.sam_methods == "none" else [m for m in options.sam_methods.split(",") if m]
    sams = [] if options.sam == "none" else [s for s in options.sam.split(",") if s]
    for m in methods + sam_methods:
        if m not in registered:
            raise SystemExit(f"unknown method {m!r}; valid: {', '.join(registered)}")
    plan = variants(methods, sam_methods, sams)

    output_root = tempfile.mkdtemp(prefix="bench_methods_")
    total = options.warmup + options.steps
    overrides = [
        f"training.output_dir={output_root}/base",
        f"training.max_steps={total}",
        'training.logging_strategy="no"',
        'training.save_strategy="no"',
        'training.eval_strategy="no"',
        "training.report_to=none",
        "training.disable_tqdm=true",
        f"training.use_cpu={'true' if device.type == 'cpu' else 'false'}",
        *options.overrides,
    ]
    recipe = Recipe.from_yaml(options.recipe, overrides)
    machine = common.machine_info(device, threads)
    print(
        f"recipe {os.path.relpath(options.recipe, common.ROOT)}; device {device}, torch threads {threads}, ratios on {timer} time, load average {machine['load_average']}, {machine['cpu']}"
    )
    started = time.time()
    base = build_trainer(recipe)
    initial = copy.deepcopy(base.model).cpu()
    tasks = list(base.model.tasks)
    print(
        f"tasks {', '.join(tasks)}; {sum(p.numel() for p in initial.parameters()) / 1e6:.1f} M parameters; "
        f"{options.warmup} warm-up + {options.steps} measured steps per variant; {len(plan)} variants (set-up {time.time() - started:.0f} s)"
    )

    results = []
    for label, method, sam in plan:
        clock = common.StepClock(device)
        values = dict(recipe.training, mtl_method=method, sam=sam, output_dir=f"{output_root}/{label}")
        values.pop("mtl_method_kwargs", None)
        result: dict[str, Any] = {"variant": label, "method": method, "sam": sam}
        try:
            (args,) = HfArgumentParser(MultiTaskTrainingArguments).parse_dict(values)
            model = copy.deepcopy(initial).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer = MultiTaskTrainer(
                model=model,
                args=args,
                train_dataset=base.train_dataset,
                processing_class=base.processors or None,
                data_collator=base.collators,
                callbacks=[common.trainer_clock_callback(clock)],
            )
            common.quiet(trainer)
            trainer.train()
            result.update(clock.summary(options.warmup))
            result["engine_mode"] = trainer.engine.mode
            if device.type == "cuda":
                result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            del trainer, model
        except Exception as error:  # noqa: BLE001 - a failing variant is reported, the others still run
            traceback.print_exc()
            result["error"] = f"{type(error).__name__}: {error}"
        results.append(result)
        shown = (
            f"{result['median_ms']:.1f} ms wall, {result['cpu_median_ms']:.1f} ms CPU"
            if "median_ms" in result
            else f"FAILED {result['error']}"
        )
        print(f"  {label:<20} {shown}", flush=True)

    key = "cpu_median_ms" if timer == "cpu" else "median_ms"
    reference = next((r for r in results if r["variant"] == "ew" and key in r), None)
    for r in results:
        r["vs_ew"] = r[key] / reference[key] if reference and key in r else None
    headers = ["method", "wall ms", "CPU ms", f"x ew ({timer})", "engine mode"]
    rows = [
        [
            r["variant"],
            r.get("median_ms", f"failed: {str(r.get('error'))[:50]}"),
            r.get("cpu_median_ms"),
            r["vs_ew"],
            r.get("engine_mode", "-"),
        ]
        for r in results
    ]
    if device.type == "cuda":
        headers.append("peak MiB")
        for row, r in zip(rows, results):
            row.append(r.get("peak_mib"))
    table = common.format_table(headers, rows)
    print()
    print(table)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average after: {machine['load_average_after']}; took {time.time() - started:.0f} s")
    common.write_json(
        options.output,
        {
            "benchmark": "bench_methods",
            "recipe": os.path.relpath(options.recipe, common.ROOT),
            "overrides": overrides[len(overrides) - len(options.overrides) :],
            "steps": options.steps,
            "warmup": options.warmup,
            "timer": timer,
            "machine": machine,
            "tasks": tasks,
            "results": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()

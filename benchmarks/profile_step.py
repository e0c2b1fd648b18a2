"""Where the time of one `MultiTaskTrainer` step goes: cProfile (Python functions, hf_mtl's included) and
the torch profiler (operators) over a few steps of one method on a recipe (default: the quickstart).

    python benchmarks/profile_step.py --method pcgrad
    python benchmarks/profile_step.py --method upgrad --sam fmtl --steps 2 --top 30
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402


def main() -> None:
    from transformers import TrainerCallback

    from hf_mtl.recipes import Recipe, build_trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(common.ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--method", default="pcgrad")
    parser.add_argument("--sam", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args()

    device = common.pick_device(options.device)
    common.set_threads(options.threads)
    import datasets

    datasets.disable_progress_bars()
    output_dir = tempfile.mkdtemp(prefix="profile_step_")
    overrides = [
        f"training.output_dir={output_dir}",
        f"training.max_steps={options.warmup + options.steps}",
        'training.logging_strategy="no"',
        'training.save_strategy="no"',
        "training.report_to=none",
        "training.disable_tqdm=true",
        f"training.mtl_method={options.method}",
        f"training.use_cpu={'true' if device.type == 'cpu' else 'false'}",
        *options.overrides,
    ]
    if options.sam:
        overrides.append(f"training.sam={options.sam}")
    trainer = build_trainer(Recipe.from_yaml(options.recipe, overrides))
    common.quiet(trainer)
    profiler = cProfile.Profile()
    torch_profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    )
    clock = common.StepClock(device)

    class Profiled(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == options.warmup:
                torch_profiler.__enter__()
            if state.global_step >= options.warmup:
                profiler.enable()
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            clock.stop()
            if state.global_step > options.warmup:
                profiler.disable()
            if state.global_step == options.warmup + options.steps:
                torch_profiler.__exit__(None, None, None)

    trainer.add_callback(Profiled())
    trainer.train()
    summary = clock.summary(options.warmup)
    print(
        f"{options.method}{'+' + options.sam if options.sam else ''}: median step {summary['median_ms']:.0f} ms over {summary['steps']} steps"
    )
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(options.top)
    print(stream.getvalue())
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(torch_profiler.key_averages().table(sort_by=sort, row_limit=options.top))


if __name__ == "__main__":
    main()

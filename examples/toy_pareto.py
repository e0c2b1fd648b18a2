"""Every registered gradient method on the 2-D two-objective toy of CAGrad and Nash-MTL.

Problems (docs/toy_pareto.md; ``toy_problem.py``):

- ``cagrad``: the CAGrad toy, f₁ and f₂ as in ``Cranial-XIX/CAGrad toy.py``, inits (−8.5, 7.5),
  (−8.5, −5), (9, 9); the paper runs 100k steps.
- ``nash``: the Nash-MTL / FAMO variant, f₁ scaled by 0.1, inits (−8.5, 7.5), (0, 0), (9, 9),
  (−7.5, −0.5), (9, −1); the Nash-MTL code runs 35k steps, FAMO's 50k.

Every method runs from every init through the public method contract only, as the trainer's
engine (`hf_mtl/engine/engine.py`) calls it, with x = (x₁, x₂) in the place of the shared parameters:

1. losses ``L = (f₁, f₂)`` at x; ``T = method.transform_losses(L)`` (IMTL-L, DB-MTL, ...);
2. the 2 x 2 Jacobian J, rows ``∇_x T_i`` (autograd, all inits of a method in one batch);
3. ``method.observe_losses(L)`` and ``d = method.aggregate(J, losses=..., generator=...)`` in the
   engine's order (loss-weighting methods: ``aggregate`` gives their ``combine_losses`` gradient;
   representation methods, MGDA-UB and GradDrop, get no ``representation`` and act on the rows as
   parameter gradients, as the CAGrad code applies GradDrop: with ``representation=x`` GradDrop's
   ``sign(z)`` is 0 at the init (0, 0) and the point never moves);
4. one Adam step (lr 1e-3) on x and on the method's own parameters (UW's log-variances, IMTL-L's
   scales, GradNorm's logits), whose gradients come from autograd through ``transform_losses`` /
   ``combine_losses`` and, for GradNorm, from ``aggregate`` itself;
5. ``after_optimizer_step(L_before, L_after)`` for methods that need it (FAMO).

There is no gradient clipping (nash-mtl's Nash-MTL clips its own update to norm 1; under Adam a
near-constant rescale changes little), and the method parameters share x's lr (nash-mtl's toy gives
them 0.025). Toy-specific method settings (``toy_kwargs``) follow the reference toy scripts: CAGrad
c = 0.5 with /(1 + c); FAMO γ = 0 and ``min_losses = (−21·scale, −21)``; DWA on
25-step windows (nash-mtl's); STCH's nadir from the first 100 steps. Every other method runs with
its defaults. A method that raises or returns a non-finite update is recorded and its point frozen
there; nothing is skipped.

Outputs: a PNG grid (two panels per method: the CAGrad toy over the contours of f₁ + f₂, the scaled
toy over those of 0.1 f₁ + f₂, the Pareto segment x₂ = −8.3552, x₁ ∈ [−7, 7] in black, start
markers ○, end markers ★, ✕ where a method failed) and a JSON file with each run's final point,
losses, distance to the Pareto segment, last task weights and error. It prints the same per run.

Cost: each step calls every method once per init (8 small calls), so a step of all ~30 methods
takes about 0.1 s of one core; the default 1500 steps take a few minutes but move each point by
at most ~1.5 (Adam with lr 1e-3 moves a coordinate by about lr per step), far from the Pareto set
for every init. The figure in ``docs/`` comes from the Nash-MTL paper's length, 35k steps
(``docs/toy_pareto.md``). Usage (from the repository root)::

    python examples/toy_pareto.py --png /tmp/toy.png --json /tmp/toy.json      # default budget
    python examples/toy_pareto.py --steps 35000 --workers 2                     # docs/ (about 1 CPU hour)
    python examples/toy_pareto.py --problems cagrad --steps 100000 --methods ew mgda pcgrad cagrad
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_problem import (  # noqa: E402
    CAGRAD_INITS,
    NASH_INITS,
    PARETO_X1,
    PARETO_X2,
    distance_to_pareto_segment,
    toy_losses,
)

from hf_mtl.methods import GradientMethod, get_method, list_methods  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = 1500
#: A final point within this distance of the plotted Pareto segment counts as "on the Pareto set".
PARETO_TOLERANCE = 0.1


@dataclass(frozen=True)
class Problem:
    name: str
    scale: float
    inits: tuple[tuple[float, float], ...]
    spec_steps: int
    title: str


PROBLEMS = {
    "cagrad": Problem("cagrad", 1.0, CAGRAD_INITS, 100_000, "CAGrad toy"),
    "nash": Problem("nash", 0.1, NASH_INITS, 35_000, "Nash-MTL toy (f₁×0.1)"),
}


def toy_kwargs(name: str, scale: float) -> dict[str, Any]:
    """Method settings of the reference toy scripts (the CAGrad and Nash-MTL toy code); defaults for the rest."""
    if name == "cagrad":
        return {"c": 0.5, "rescale": 2}
    if name == "famo":
        return {"gamma": 0.0, "min_losses": [-21.0 * scale, -21.0]}
    if name == "dwa":
        return {"window": 25}
    if name == "stch":
        return {"warmup_steps": 100}
    return {}


def _generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, step, index)) & 0x7FFF_FFFF_FFFF_FFFF)


def _number(value: float) -> float | None:
    """Rounded for the JSON file; ``None`` (JSON null) for NaN and infinities."""
    return round(value, 4) if math.isfinite(value) else None


def _overrides_transform(method: GradientMethod) -> bool:
    return type(method).transform_losses is not GradientMethod.transform_losses


def run_method(
    name: str,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-3,
    seed: int = 0,
    problems: tuple[str, ...] = ("cagrad", "nash"),
    record_points: int = 400,
) -> dict[str, Any]:
    """Runs method ``name`` from every init of ``problems`` for ``steps`` Adam steps.

    Returns ``{"method", "seconds", "runs": [...]}``; each run holds ``problem``, ``init``,
    ``final_x``, ``final_losses`` (f₁, f₂ of its problem, f₁ scaled), ``distance`` to the Pareto
    segment, ``on_pareto``, ``weights`` (the method's last task weights), ``error`` (None, or where
    and why the method failed) and ``trajectory`` (a (T, 2) tensor of recorded points).
    """
    chosen = [PROBLEMS[p] for p in problems]
    starts = torch.tensor([init for p in chosen for init in p.inits], dtype=torch.float32)
    scales = torch.tensor([p.scale for p in chosen for _ in p.inits], dtype=torch.float32)
    labels = [(p.name, init) for p in chosen for init in p.inits]
    count = starts.shape[0]
    errors: list[str | None] = [None] * count
    started = time.perf_counter()
    try:
        methods = [get_method(name, num_tasks=2, **toy_kwargs(name, float(s))) for s in scales]
    except Exception as error:  # a method that cannot even be built is reported, not skipped
        return {"method": name, "seconds": 0.0, "error": f"construction: {type(error).__name__}: {error}", "runs": []}
    own_params = [[p for p in m.parameters() if p.requires_grad] for m in methods]
    reference = methods[0]
    transforms = _overrides_transform(reference)
    after_step = reference.needs_losses_after_step
    uses_jacobian = reference.requires_jacobian

    x = starts.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x] + [p for params in own_params for p in params], lr=lr)
    alive = torch.ones(count, dtype=torch.bool)
    every = max(1, steps // record_points)
    trajectory = [starts.clone()]

    for step in range(steps):
        try:
            losses = toy_losses(x, scales)
            if transforms:
                transformed = torch.stack([m.transform_losses(losses[i]) for i, m in enumerate(methods)])
            else:
                transformed = losses
            rows = [torch.autograd.grad(transformed[:, k].sum(), x, retain_graph=True)[0] for k in range(2)]
            jacobian = torch.stack(rows, dim=1).detach()  # (count, K, P): row k of point i is ∇ T_k(x_i)
            # the method's own parameters: gradients of what the engine backpropagates through them
            param_grads: list[list[torch.Tensor | None]] = [[] for _ in methods]
            flat = [p for params in own_params for p in params]
            if flat:
                if uses_jacobian:
                    objective = transformed.sum()
                else:
                    objective = sum(m.combine_losses(transformed[i]) for i, m in enumerate(methods))
                grads = list(torch.autograd.grad(objective, flat, allow_unused=True))
                for i, params in enumerate(own_params):
                    param_grads[i], grads = grads[: len(params)], grads[len(params) :]
            raw = losses.detach()
            transformed = transformed.detach()
            directions: list[torch.Tensor] = []
            for i, method in enumerate(methods):
                if not alive[i]:
                    directions.append(torch.zeros(2))
                    continue
                try:
                    for p, g in zip(own_params[i], param_grads[i]):
                        p.grad = None if g is None else g.clone()
                    kwargs: dict[str, Any] = {"losses": raw[i] if uses_jacobian else transformed[i]}
                    if method.is_random:
                        kwargs["generator"] = _generator(seed, step, i)
                    if uses_jacobian:  # the engine observes the step's losses, then combines the rows
                        method.observe_losses(raw[i])
                        directions.append(method.aggregate(jacobian[i], **kwargs))
                    else:  # combine_losses runs in the backward, observe_losses at the sync step
                        directions.append(method.aggregate(jacobian[i], **kwargs))
                        method.observe_losses(raw[i])
                except Exception as error:
                    alive[i] = False
                    errors[i] = f"step {step}: {type(error).__name__}: {error}"
                    directions.append(torch.zeros(2))
            update = torch.stack(directions).to(torch.float32)
            bad = ~torch.isfinite(update).all(dim=1)
            for i, params in enumerate(own_params):
                if params and any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
                    bad[i] = True
            if bad.any():
                for i in bad.nonzero().flatten().tolist():
                    if alive[i]:
                        alive[i] = False
                        values = [p.grad.tolist() for p in own_params[i] if p.grad is not None]
                        errors[i] = (
                            f"step {step}: non-finite update {update[i].tolist()} (method parameter grads {values})"
                        )
                update[bad] = 0.0
            for i in (~alive).nonzero().flatten().tolist():
                for p in own_params[i]:
                    p.grad = None
            before = x.detach().clone()
            x.grad = update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                broken = alive & ~torch.isfinite(x).all(dim=1)
                for i in broken.nonzero().flatten().tolist():
                    errors[i] = f"step {step}: non-finite point after the Adam step"
                alive &= ~broken
                if not alive.all():
                    x[~alive] = before[~alive]  # a failed run stays where it failed
            if after_step:
                with torch.no_grad():
                    after = toy_losses(x, scales)
                for i, method in enumerate(methods):
                    if alive[i]:
                        method.after_optimizer_step(raw[i], after[i])
            if (step + 1) % every == 0 or step + 1 == steps or not alive.any():
                trajectory.append(x.detach().clone())
            if not alive.any():
                break
        except Exception as error:  # outside the per-point calls (transform_losses, autograd): stop every run
            for i in alive.nonzero().flatten().tolist():
                errors[i] = f"step {step}: {type(error).__name__}: {error}"
            alive[:] = False
            trajectory.append(x.detach().clone())
            break

    final = x.detach()
    with torch.no_grad():
        final_losses = toy_losses(final, scales)
        distance = distance_to_pareto_segment(final)
    paths = torch.stack(trajectory, dim=1)  # (count, T, 2)
    runs = []
    for i, (problem, init) in enumerate(labels):
        weights = methods[i].last_weights
        runs.append(
            {
                "problem": problem,
                "init": list(init),
                "final_x": [round(v, 4) for v in final[i].tolist()],
                "final_losses": [round(v, 4) for v in final_losses[i].tolist()],
                "distance": round(float(distance[i]), 4),
                "on_pareto": bool(distance[i] < PARETO_TOLERANCE),
                "weights": None if weights is None else [_number(v) for v in weights.detach().float().tolist()],
                "error": errors[i],
                "trajectory": paths[i],
            }
        )
    return {"method": name, "seconds": round(time.perf_counter() - started, 2), "error": None, "runs": runs}


def plot_results(
    results: list[dict[str, Any]],
    path: Path,
    steps: int,
    lr: float,
    problems: tuple[str, ...] = tuple(PROBLEMS),
    columns: int = 6,
) -> None:
    """One panel per method and problem: trajectories over the contours of f₁ + f₂ (f₁ scaled as the problem)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-10, 10, 161)
    mesh = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2)
    surfaces = {name: toy_losses(mesh, problem.scale).sum(-1).reshape(161, 161) for name, problem in PROBLEMS.items()}
    # levels at quantiles of the surface, so that the flat logarithmic half (x₂ > 0) gets lines too
    quantiles = torch.linspace(0.02, 0.98, 18)
    levels = {
        name: torch.quantile(surface.flatten(), quantiles).unique().tolist() for name, surface in surfaces.items()
    }
    colours = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    panels = [(result, problem) for result in results for problem in problems]
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.05), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, (result, problem) in zip(axes.flat, panels):
        axis.set_axis_on()
        axis.contour(grid, grid, surfaces[problem], levels=levels[problem], cmap="Greys", linewidths=0.4, alpha=0.6)
        axis.plot(PARETO_X1, (PARETO_X2, PARETO_X2), color="black", linewidth=2.2, solid_capstyle="butt")
        runs = [run for run in result["runs"] if run["problem"] == problem]
        for colour, run in zip(colours, runs):
            path_xy = run["trajectory"]
            axis.plot(path_xy[:, 0], path_xy[:, 1], color=colour, linewidth=1.1)
            axis.plot(*run["init"], marker="o", markersize=4, markerfacecolor="none", color=colour)
            end_marker = "X" if run["error"] else "*"
            axis.plot(
                *run["final_x"],
                marker=end_marker,
                markersize=7,
                color=colour,
                markeredgecolor="black",
                markeredgewidth=0.4,
            )
        reached = sum(run["on_pareto"] for run in runs)
        failed = sum(run["error"] is not None for run in runs)
        note = f"{reached}/{len(runs)} on P" + (f", {failed} failed" if failed else "")
        if result["error"]:
            note = "construction failed"
        axis.set_title(f"{result['method']} · {PROBLEMS[problem].title}\n{note}", fontsize=7, pad=2)
        axis.set_xlim(-10, 10)
        axis.set_ylim(-10, 10)
        axis.set_xticks([-10, 0, 10])
        axis.set_yticks([-10, 0, 10])
        axis.tick_params(labelsize=5, length=2, pad=1)
        axis.set_aspect("equal")
    figure.suptitle(
        f"hf_mtl methods on the CAGrad toy (f₁ + f₂) and its Nash-MTL variant (0.1 f₁ + f₂); "
        f"Adam lr {lr:g}, {steps} steps (papers: 100k / 35k)\n○ start, ★ end, ✕ failed; black: Pareto set "
        f"x₂ = {PARETO_X2}, x₁ ∈ [−7, 7]; 'on P': within {PARETO_TOLERANCE} of it",
        fontsize=9,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.4, w_pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    plt.close(figure)


def report(result: dict[str, Any]) -> None:
    """Prints one method's outcome: per run the final point, f₁, f₂ and the distance to the Pareto set."""
    name = result["method"]
    if result["error"]:
        print(f"{name:14s} FAILED {result['error']}", flush=True)
        return
    reached = sum(run["on_pareto"] for run in result["runs"])
    print(f"{name:14s} {result['seconds']:7.1f}s  {reached}/{len(result['runs'])} on the Pareto set", flush=True)
    for run in result["runs"]:
        init = "({:g}, {:g})".format(*run["init"])
        final = "({:7.3f}, {:7.3f})".format(*run["final_x"])
        print(
            f"    {run['problem']:6s} from {init:12s} -> {final}  f1 {run['final_losses'][0]:9.4f}  "
            f"f2 {run['final_losses'][1]:9.4f}  dist {run['distance']:7.4f}  "
            f"{'on P' if run['on_pareto'] else 'off P'}" + (f"  ERROR {run['error']}" if run["error"] else ""),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"Adam steps per run (default {DEFAULT_STEPS}; papers 100k / 35k)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, as the papers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random methods' generators")
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every registered method)")
    parser.add_argument(
        "--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS), help="which toys (default both)"
    )
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "toy_pareto.png")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "toy_pareto_results.json")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--workers", type=int, default=1, help="processes running methods in parallel (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"`--steps` must be >= 1, got {args.steps}")
    if args.workers < 1:
        parser.error(f"`--workers` must be >= 1, got {args.workers}")
    if not args.lr > 0:
        parser.error(f"`--lr` must be > 0, got {args.lr}")
    names = args.methods or sorted(set(list_methods()) | {"ew"})
    torch.set_num_threads(1)

    total = time.perf_counter()
    problems = tuple(args.problems)
    job = functools.partial(run_method, steps=args.steps, lr=args.lr, seed=args.seed, problems=problems)
    if args.workers == 1:
        outcomes = map(job, names)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,))
        outcomes = pool.map(job, names)
    results = []
    for result in outcomes:  # in the order of `names`, printed as each finishes
        results.append(result)
        report(result)
    if args.workers > 1:
        pool.shutdown()
    seconds = time.perf_counter() - total
    inits = sum(len(PROBLEMS[p].inits) for p in problems)
    print(f"total {seconds:.1f}s for {len(names)} methods x {inits} inits, {args.steps} steps")

    payload = {
        "settings": {
            "steps": args.steps,
            "lr": args.lr,
            "seed": args.seed,
            "optimizer": "Adam",
            "pareto_tolerance": PARETO_TOLERANCE,
            "pareto_segment": {"x2": PARETO_X2, "x1": list(PARETO_X1)},
            "problems": {
                n: {
                    "scale": PROBLEMS[n].scale,
                    "inits": [list(i) for i in PROBLEMS[n].inits],
                    "paper_steps": PROBLEMS[n].spec_steps,
                }
                for n in problems
            },
            "method_kwargs": {
                n: {p: toy_kwargs(n, PROBLEMS[p].scale) for p in problems} for n in names if toy_kwargs(n, 1.0)
            },
            "seconds": round(seconds, 1),
        },
        "methods": {
            r["method"]: {
                "seconds": r["seconds"],
                "error": r["error"],
                "runs": [{k: v for k, v in run.items() if k != "trajectory"} for run in r["runs"]],
            }
            for r in results
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[-+.\deE,\s]*\]", lambda match: " ".join(match.group(0).split()), text)  # short lists inline
    args.json.write_text(text + "\n")
    if not args.no_plot:
        plot_results(results, args.png, args.steps, args.lr, problems)
        print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

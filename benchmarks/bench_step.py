"""Step time and memory of one multi-task training step: hf_mtl against a plain `transformers.Trainer`,
TorchJD and LibMTL, on the same model, the same batches, the same optimizer and the same threads.

The model: one text encoder (the pretrained all-MiniLM-L6-v2, or a tiny BERT built from a config) shared
by three TREC tasks, each with its own classification head: ``coarse`` (6 classes), ``fine`` (the fine types: 51 in the TREC files, one of them a typo) and
``qword`` (the question word that opens the question, 8 classes, derived from the text). Every step sees a
fresh batch of ``--batch-size`` questions padded to ``--seq-len`` tokens; all contenders see the same
batches in the same order.

Contenders (each in its own process, so that its peak memory is its own):

- ``trainer``: a plain `transformers.Trainer` on a thin wrapper whose forward returns the mean of the task
  losses (what hf_mtl's ``ew`` optimises);
- ``hf_mtl:<method>[+<sam>]``: `MultiTaskTrainer` with that gradient method (and SAM / ASAM / F-MTL);
- ``torchjd:<method>``: a hand-written loop, ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` with the
  TorchJD aggregator of the same method;
- ``libmtl:<method>``: a hand-written loop calling the LibMTL weighting's ``backward(losses)`` around the
  same encoder and heads (see ``_peers.py`` for what that took).

A step is timed from the moment its batch is in hand to the end of ``zero_grad``: moving the batch to
the device, forward, backward (per-task gradients), the method, gradient clipping to norm 1.0, AdamW's
step. The Trainers are timed by a callback from ``on_step_begin`` to ``on_step_end``; the loops do the same
work (clipping included) in the same order. The table gives the median over ``--steps`` steps after
``--warmup`` steps.

Then, for the methods that two libraries define the same way, the updates are compared on the same
Jacobians (random ones and one of the real model): max |difference| relative to max |update|.

    python benchmarks/bench_step.py                       # tiny BERT, default methods, ~2 min on 1 CPU thread
    python benchmarks/bench_step.py --model minilm --batch-size 16 --steps 5 --warmup 2   # ~9 min on 1 CPU thread
    python benchmarks/bench_step.py --methods ew,pcgrad,upgrad --peers torchjd --output /tmp/step.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402
import _peers as peers  # noqa: E402

DEFAULT_METHODS = "ew,pcgrad,cagrad,mgda,upgrad,nash_mtl,imtl,aligned_mtl,ew+sam,pcgrad+fmtl"
#: hf_mtl method aliases: name -> (registered method, its kwargs).
ALIASES = {"imtl_g": ("imtl", {"loss_balancing": False})}
LEARNING_RATE = 5e-5
MAX_GRAD_NORM = 1.0


@dataclass
class Config:
    model: str = "minilm"
    tasks: tuple[str, ...] = ("coarse", "fine", "qword")
    device: str = "cpu"
    threads: int = 1
    steps: int = 10
    warmup: int = 3
    batch_size: int = 32
    seq_len: int = 32
    data_dir: str | None = None
    seed: int = 0


@dataclass
class Result:
    name: str
    library: str
    method: str | None
    timing: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------- contenders
def split_method(spec: str) -> tuple[str, dict[str, Any], str | None]:
    """``"pcgrad+fmtl"`` -> ("pcgrad", {}, "fmtl"); aliases such as ``imtl_g`` resolved."""
    method, _, sam = spec.partition("+")
    name, kwargs = ALIASES.get(method, (method, {}))
    return name, dict(kwargs), sam or None


def contenders(methods: list[str], peer_libraries: set[str], task_count: int) -> list[tuple[str, str, str | None]]:
    """(name, library, method) of every contender. Each hf_mtl method is followed by its peers, so that
    contenders compared with each other run close in time (the load of a shared machine drifts)."""
    from hf_mtl.methods import list_methods

    valid = set(list_methods()) | set(ALIASES)
    items = [("trainer", "trainer", None)]
    for spec in methods:
        base, _, sam = spec.partition("+")
        if base not in valid:
            raise SystemExit(f"--methods: unknown method {base!r}; valid: {', '.join(sorted(valid))}")
        if sam and sam not in ("sam", "asam", "fmtl"):
            raise SystemExit(f"--methods: unknown sharpness variant {sam!r} in {spec!r}; valid: sam, asam, fmtl")
        items.append((f"hf_mtl:{spec}", "hf_mtl", spec))
        if sam:
            continue
        key = "imtl" if spec == "imtl_g" else spec
        if "torchjd" in peer_libraries and key in peers.TORCHJD_AGGREGATORS:
            items.append((f"torchjd:{spec}", "torchjd", spec))
        if "libmtl" in peer_libraries and spec in peers.LIBMTL_WEIGHTINGS:  # LibMTL's IMTL is the hybrid only
            if spec == "cagrad" and task_count != 3:
                continue  # LibMTL 1.1.5's CAGrad hard-codes 3 tasks (x.reshape(1, 3))
            items.append((f"libmtl:{spec}", "libmtl", spec))
    return items


def training_args_kwargs(cfg: Config, output_dir: str, device: torch.device) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        max_steps=cfg.warmup + cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        dataloader_pin_memory=False,
    )


def _identity(batch: Any) -> Any:
    return batch


def _fixed_loader(batches: list[Any]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity)


class MeanLossModel(nn.Module):
    """What a plain `Trainer` trains: the multi-task model whose forward returns the mean task loss."""

    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.model(batch).loss}


def run_trainer(
    cfg: Config, model: nn.Module, batches: list[Any], device: torch.device, clock: common.StepClock
) -> None:
    from transformers import Trainer, TrainingArguments

    class FixedBatchTrainer(Trainer):
        def get_train_dataloader(self) -> torch.utils.data.DataLoader:
            return _fixed_loader(batches)

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(**training_args_kwargs(cfg, output_dir, device))
        trainer = FixedBatchTrainer(
            model=MeanLossModel(model), args=args, callbacks=[common.trainer_clock_callback(clock)]
        )
        common.quiet(trainer)
        trainer.train()


def run_hf_mtl(
    cfg: Config,
    spec: str,
    model: nn.Module,
    tokenizer: Any,
    batches: list[Any],
    device: torch.device,
    clock: common.StepClock,
) -> None:
    from hf_mtl import MultiTaskTrainer, MultiTaskTrainingArguments

    class FixedBatchMultiTaskTrainer(MultiTaskTrainer):
        """The batches are made once by hf_mtl's own collation (`common.build_batches`), so that every
        contender sees the same ones; the loader is outside the timed step anyway."""

        def get_train_dataloader(self) -> torch.utils.data.DataLoader:
            return _fixed_loader(batches)

    method, kwargs, sam = split_method(spec)
    with tempfile.TemporaryDirectory() as output_dir:
        args = MultiTaskTrainingArguments(
            **training_args_kwargs(cfg, output_dir, device), mtl_method=method, mtl_method_kwargs=kwargs, sam=sam
        )
        trainer = FixedBatchMultiTaskTrainer(
            model=model,
            args=args,
            processing_class={"text": tokenizer},
            callbacks=[common.trainer_clock_callback(clock)],
        )
        common.quiet(trainer)
        trainer.train()


def run_loop(
    cfg: Config,
    backward: Any,
    params: list[nn.Parameter],
    model: nn.Module,
    batches: list[Any],
    device: torch.device,
    clock: common.StepClock,
) -> None:
    """A hand-written step doing what the Trainer does around the backward: clip to norm 1.0 (and read the
    norm, as the Trainer logs it), AdamW step, ``zero_grad``."""
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for batch in batches:
        clock.start()
        batch = common.to_device(batch, device)
        backward(batch)
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.stop()


def run_contender(cfg: Config, name: str, library: str, spec: str | None) -> Result:
    """Builds the model and batches, then runs one contender; memory is measured from after the model is
    built (so optimizer state, gradients, activations and any method buffers count)."""
    device = torch.device(cfg.device)
    common.set_threads(cfg.threads)
    result = Result(name=name, library=library, method=spec)
    try:
        rows = common.load_text_rows(cfg.data_dir, (cfg.warmup + cfg.steps) * cfg.batch_size, cfg.seed)
        tasks = common.text_tasks(cfg.tasks, rows)
        model, tokenizer = common.build_text_model(cfg.model, tasks, cfg.seed)
        batches = common.build_batches(tokenizer, model, rows, cfg.warmup + cfg.steps, cfg.batch_size, cfg.seq_len)
        model.to(device)
        task_names = list(cfg.tasks)
        clock = common.StepClock(device)
        probe = common.MemoryProbe(device)
        torch.manual_seed(cfg.seed)
        probe.start()
        if library == "trainer":
            run_trainer(cfg, model, batches, device, clock)
        elif library == "hf_mtl":
            run_hf_mtl(cfg, spec, model, tokenizer, batches, device, clock)
        elif library == "torchjd":
            key = "imtl" if spec == "imtl_g" else spec
            aggregator = peers.TORCHJD_AGGREGATORS[key](len(task_names))
            backward = peers.torchjd_step_fn(model, task_names, aggregator)
            params = [p for p in model.parameters() if p.requires_grad]
            run_loop(cfg, backward, params, model, batches, device, clock)
        elif library == "libmtl":
            key = "imtl" if spec == "imtl_g" else spec
            shared = [p for p in model.encoders.parameters() if p.requires_grad]
            adapter, kwargs = peers.make_libmtl(key, shared, task_names, device)
            backward = peers.libmtl_step_fn(model, task_names, adapter, kwargs)
            params = [p for p in model.parameters() if p.requires_grad] + [
                p for p in adapter.parameters() if p.requires_grad
            ]
            run_loop(cfg, backward, params, model, batches, device, clock)
        else:
            raise ValueError(f"unknown library {library!r}")
        result.memory = probe.stop()
        result.timing = clock.summary(cfg.warmup)
    except Exception as error:  # a failing contender is reported in the table, the others still run
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    return result


def _child(cfg: Config, name: str, library: str, spec: str | None, queue: Any) -> None:
    queue.put(asdict(run_contender(cfg, name, library, spec)))


def run_isolated(cfg: Config, name: str, library: str, spec: str | None) -> Result:
    """Runs one contender in a fresh process (fork on CPU, spawn with CUDA) and collects its result."""
    context = mp.get_context("spawn" if cfg.device.startswith("cuda") else "fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cfg, name, library, spec, queue))
    process.start()
    try:
        payload = queue.get(timeout=3600)
    except Exception:  # noqa: BLE001
        payload = asdict(
            Result(name=name, library=library, method=spec, error=f"process died (exit code {process.exitcode})")
        )
    process.join()
    return Result(**payload)


# ---------------------------------------------------------------------------------------------- agreement
def real_jacobian(cfg: Config) -> torch.Tensor:
    """The K x P Jacobian of the task losses with respect to the encoder, on the first batch (eval mode,
    so that no dropout differs)."""
    rows = common.load_text_rows(cfg.data_dir, cfg.batch_size, cfg.seed)
    tasks = common.text_tasks(cfg.tasks, rows)
    model, tokenizer = common.build_text_model(cfg.model, tasks, cfg.seed)
    (batch,) = common.build_batches(tokenizer, model, rows, 1, cfg.batch_size, cfg.seq_len)
    model.eval()
    shared = [p for p in model.encoders.parameters() if p.requires_grad]
    losses = model(batch).losses
    rows_ = []
    for position, task in enumerate(cfg.tasks):
        grads = torch.autograd.grad(losses[task], shared, retain_graph=position < len(cfg.tasks) - 1, allow_unused=True)
        rows_.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)])
        )
    return torch.stack(rows_)


@dataclass
class Pair:
    """One agreement check: ``ours(J)`` against ``peer(J)`` on the first ``rows`` rows of each Jacobian
    (PCGrad is order-free only for K = 2); ``per_task_mean``: the peer averages where hf_mtl sums, so
    ours is divided by K first."""

    method: str
    peer: str
    ours: Any
    theirs: Any
    rows: int | None = None
    per_task_mean: bool = False


def agreement_pairs() -> list[Pair]:
    from hf_mtl.methods import get_method

    def ours(name: str, **kwargs: Any) -> Any:
        return lambda j: get_method(name, num_tasks=j.shape[0], **kwargs).aggregate(j)

    def tj(factory: Any) -> Any:
        return lambda j: factory(j.shape[0])(j)

    pairs: list[Pair] = []
    if peers.torchjd_available() is None:
        agg = peers._tj()
        pairs += [
            Pair("upgrad", "TorchJD UPGrad", ours("upgrad"), tj(lambda k: agg.UPGrad())),
            Pair("dualproj", "TorchJD DualProj", ours("dualproj"), tj(lambda k: agg.DualProj())),
            Pair("mgda", "TorchJD MGDA (defaults: Frank-Wolfe, eps 1e-3)", ours("mgda"), tj(lambda k: agg.MGDA())),
            Pair(
                "mgda",
                "TorchJD MGDA (eps 1e-9, 1e5 iterations)",
                ours("mgda"),
                tj(lambda k: agg.MGDA(epsilon=1e-9, max_iters=100_000)),
            ),
            Pair(
                "imtl(loss_balancing=False)",
                "TorchJD IMTLG",
                ours("imtl", loss_balancing=False),
                tj(lambda k: agg.IMTLG()),
            ),
            Pair("config", "TorchJD ConFIG", ours("config"), tj(lambda k: agg.ConFIG())),
            Pair(
                "aligned_mtl",
                "TorchJD AlignedMTL (mean preference: ours / K)",
                ours("aligned_mtl"),
                tj(lambda k: agg.AlignedMTL()),
                per_task_mean=True,
            ),
            Pair(
                "cagrad(c=0.4, rescale=0)",
                "TorchJD CAGrad(c=0.4)",
                ours("cagrad", c=0.4, rescale=0),
                tj(lambda k: agg.CAGrad(c=0.4)),
            ),
            Pair(
                "nash_mtl",
                "TorchJD NashMTL (max_norm off)",
                ours("nash_mtl"),
                tj(lambda k: agg.NashMTL(n_tasks=k, max_norm=1e30)),
            ),
            Pair("pcgrad (K=2)", "TorchJD PCGrad", ours("pcgrad"), tj(lambda k: agg.PCGrad()), rows=2),
        ]
    if peers.libmtl_available() is None:
        pairs += [
            Pair("mgda", "LibMTL MGDA (mgda_gn none)", ours("mgda"), lambda j: peers.libmtl_aggregate("mgda", j)),
            Pair(
                "imtl(loss_balancing=False)",
                "LibMTL IMTL (loss scales at 0)",
                ours("imtl", loss_balancing=False),
                lambda j: peers.libmtl_aggregate("imtl", j),
            ),
            Pair(
                "cagrad",
                "LibMTL CAGrad (calpha 0.4, rescale 1)",
                ours("cagrad"),
                lambda j: peers.libmtl_aggregate("cagrad", j),
            ),
            Pair(
                "pcgrad (K=2)", "LibMTL PCGrad", ours("pcgrad"), lambda j: peers.libmtl_aggregate("pcgrad", j), rows=2
            ),
        ]
    return pairs


def check_agreement(cfg: Config, with_real: bool) -> list[dict[str, Any]]:
    """Max |ours - peer| / max |ours| (and the smallest cosine) over random Jacobians (K = 3, P = 1000,
    seeded; one with rows 1e3 apart in norm) and the model's own (K = 3 x P encoder parameters), and the
    time each side takes to aggregate the model's Jacobian (median of 3 calls, no backward involved)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    jacobians = {f"random {i}": torch.randn(3, 1000, generator=generator) for i in range(5)}
    jacobians["random, rows 1e3 apart"] = torch.randn(3, 1000, generator=generator) * torch.tensor(
        [[1e-2], [1.0], [10.0]]
    )
    real_label = f"{cfg.model} encoder, batch 0"
    if with_real:
        jacobians[real_label] = real_jacobian(cfg).float()
    report = []
    for pair in agreement_pairs():
        worst, worst_cos, worst_on, failures, timings = 0.0, 1.0, None, [], {}
        for label, jacobian in jacobians.items():
            matrix = jacobian[: pair.rows] if pair.rows else jacobian
            try:
                mine = pair.ours(matrix.clone()).double()
                if pair.per_task_mean:
                    mine = mine / matrix.shape[0]
                theirs = pair.theirs(matrix.clone()).double()
                if label == real_label:
                    timings = {"ours_ms": _time_call(pair.ours, matrix), "peer_ms": _time_call(pair.theirs, matrix)}
            except Exception as error:  # noqa: BLE001
                failures.append(f"{label}: {type(error).__name__}: {error}")
                continue
            rel = float((mine - theirs).abs().max() / mine.abs().max().clamp_min(1e-30))
            cos = float(torch.nn.functional.cosine_similarity(mine, theirs, dim=0))
            if rel >= worst:
                worst, worst_on = rel, label
            worst_cos = min(worst_cos, cos)
        report.append(
            {
                "hf_mtl": pair.method,
                "peer": pair.peer,
                "max_rel_diff": worst,
                "worst_on": worst_on,
                "min_cosine": worst_cos,
                **timings,
                "errors": failures,
            }
        )
    return report


def _time_call(fn: Any, matrix: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        copy = matrix.clone()
        start = time.perf_counter()
        fn(copy)
        times.append(1000.0 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=["minilm", "tiny"],
        default="tiny",
        help="tiny: a 2-layer BERT from a config (fast); minilm: the pretrained all-MiniLM-L6-v2",
    )
    parser.add_argument("--tasks", default="coarse,fine,qword", help="comma-separated, from coarse, fine, qword")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, 4 with CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"hf_mtl methods, METHOD[+sam|asam|fmtl] (default {DEFAULT_METHODS})"
    )
    parser.add_argument("--peers", default="torchjd,libmtl", help="peer libraries to run: torchjd, libmtl, or none")
    parser.add_argument(
        "--data-dir", default=None, help="folder with trec/ (default ../shared/data, else hf_mtl's sample)"
    )
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default=None,
        help="the measure ratios use: process CPU time (default on CPU: steady under other load) or wall time (default with CUDA)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times (alternating order) and keep each contender's best round",
    )
    parser.add_argument(
        "--no-isolate", action="store_true", help="run every contender in this process (memory then not comparable)"
    )
    parser.add_argument("--no-agreement", action="store_true", help="skip the agreement checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    options = parser.parse_args()

    device = common.pick_device(options.device)
    threads = options.threads if options.threads is not None else (1 if device.type == "cpu" else 4)
    timer = options.timer or ("cpu" if device.type == "cpu" else "wall")
    cfg = Config(
        model=options.model,
        tasks=tuple(t for t in options.tasks.split(",") if t),
        device=str(device),
        threads=threads,
        steps=options.steps,
        warmup=options.warmup,
        batch_size=options.batch_size,
        seq_len=options.seq_len,
        data_dir=options.data_dir,
        seed=options.seed,
    )
    common.text_tasks(cfg.tasks)
    peer_libraries = {p for p in options.peers.split(",") if p and p != "none"}
    for library, why_not in (("torchjd", peers.torchjd_available()), ("libmtl", peers.libmtl_available())):
        if library in peer_libraries and why_not is not None:
            print(f"[skip {library}] {why_not}")
            peer_libraries.discard(library)
    methods = [m for m in options.methods.split(",") if m]
    plan = contenders(methods, peer_libraries, len(cfg.tasks))
    machine = common.machine_info(device, common.set_threads(threads))
    print(
        f"device {device}, torch threads {threads}, ratios on {timer} time, load average {machine['load_average']}, {machine['cpu']}"
    )
    print(
        f"model {cfg.model}, tasks {', '.join(cfg.tasks)}, batch {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"{cfg.warmup} warm-up + {cfg.steps} measured steps, {len(plan)} contenders"
    )

    results: dict[str, Result] = {}
    key = "cpu_median_ms" if timer == "cpu" else "median_ms"
    started = time.time()
    for round_index in range(options.rounds):
        order = plan if round_index % 2 == 0 else plan[::-1]
        if options.rounds > 1:
            print(f"round {round_index + 1}/{options.rounds} (load average {[round(x, 2) for x in os.getloadavg()]})")
        for name, library, spec in order:
            result = (
                run_contender(cfg, name, library, spec)
                if options.no_isolate
                else run_isolated(cfg, name, library, spec)
            )
            status = (
                f"{result.timing['median_ms']:.1f} ms wall, {result.timing['cpu_median_ms']:.1f} ms CPU"
                if result.timing
                else f"FAILED {result.error}"
            )
            print(f"  {name:<24} {status}", flush=True)
            results[name] = best_of(results.get(name), result, key)
    elapsed = time.time() - started
    results = [results[name] for name, _, _ in plan]

    table, rows = summarise(results, timer)
    print()
    print(table)
    agreement = [] if options.no_agreement else check_agreement(cfg, with_real=True)
    if agreement:
        print()
        print(
            "Agreement on the same Jacobians (random K=3 x 1000, one with rows 1e3 apart in scale, and the model's); "
            "time to aggregate the model's Jacobian:"
        )
        print(
            common.format_table(
                ["hf_mtl", "peer", "max rel. diff", "worst on", "min cosine", "aggregate ms: ours", "peer", "errors"],
                [
                    [
                        a["hf_mtl"],
                        a["peer"],
                        f"{a['max_rel_diff']:.1e}",
                        a["worst_on"],
                        f"{a['min_cosine']:.6f}",
                        a.get("ours_ms"),
                        a.get("peer_ms"),
                        "; ".join(a["errors"]) or "-",
                    ]
                    for a in agreement
                ],
            )
        )
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average after: {machine['load_average_after']}; contenders took {elapsed:.0f} s")
    common.write_json(
        options.output,
        {
            "benchmark": "bench_step",
            "config": asdict(cfg),
            "machine": machine,
            "isolated": not options.no_isolate,
            "rounds": options.rounds,
            "timer": timer,
            "rows": rows,
            "results": [asdict(r) for r in results],
            "agreement": agreement,
            "table": table,
        },
    )


def best_of(previous: Result | None, new: Result, key: str) -> Result:
    """Across rounds: the round with the lowest ``key`` median (the least disturbed by other processes);
    every round's medians are kept in ``timing["rounds"]``."""
    record = (
        [{"median_ms": new.timing["median_ms"], "cpu_median_ms": new.timing["cpu_median_ms"]}] if new.timing else []
    )
    if previous is None:
        if new.timing:
            new.timing["rounds"] = record
        return new
    rounds = previous.timing.get("rounds", []) + record
    best = new if new.timing and (not previous.timing or new.timing[key] < previous.timing[key]) else previous
    if best.timing:
        best.timing["rounds"] = rounds
    return best


def summarise(results: list[Result], timer: str) -> tuple[str, list[dict[str, Any]]]:
    """The table: median step time (wall and CPU), ratios to the plain Trainer and to each peer with the
    same method (on the ``timer`` measure), peak memory."""
    key = "cpu_median_ms" if timer == "cpu" else "median_ms"
    by_name = {r.name: r for r in results}
    base = by_name.get("trainer")
    base_ms = base.timing.get(key) if base and base.timing else None
    rows = []
    for r in results:
        ms = r.timing.get(key) if r.timing else None
        row: dict[str, Any] = {
            "name": r.name,
            "median_ms": r.timing.get("median_ms"),
            "cpu_median_ms": r.timing.get("cpu_median_ms"),
            "vs_trainer": None,
            "vs_torchjd": None,
            "vs_libmtl": None,
            "peak_mib": r.memory.get("peak_mib"),
            "step_mem_mib": r.memory.get("above_start_mib"),
            "error": r.error,
        }
        if ms is not None and base_ms:
            row["vs_trainer"] = ms / base_ms
        if r.library == "hf_mtl" and ms is not None and "+" not in (r.method or ""):
            for peer in ("torchjd", "libmtl"):
                other = by_name.get(f"{peer}:{r.method}")
                if other is not None and other.timing:
                    row[f"vs_{peer}"] = ms / other.timing[key]
        rows.append(row)
    headers = [
        "contender",
        "wall ms",
        "CPU ms",
        f"x Trainer ({timer})",
        "x TorchJD",
        "x LibMTL",
        "peak MiB",
        "step MiB",
    ]
    table = common.format_table(
        headers,
        [
            [
                row["name"],
                row["median_ms"] if row["median_ms"] is not None else f"failed: {str(row['error'])[:60]}",
                row["cpu_median_ms"],
                row["vs_trainer"],
                row["vs_torchjd"],
                row["vs_libmtl"],
                row["peak_mib"],
                row["step_mem_mib"],
            ]
            for row in rows
        ],
    )
    return table, rows


if __name__ == "__main__":
    main()

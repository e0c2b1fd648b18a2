"""The multi-task step at scale: per-task and shared-input batches, K = 2, 4, 8 tasks, against the physical limit,
a plain `transformers.Trainer`, TorchJD (``autojac.mtl_backward`` and the ``autogram`` engine with the matching
weighting) and LibMTL, on the same model, batches, optimizer and threads, with step time and peak memory for each
of hf_mtl's memory controls.

The model: a BERT encoder built from a config (``--model bert4``: 4 layers, width 256, 4 heads, intermediate 1024,
the TREC WordPiece vocabulary: 5.2 M parameters; ``--model bert_base``: BERT-base's shape, 12 x 768 with a 30,522
word vocabulary, 110 M parameters, for memory) shared by K tasks, each with its own classification head on TREC
questions (the coarse type, the fine type, the question word, the length, ... cycled). Two layouts:

- ``per_task``: every task has its own sub-batch of ``--batch-size`` x ``--seq-len`` tokens (other questions per task),
  as per-task batches from mixed datasets are. The physical limit of any exact per-task-gradient step is the plain
  step: one backward over all sub-batches, since each task's loss depends on its own sub-batch only.
- ``shared``: one sub-batch with K label columns (every question labelled for every task). Exact per-task rows need
  K backwards through the shared graph: the limit is ``(1 + 2K) / 3`` plain steps (a forward costs about one
  third of a forward and backward).

Contenders (each in its own process, so that its peak memory is its own):

- ``trainer``: a plain `Trainer` on a wrapper whose forward returns the mean task loss;
- ``hf_mtl:<method>``: `MultiTaskTrainer` (exact rows per block, ``mtl_jacobian_mode="rows"``);
  ``@features`` (``mtl_jacobian_mode="features"``), ``@gramian`` (``"gramian"``, shared input only), ``@bf16``
  (``mtl_rows_dtype="bfloat16"``), ``@top`` (``mtl_surgery_parameters``: the last encoder layer only);
- ``torchjd:<method>``: ``mtl_backward`` + ``jac_to_grad`` with TorchJD's aggregator; ``torchjd:<method>@autogram``:
  ``autogram.Engine.compute_gramian`` + TorchJD's weighting + ``losses.backward(weights)``;
- ``libmtl:<method>``: LibMTL's weighting ``backward(losses)`` around the same encoder and heads.

A step is timed from the batch in hand to the end of ``zero_grad`` (forward, backward, the method, clipping to norm
1.0, AdamW's step); medians over ``--steps`` after ``--warmup``. On a CPU the ratios use the process's CPU time (one
thread), which other processes' load does not change; with CUDA, wall time. Peak memory: the resident set's peak
on a CPU (``VmHWM``, reset at the start), ``torch.cuda.max_memory_allocated`` on a GPU, above the level after the
model is built.

    python benchmarks/bench_scale.py                                   # bert4, both layouts, K = 2, 4, 8
    python benchmarks/bench_scale.py --tasks 4 --layouts shared --model bert_base --batch-size 8 --steps 2 \\
        --warmup 1 --contenders memory                                  # BERT-base, memory
    python benchmarks/bench_scale.py --device cuda --output results/scale_cuda.json
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402
import _peers as peers  # noqa: E402

LEARNING_RATE = 5e-5
MAX_GRAD_NORM = 1.0
#: label columns the K tasks cycle through: name -> (number of classes, function of a TREC row)
LABELS: dict[str, tuple[int, Any]] = {
    "coarse": (6, lambda row: row["coarse"]),
    "fine": (50, lambda row: row["fine"]),
    "qword": (8, lambda row: common.question_word(row["text"])),
    "length": (4, lambda row: min(3, len(row["text"].split()) // 5)),
    "first": (5, lambda row: min(4, (ord(row["text"][0].lower()) - 97) // 6) if row["text"][:1].isalpha() else 0),
    "marks": (3, lambda row: min(2, sum(ch in ",'\"" for ch in row["text"]))),
    "digits": (2, lambda row: int(any(ch.isdigit() for ch in row["text"]))),
    "vowel": (2, lambda row: int(row["text"][:1].lower() in "aeiou")),
}
#: contender sets: what `--contenders` names
SETS = {
    "speed": [
        "trainer",
        "hf_mtl:ew",
        "hf_mtl:upgrad",
        "hf_mtl:pcgrad",
        "hf_mtl:mgda",
        "hf_mtl:upgrad@features",
        "hf_mtl:upgrad@gramian",
        "torchjd:upgrad",
        "torchjd:upgrad@autogram",
        "libmtl:pcgrad",
    ],
    "memory": [
        "trainer",
        "hf_mtl:ew",
        "hf_mtl:upgrad",
        "hf_mtl:upgrad@bf16",
        "hf_mtl:upgrad@top",
        "hf_mtl:upgrad@features",
        "hf_mtl:upgrad@gramian",
        "torchjd:upgrad",
        "torchjd:upgrad@autogram",
    ],
}


@dataclass
class Config:
    layout: str = "per_task"
    tasks: int = 4
    model: str = "bert4"
    device: str = "cpu"
    threads: int = 1
    steps: int = 5
    warmup: int = 2
    batch_size: int = 16
    seq_len: int = 64
    data_dir: str | None = None
    seed: int = 0


@dataclass
class Result:
    name: str
    layout: str
    tasks: int
    timing: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------- model and data
def task_columns(k: int) -> list[tuple[str, str, int]]:
    """(task name, label column, classes) of the K tasks."""
    names = list(LABELS)
    return [
        (f"t{i}_{names[i % len(names)]}", names[i % len(names)], LABELS[names[i % len(names)]][0]) for i in range(k)
    ]


def build(cfg: Config) -> tuple[nn.Module, Any, list[dict[str, Any]]]:
    """The model, its tokenizer and ``warmup + steps`` multi-task batches of the layout."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging

    from hf_mtl import MultiTaskModel, Task
    from hf_mtl.data import TextCollator, load_trec
    from hf_mtl.data.loader import TaskGroup

    logging.set_verbosity_error()
    trec = load_trec(common._data_dir(cfg.data_dir, "trec"))["train"].shuffle(seed=cfg.seed)
    steps = cfg.warmup + cfg.steps
    groups = cfg.tasks if cfg.layout == "per_task" else 1
    needed = steps * groups * cfg.batch_size
    rows = [dict(trec[i % len(trec)]) for i in range(needed)]
    columns = task_columns(cfg.tasks)
    for row in rows:
        for _, column, _ in columns:
            row[column] = LABELS[column][1](row)
    if cfg.model == "bert4":
        counts = collections.Counter(w for r in trec["text"] for w in re.findall(r"\w+|[^\w\s]", r.lower()))
        folder = tempfile.mkdtemp()
        words = [w for w, c in counts.most_common() if c >= 1]
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        tokenizer = BertTokenizerFast(vocab=os.path.join(folder, "vocab.txt"))  # not `vocab_file=` (ignored)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=cfg.seq_len + 2,
        )
    elif cfg.model == "bert_base":
        from transformers import AutoTokenizer

        from hf_mtl.recipes import resolve_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_path(common.MINILM))  # bert-base-uncased's vocabulary
        config = BertConfig()  # 12 layers, width 768, 30,522 words: BERT-base
    else:
        raise SystemExit(f"--model must be bert4 or bert_base, got {cfg.model!r}")
    torch.manual_seed(cfg.seed)
    encoder = BertModel(config, add_pooling_layer=False)
    tasks = [Task(name, encoder="text", num_labels=classes, label_column=column) for name, column, classes in columns]
    model = MultiTaskModel.from_encoders({"text": encoder}, tasks)
    collator = TextCollator(tokenizer, max_length=cfg.seq_len, padding="max_length")
    labels = {t.name: model.heads[t.name].collate_labels for t in tasks}
    if cfg.layout == "per_task":
        task_groups = [TaskGroup([t], rows, cfg.batch_size, collator, labels) for t in tasks]
    elif cfg.layout == "shared":
        task_groups = [TaskGroup(tasks, rows, cfg.batch_size, collator, labels)]
    else:
        raise SystemExit(f"--layouts takes per_task and shared, got {cfg.layout!r}")
    batches, offset = [], 0
    for _ in range(steps):
        batch = {}
        for group in task_groups:
            batch[group.key] = group.collate(rows[offset : offset + cfg.batch_size])
            offset += cfg.batch_size
        batches.append(batch)
    return model, tokenizer, batches


# ---------------------------------------------------------------------------------------------- contenders
def training_args(cfg: Config, output_dir: str, device: torch.device) -> dict[str, Any]:
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


def _loader(batches: list[Any]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)


class MeanLossModel(nn.Module):
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": self.model(batch).loss}


def hf_mtl_options(spec: str, cfg: Config) -> dict[str, Any]:
    """``hf_mtl:upgrad@bf16`` -> the `MultiTaskTrainingArguments` fields."""
    method, _, control = spec.partition("@")
    options: dict[str, Any] = {"mtl_method": method}
    if control == "features":
        options["mtl_jacobian_mode"] = "features"
    elif control == "gramian":
        options["mtl_jacobian_mode"] = "gramian"
    elif control == "bf16":
        options["mtl_rows_dtype"] = "bfloat16"
    elif control == "top":
        last = 3 if cfg.model == "bert4" else 11
        options["mtl_surgery_parameters"] = [rf"encoder\.layer\.{last}\."]
    elif control:
        raise SystemExit(f"unknown memory control {control!r} in {spec!r}")
    return options


def run_loop(
    backward: Any,
    params: list[nn.Parameter],
    model: nn.Module,
    batches: list[Any],
    device: torch.device,
    clock: common.StepClock,
) -> None:
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for batch in batches:
        clock.start()
        backward(common.to_device(batch, device))
        float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.stop()


def torchjd_autogram_fn(model: nn.Module, task_names: list[str], weighting: Any) -> Any:
    """TorchJD's Gramian-based step: the autogram engine's Gramian of the task losses with respect to the encoder,
    the weighting's weights, one backward of the weighted losses."""
    from torchjd.autogram import Engine

    engine = Engine(model.encoders["text"], batch_dim=None)

    def backward(batch: Any) -> torch.Tensor:
        outputs = model(batch)
        losses = torch.stack([outputs.losses[t] for t in task_names])
        gramian = engine.compute_gramian(losses)
        losses.backward(weighting(gramian))
        return losses.detach().mean()

    return backward


TORCHJD_WEIGHTINGS = {
    "upgrad": lambda: peers._tj().UPGradWeighting(),
    "mgda": lambda: peers._tj().MGDAWeighting(),
    "pcgrad": lambda: peers._tj().PCGradWeighting(),
}


def run_contender(cfg: Config, name: str) -> Result:
    device = torch.device(cfg.device)
    common.set_threads(cfg.threads)
    result = Result(name=name, layout=cfg.layout, tasks=cfg.tasks)
    try:
        model, tokenizer, batches = build(cfg)
        model.to(device)
        task_names = list(model.tasks)
        clock = common.StepClock(device)
        probe = common.MemoryProbe(device)
        torch.manual_seed(cfg.seed)
        probe.start()
        library, _, spec = name.partition(":")
        if library == "trainer":
            from transformers import Trainer, TrainingArguments

            class FixedTrainer(Trainer):
                def get_train_dataloader(self) -> torch.utils.data.DataLoader:
                    return _loader(batches)

            with tempfile.TemporaryDirectory() as out:
                trainer = FixedTrainer(
                    model=MeanLossModel(model),
                    args=TrainingArguments(**training_args(cfg, out, device)),
                    callbacks=[common.trainer_clock_callback(clock)],
                )
                common.quiet(trainer)
                trainer.train()
        elif library == "hf_mtl":
            from hf_mtl import MultiTaskTrainer, MultiTaskTrainingArguments

            class FixedMultiTaskTrainer(MultiTaskTrainer):
                def get_train_dataloader(self) -> torch.utils.data.DataLoader:
                    return _loader(batches)

            with tempfile.TemporaryDirectory() as out:
                args = MultiTaskTrainingArguments(**training_args(cfg, out, device), **hf_mtl_options(spec, cfg))
                trainer = FixedMultiTaskTrainer(
                    model=model,
                    args=args,
                    processing_class={"text": tokenizer},
                    callbacks=[common.trainer_clock_callback(clock)],
                )
                common.quiet(trainer)
                trainer.train()
        elif library == "torchjd":
            method, _, mode = spec.partition("@")
            params = [p for p in model.parameters() if p.requires_grad]
            if mode == "autogram":
                backward = torchjd_autogram_fn(model, task_names, TORCHJD_WEIGHTINGS[method]())
            else:
                backward = peers.torchjd_step_fn(model, task_names, peers.TORCHJD_AGGREGATORS[method](cfg.tasks))
            run_loop(backward, params, model, batches, device, clock)
        elif library == "libmtl":
            shared = [p for p in model.encoders.parameters() if p.requires_grad]
            adapter, kwargs = peers.make_libmtl(spec, shared, task_names, device)
            backward = peers.libmtl_step_fn(model, task_names, adapter, kwargs)
            params = [p for p in model.parameters() if p.requires_grad]
            run_loop(backward, params, model, batches, device, clock)
        else:
            raise ValueError(f"unknown contender {name!r}")
        result.memory = probe.stop()
        result.timing = clock.summary(cfg.warmup)
    except Exception as error:  # a failing contender is reported, the others still run
        result.error = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    return result


def _child(cfg: Config, name: str, queue: Any) -> None:
    queue.put(asdict(run_contender(cfg, name)))


def run_isolated(cfg: Config, name: str) -> Result:
    context = mp.get_context("spawn" if cfg.device.startswith("cuda") else "fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cfg, name, queue))
    process.start()
    try:
        payload = queue.get(timeout=7200)
    except Exception:  # noqa: BLE001
        payload = asdict(Result(name=name, layout=cfg.layout, tasks=cfg.tasks, error=f"died ({process.exitcode})"))
    process.join()
    return Result(**payload)


# ---------------------------------------------------------------------------------------------- report
def quickstart_buffer() -> dict[str, Any]:
    """The quickstart recipe's Jacobian rows: per block (the default) against the global problem (every task's
    row spanning every shared parameter), in floats."""
    from hf_mtl.engine import ParameterPartition
    from hf_mtl.recipes import Recipe, build_trainer

    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
        recipe = Recipe.from_yaml(path, overrides=[f"training.output_dir={out}", "training.report_to=[]"])
        model = build_trainer(recipe).model
    names = list(model.tasks)
    blocks = ParameterPartition.from_model(model, names)
    whole = ParameterPartition.from_model(model, names, global_problem=True)
    return {
        "per_block_floats": blocks.row_size(),
        "global_floats": whole.row_size(),
        "ratio": blocks.row_size() / whole.row_size(),
        "blocks": [{"tasks": list(b.tasks), "parameters": b.size} for b in blocks.blocks],
    }


def _time(result: Result, device: str) -> float | None:
    if result.error or not result.timing:
        return None
    return result.timing["cpu_median_ms" if device == "cpu" else "median_ms"]


def report(results: list[Result], device: str) -> tuple[str, list[dict[str, Any]]]:
    """The tables (one per layout and K) and the targets, as text and as rows."""
    lines, checks = [], []
    by_case: dict[tuple[str, int], list[Result]] = {}
    for result in results:
        by_case.setdefault((result.layout, result.tasks), []).append(result)
    for (layout, k), case in sorted(by_case.items()):
        index = {r.name: r for r in case}
        plain = _time(index["trainer"], device) if "trainer" in index else None
        plain_memory = index["trainer"].memory.get("above_start_mib") if "trainer" in index else None
        autojac = _time(index.get("torchjd:upgrad", Result("", layout, k, error="absent")), device)
        limit = 1.0 if layout == "per_task" else (1 + 2 * k) / 3
        rows = []
        for result in case:
            t = _time(result, device)
            memory = result.memory.get("above_start_mib") if result.memory else None
            rows.append(
                [
                    result.name,
                    "error" if t is None else f"{t:.0f}",
                    "-" if t is None or not plain else f"{t / plain:.2f}",
                    "-" if t is None or not autojac or "torchjd" in result.name else f"{t / autojac:.2f}",
                    "-" if memory is None else f"{memory:.0f}",
                    "-" if memory is None or not plain_memory else f"{memory / plain_memory:.2f}",
                    result.error or "",
                ]
            )
        lines.append(f"\n{layout}, K = {k} (physical limit of exact rows: {limit:.2f} x plain)")
        lines.append(
            common.format_table(
                ["contender", "step ms", "x plain", "x TorchJD autojac", "peak MiB", "x plain memory", "error"], rows
            )
        )

        def ratio(name: str, index: dict = index, plain: float | None = plain) -> float | None:
            t = _time(index[name], device) if name in index else None
            return None if t is None or not plain else t / plain

        def add(target: str, value: float | None, bound: float, layout: str = layout, k: int = k) -> None:
            checks.append(
                {
                    "layout": layout,
                    "tasks": k,
                    "target": target,
                    "value": value,
                    "bound": bound,
                    "met": value is not None and value <= bound,
                }
            )

        add("ew / plain", ratio("hf_mtl:ew"), 1.03)
        if layout == "per_task":
            for method in ("upgrad", "pcgrad", "mgda"):
                add(f"{method} rows / plain", ratio(f"hf_mtl:{method}"), 1.10)
        else:
            for method in ("upgrad", "pcgrad", "mgda"):
                value = ratio(f"hf_mtl:{method}")
                add(f"{method} rows / ((1+2K)/3 x plain)", None if value is None else value / limit, 1.10)
            t, ref = _time(index.get("hf_mtl:upgrad", Result("", layout, k, error="-")), device), autojac
            add("upgrad rows / TorchJD autojac", None if t is None or not ref else t / ref, 0.8)
            if "hf_mtl:upgrad@gramian" in index and plain_memory:
                memory = index["hf_mtl:upgrad@gramian"].memory.get("above_start_mib")
                add("gramian path peak memory / plain", None if memory is None else memory / plain_memory, 1.2)
        add("features mode / plain", ratio("hf_mtl:upgrad@features"), 1.15)
    lines.append("\ntargets")
    lines.append(
        common.format_table(
            ["layout", "K", "target", "value", "bound", "met"],
            [
                [
                    c["layout"],
                    c["tasks"],
                    c["target"],
                    "-" if c["value"] is None else f"{c['value']:.3f}",
                    c["bound"],
                    "yes" if c["met"] else "NO",
                ]
                for c in checks
            ],
        )
    )
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert4", choices=["bert4", "bert_base"])
    parser.add_argument("--layouts", default="per_task,shared")
    parser.add_argument("--tasks", default="2,4,8", help="the Ks, comma separated")
    parser.add_argument("--contenders", default="speed", help="a set (speed, memory) or names, comma separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", default=None, help="a JSON file for the results")
    args = parser.parse_args(argv)
    names = SETS.get(args.contenders, args.contenders.split(","))
    results = []
    for layout in args.layouts.split(","):
        for k in (int(v) for v in args.tasks.split(",")):
            cfg = Config(
                layout=layout,
                tasks=k,
                model=args.model,
                device=args.device,
                threads=args.threads,
                steps=args.steps,
                warmup=args.warmup,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                data_dir=args.data_dir,
            )
            for name in names:
                if layout == "per_task" and name.endswith("@gramian"):
                    continue  # refused by design: per-task batches have no shared-input Gramian
                print(f"{layout} K={k} {name} ...", flush=True)
                results.append(run_isolated(cfg, name))
    text, checks = report(results, args.device)
    buffer = quickstart_buffer()
    text += (
        f"\n\nquickstart rows: {buffer['per_block_floats']:,} floats per block vs {buffer['global_floats']:,} in one "
        f"global problem: {buffer['ratio']:.3f}x (target <= 0.55)"
    )
    print(text)
    common.write_json(
        args.output,
        {
            "machine": common.machine_info(torch.device(args.device), args.threads),
            "config": vars(args),
            "results": [asdict(r) for r in results],
            "targets": checks,
            "quickstart_buffer": buffer,
        },
    )


if __name__ == "__main__":
    main()

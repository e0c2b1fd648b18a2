"""Trains the tiny five-task model for a few steps under several configurations, with FSDP2 when launched on
several processes, and saves each run's full parameters (run by test_fsdp.py).

    python train_tiny_fsdp.py OUT PER_DEVICE_BATCH CONFIG [CONFIG ...]                     # one process, no FSDP
    torchrun --nproc_per_node 2 train_tiny_fsdp.py OUT PER_DEVICE_BATCH CONFIG [CONFIG ...] # FSDP2 over gloo

On several processes the model is sharded by ``torch.distributed.fsdp.fully_shard`` (each encoder is an FSDP unit,
and the root holds the heads), so every trainable parameter is a `DTensor` sharded on dim 0 and the engine runs its
FSDP mode (`hf_mtl.engine.fsdp`). The step is the trainer's: the multi-task loader sharded for the rank, one engine
window per optimizer step (``begin_window``, ``micro_step`` per micro-batch, ``finalize``), SGD, and the method's
hook after the optimizer step.

A CONFIG is ``name=method[,key:value...]`` with keys ``sampling``, ``accumulation``, ``blocks``, ``surgery`` (a
pattern of `mtl_surgery_parameters`), ``rows`` (``rows:bfloat16``), ``partial``
(``partial:yes``: half of the rows carry no ``coarse`` label, so a micro-batch can have ``coarse`` items on one rank
and none on the other), ``shard`` (``shard:encoders``: the root is not sharded, so the heads stay plain tensors) and
``evaluate`` (``evaluate:yes``: `MultiTaskTrainer.evaluate` on eval sets whose sizes
give the ranks different numbers of batches). Dropout is off and the optimizer is SGD, so that runs over the same
global batch can be compared parameter by parameter. A configuration the engine refuses under FSDP saves its
message instead.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder  # noqa: E402


def parse(config: str) -> tuple[str, dict[str, str]]:
    name, _, rest = config.partition("=")
    method, *options = rest.split(",")
    return name, {"method": method, **dict(option.split(":", 1) for option in options)}


def main() -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import BertTokenizerFast

    from hf_mtl import MultiTaskModel, Task
    from hf_mtl.data import SpeechCollator, TextCollator, VisionCollator, load_digits, load_fsdd, load_trec
    from hf_mtl.data.loader import build_dataloader, group_tasks
    from hf_mtl.engine import MultiTaskEngine
    from hf_mtl.methods import get_method

    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
    fsdd, trec, digits = load_fsdd(), load_trec(), load_digits()
    counts = collections.Counter(w for t in trec["train"]["text"] for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / f"vocab-{rank}.txt"
    words = [w for w, c in counts.most_common() if c >= 2]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec["train"].features["fine"].num_classes),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
    ]
    # half of the questions without their coarse label (ClassLabel's missing value)
    partly_labelled = trec["train"].map(lambda row, i: {"coarse": -1 if i % 2 else row["coarse"]}, with_indices=True)
    collators = {
        "speech": SpeechCollator(max_length_seconds=0.5),
        "text": TextCollator(tokenizer),
        "vision": VisionCollator(),
    }
    for config in sys.argv[3:]:
        name, options = parse(config)
        encoders = {
            "speech": tiny_speech_encoder(dropout=0.0),
            "text": tiny_text_encoder(tokenizer.vocab_size, dropout=0.0),
            "vision": tiny_vision_encoder(dropout=0.0),
        }
        model = no_dropout(MultiTaskModel.from_encoders(encoders, tasks, head_dropout=0.0))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        if distributed:
            for encoder in model.encoders.values():
                fully_shard(encoder)
            if options.get("shard") != "encoders":  # `shard:encoders` leaves the heads unsharded (refused)
                fully_shard(model)
        model.train()
        try:
            engine = MultiTaskEngine(
                model,
                get_method(options["method"], num_tasks=len(tasks)),
                [task.name for task in tasks],
                seed=0,
                global_problem=options.get("blocks") == "global",
                surgery_parameters=[options["surgery"]] if "surgery" in options else None,
                rows_dtype=torch.bfloat16 if options.get("rows") == "bfloat16" else torch.float32,
            )
        except ValueError as error:
            if rank == 0:
                torch.save({"refusal": str(error), "world_size": world}, out / f"{name}.pt")
            continue
        sharded = sum(1 for p in engine.model_params if hasattr(p, "to_local"))
        data = {
            "digit": fsdd["train"],
            "speaker": fsdd["train"],
            "coarse": partly_labelled if options.get("partial") == "yes" else trec["train"],
            "fine": trec["train"],
            "handwritten": digits["train"],
        }
        groups = group_tasks(
            tasks,
            data,
            batch_sizes={},
            default_batch_size=batch_size,
            collators=collators,
            label_collators={task.name: model.heads[task.name].collate_labels for task in tasks},
        )
        loader = build_dataloader(
            groups, sampling=options.get("sampling", "all"), seed=0, num_replicas=world, rank=rank, pin_memory=False
        )
        optimizer = torch.optim.SGD(engine.model_params + engine.method_params, lr=0.5)
        accumulation = int(options.get("accumulation", "1"))
        batches_iter = iter(loader)
        logs, split_micro_batches = [], 0
        for step in range(int(os.environ.get("TINY_STEPS", "3"))):
            batches = [next(batches_iter) for _ in range(accumulation)]
            if distributed:  # micro-batches whose coarse items are on some ranks only (FSDP's zero-loss backwards)
                for batch in batches:
                    local = sum(
                        int((s["labels"]["coarse"] != -100).sum())
                        for s in batch.values()
                        if "coarse" in (s.get("labels") or {})
                    )
                    found = torch.tensor([float(local > 0), 1.0])
                    dist.all_reduce(found)
                    split_micro_batches += int(0 < found[0] < found[1])
            engine.begin_window(model, batches, step=step)
            for batch in batches:
                engine.micro_step(model, batch)
            engine.finalize()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            engine.after_optimizer_step(model)
            logs.append(engine.pop_logs())
        metrics = {}
        if options.get("evaluate") == "yes":
            from hf_mtl import MultiTaskTrainer, MultiTaskTrainingArguments

            args = MultiTaskTrainingArguments(
                output_dir=str(out / name), mtl_method=options["method"], per_device_eval_batch_size=8, report_to=[]
            )
            trainer = MultiTaskTrainer(
                model=model,
                args=args,
                eval_dataset={
                    "digit": fsdd["test"].select(range(17)),
                    "coarse": trec["test"].select(range(25)),
                    "handwritten": digits["test"].select(range(33)),
                },
                processing_class={"text": tokenizer},
                data_collator={"speech": collators["speech"]},
            )
            metrics = trainer.evaluate()
        full = {}
        for param_name, param in model.named_parameters():
            full[param_name] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        if rank == 0:
            torch.save(
                {
                    "params": full,
                    "initial": initial,
                    "method": {n: p.detach().clone() for n, p in engine.method.named_parameters()},
                    "world_size": world,
                    "sharded_parameters": sharded,
                    "local_size": sum(
                        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in engine.model_params
                    ),
                    "full_size": sum(p.numel() for p in engine.model_params),
                    "split_micro_batches": split_micro_batches,
                    "describe": engine.describe(),
                    "logs": logs,
                    "metrics": metrics,
                },
                out / f"{name}.pt",
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

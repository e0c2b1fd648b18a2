"""Trains the tiny five-task model for a few steps under several configurations and saves each run's parameters
(run by test_ddp.py).

    python train_tiny.py OUT PER_DEVICE_BATCH CONFIG [CONFIG ...]                    # one process
    torchrun --nproc_per_node 2 train_tiny.py OUT PER_DEVICE_BATCH CONFIG [CONFIG ...] # two processes (gloo)
    accelerate launch --config_file CFG train_tiny.py OUT PER_DEVICE_BATCH CONFIG ...

A CONFIG is ``name=method[,key:value...]`` with keys ``sampling``, ``accumulation``, ``sam``, ``evaluate``,
``dropout`` (``on``: 0.1 everywhere), ``save`` (checkpoint every N steps), ``kill`` (the process kills itself with
SIGKILL right after saving the checkpoint of that step) and ``resume`` (``yes``: resume from the run's last
checkpoint); each run starts from the same weights and saves ``OUT/<name>.pt``. Dropout is off by default and the
optimizer is SGD so that runs with the same global batch can be compared parameter by parameter.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder  # noqa: E402


def parse(config: str) -> tuple[str, dict[str, str]]:
    name, _, rest = config.partition("=")
    method, *options = rest.split(",")
    return name, {"method": method, **dict(option.split(":", 1) for option in options)}


class _KillAfterSave:
    """Kills the process with SIGKILL once the checkpoint of step ``step`` is on disk (a crash, no clean-up)."""

    def __new__(cls, step: int):  # noqa: ANN204
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                if state.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return Kill()


def main() -> None:
    from transformers import BertTokenizerFast

    from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
    from hf_mtl.data import SpeechCollator, load_digits, load_fsdd, load_trec

    out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
    fsdd, trec, digits = load_fsdd(), load_trec(), load_digits()
    counts = collections.Counter(w for t in trec["train"]["text"] for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = out / "vocab.txt"
    out.mkdir(parents=True, exist_ok=True)
    words = [w for w, c in counts.most_common() if c >= 2]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores `vocab_file=`
    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec["train"].features["fine"].num_classes),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
    ]
    for config in sys.argv[3:]:
        name, options = parse(config)
        dropout = 0.1 if options.get("dropout") == "on" else 0.0
        encoders = {
            "speech": tiny_speech_encoder(dropout=dropout),
            "text": tiny_text_encoder(tokenizer.vocab_size, dropout=dropout),
            "vision": tiny_vision_encoder(dropout=dropout),
        }
        model = MultiTaskModel.from_encoders(encoders, tasks, head_dropout=dropout)
        if not dropout:
            no_dropout(model)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = MultiTaskTrainingArguments(
            output_dir=str(out / name),
            overwrite_output_dir=options.get("resume") != "yes",
            mtl_method=options["method"],
            task_sampling=options.get("sampling", "all"),
            gradient_accumulation_steps=int(options.get("accumulation", "1")),
            sam=options.get("sam"),
            sam_rho=0.5 if options.get("sam") else None,
            max_steps=int(os.environ.get("TINY_STEPS", "3")),
            per_device_train_batch_size=batch_size,
            learning_rate=0.5,
            optim="sgd",
            warmup_steps=0,
            lr_scheduler_type="constant",
            save_strategy="steps" if "save" in options else "no",
            save_steps=int(options.get("save", "500")),
            report_to=[],
            disable_tqdm=True,
            seed=0,
            dataloader_pin_memory=False,
            logging_steps=1,
        )
        trainer = MultiTaskTrainer(
            model=model,
            args=args,
            train_dataset={
                "digit": fsdd["train"],
                "speaker": fsdd["train"],
                "coarse": trec["train"],
                "fine": trec["train"],
                "handwritten": digits["train"],
            },
            eval_dataset={"digit": fsdd["test"], "coarse": trec["test"], "handwritten": digits["test"]},
            processing_class={"text": tokenizer},
            data_collator={"speech": SpeechCollator(max_length_seconds=0.5)},
        )
        if "kill" in options:
            trainer.add_callback(_KillAfterSave(int(options["kill"])))
        if options.get("resume") == "yes":
            checkpoints = sorted((out / name).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            trainer.train(resume_from_checkpoint=str(checkpoints[-1]))
        else:
            trainer.train()
        metrics = trainer.evaluate() if options.get("evaluate") == "yes" else {}
        if trainer.is_world_process_zero():
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "initial": initial,
                    "world_size": trainer.args.world_size,
                    "metrics": metrics,
                    "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
                    "distributed_type": str(trainer.accelerator.distributed_type),
                },
                out / f"{name}.pt",
            )
    if torch.distributed.is_initialized():
        # Every rank leaves the process group together: a rank that exits while gloo's
        # threads still run aborts with "terminate called without an active exception".
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

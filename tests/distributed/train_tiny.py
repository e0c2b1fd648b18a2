"""Trains the tiny five-task model for a few steps and saves its parameters (run by test_ddp.py).

    python train_tiny.py OUT METHOD PER_DEVICE_BATCH [SAMPLING]          # one process
    torchrun --nproc_per_node 2 train_tiny.py OUT METHOD PER_DEVICE_BATCH # two processes (gloo)

Dropout is off and the optimizer is SGD so that runs with the same global batch can be compared
parameter by parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder  # noqa: E402


def main() -> None:
    import collections
    import re

    from transformers import BertTokenizerFast

    from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
    from hf_mtl.data import SpeechCollator, load_digits, load_fsdd, load_trec

    out, method, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sampling = sys.argv[4] if len(sys.argv) > 4 else "all"
    fsdd, trec, digits = load_fsdd(), load_trec(), load_digits()
    counts = collections.Counter(w for t in trec["train"]["text"] for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = Path(out) / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
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
    encoders = {
        "speech": tiny_speech_encoder(dropout=0.0),
        "text": tiny_text_encoder(tokenizer.vocab_size, dropout=0.0),
        "vision": tiny_vision_encoder(dropout=0.0),
    }
    model = no_dropout(MultiTaskModel.from_encoders(encoders, tasks, head_dropout=0.0))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MultiTaskTrainingArguments(
        output_dir=str(Path(out) / "run"),
        overwrite_output_dir=True,
        mtl_method=method,
        task_sampling=sampling,
        max_steps=int(__import__("os").environ.get("TINY_STEPS", "3")),
        per_device_train_batch_size=batch_size,
        learning_rate=0.5,
        optim="sgd",
        warmup_steps=0,
        lr_scheduler_type="constant",
        save_strategy="no",
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
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "initial": initial,
                "world_size": trainer.args.world_size,
                "metrics": metrics,
                "distributed_type": str(trainer.accelerator.distributed_type),
            },
            Path(out) / "result.pt",
        )


if __name__ == "__main__":
    main()

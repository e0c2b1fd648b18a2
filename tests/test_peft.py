"""PEFT-wrapped encoders: only the adapter and the heads train, the Jacobian covers the adapter, and a saved
model reloads with its adapter."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task

from .conftest import tiny_text_encoder


def test_lora_encoder_trains_its_adapter_and_round_trips(tmp_path, trec_sample, trec_tokenizer):
    encoder = get_peft_model(
        tiny_text_encoder(trec_tokenizer.vocab_size, dropout=0.0), LoraConfig(r=4, target_modules=["query", "value"])
    )
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
    ]
    model = MultiTaskModel.from_encoders({"text": encoder}, tasks, head_dropout=0.0)
    assert model.config.adapters["text"]["peft_type"] == "LORA"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert frozen and lora
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"),
        mtl_method="pcgrad",
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset={"coarse": trec_sample["train"], "fine": trec_sample["train"]},
        processing_class={"text": trec_tokenizer},
    )
    shared = [name for name, _ in trainer.engine.partition.shared]
    assert shared and all("lora_" in name for name in shared)  # the Jacobian's columns are the adapter's
    trainer.train()
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in lora.items())

    model.save_pretrained(tmp_path / "saved")
    reloaded = MultiTaskModel.from_pretrained(tmp_path / "saved").eval()
    batch = trec_tokenizer(trec_sample["test"]["text"][:8], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(task="coarse", **batch).logits["coarse"]
        got = reloaded(task="coarse", **batch).logits["coarse"]
    torch.testing.assert_close(got, expected)

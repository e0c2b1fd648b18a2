"""`MultiTaskTrainer` end to end on real data (FSDD speech, TREC text, UCI digits) with tiny encoders."""

from __future__ import annotations

import itertools
import json
import os

import datasets
import evaluate
import numpy as np
import pytest
import torch

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.data import SpeechCollator

from .conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder

TASKS = ("digit", "speaker", "coarse", "fine", "handwritten")


@pytest.fixture()
def build(tmp_path, fsdd_sample, trec_sample, uci_digits, trec_tokenizer):
    """A function: (dropout, **argument overrides) -> a fresh trainer on the five real tasks."""
    runs = itertools.count()

    def make(dropout: float = 0.1, **overrides):
        tasks = [
            Task("digit", encoder="speech", num_labels=10),
            Task("speaker", encoder="speech", num_labels=6),
            Task("coarse", encoder="text", num_labels=6),
            Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
            Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
        ]
        encoders = {
            "speech": tiny_speech_encoder(dropout=dropout),
            "text": tiny_text_encoder(trec_tokenizer.vocab_size, dropout=dropout),
            "vision": tiny_vision_encoder(dropout=dropout),
        }
        model = MultiTaskModel.from_encoders(encoders, tasks, head_dropout=dropout)
        if dropout == 0:
            no_dropout(model)
        options = dict(
            output_dir=str(tmp_path / f"out{next(runs)}"),  # each trainer its own run folder
            max_steps=40,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=3e-3,
            warmup_steps=0,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            dataloader_pin_memory=False,
        )
        options.update(overrides)
        train = {
            "digit": fsdd_sample["train"],
            "speaker": fsdd_sample["train"],
            "coarse": trec_sample["train"],
            "fine": trec_sample["train"],
            "handwritten": uci_digits["train"],
        }
        evaluation = {
            "digit": fsdd_sample["test"],
            "speaker": fsdd_sample["test"],
            "coarse": trec_sample["test"],
            "fine": trec_sample["test"],
            "handwritten": uci_digits["test"],
        }
        return MultiTaskTrainer(
            model=model,
            args=MultiTaskTrainingArguments(**options),
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class={"text": trec_tokenizer},
            data_collator={"speech": SpeechCollator(max_length_seconds=1.0)},
        )

    return make


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_every_task_loss_goes_down_on_real_data(build, method):
    trainer = build(mtl_method=method)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for task in TASKS:
        assert after[f"eval_{task}_loss"] < before[f"eval_{task}_loss"], (task, before, after)
        assert 0.0 <= after[f"eval_{task}_accuracy"] <= 1.0 and f"eval_{task}_f1" in after
    assert after["eval_loss"] == pytest.approx(sum(after[f"eval_{t}_loss"] for t in TASKS) / len(TASKS))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(f"loss/{t}" in logs[-1] for t in TASKS)
    # a Jacobian method weighs the tasks that share parameters; the vision task shares none
    weighted = TASKS if method == "ew" else TASKS[:4]
    assert all(f"weight/{t}" in logs[-1] for t in weighted) and ("weight/handwritten" in logs[-1]) == (method == "ew")


def test_gradient_accumulation_equals_the_large_batch(build):
    """Rows accumulate over micro-steps and are combined once: 2 x 8 with accumulation gives the 16-row step.

    SGD, because Adam's normalisation would amplify float rounding on near-zero gradient entries."""
    accumulated = build(
        dropout=0.0,
        mtl_method="upgrad",
        max_steps=2,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        optim="sgd",
    )
    large = build(
        dropout=0.0,
        mtl_method="upgrad",
        max_steps=2,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        learning_rate=0.5,
        optim="sgd",
    )
    accumulated.train()
    large.train()
    for (name, a), (_, b) in zip(accumulated.model.named_parameters(), large.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_method_parameters_are_trained_with_their_own_group(build):
    trainer = build(mtl_method="uw", max_steps=5, mtl_method_learning_rate=0.05)
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups if any(p is trainer.method.log_variance for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert not torch.equal(trainer.method.log_variance.detach(), torch.full((5,), -0.5))


def test_resume_restores_the_method_state_and_matches_an_uninterrupted_run(build, tmp_path):
    whole = build(
        dropout=0.0, mtl_method="dwa", mtl_method_kwargs={"window": 2}, max_steps=6, output_dir=str(tmp_path / "whole")
    )
    whole.train()
    first = build(
        dropout=0.0,
        mtl_method="dwa",
        mtl_method_kwargs={"window": 2},
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        output_dir=str(tmp_path / "first"),
    )
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-3"
    assert (checkpoint / "mtl_state.pt").is_file()
    resumed = build(
        dropout=0.0, mtl_method="dwa", mtl_method_kwargs={"window": 2}, max_steps=6, output_dir=str(tmp_path / "first")
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in whole.method.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(resumed.method.state_dict()[key], value, equal_nan=True, msg=key)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_saved_model_and_processors_reload(build, tmp_path):
    trainer = build(max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "processors" / "text" / "tokenizer_config.json").is_file()
    reloaded = MultiTaskModel.from_pretrained(str(tmp_path / "final"))
    assert reloaded.task_names == list(TASKS)
    with open(tmp_path / "final" / "config.json") as f:
        assert json.load(f)["model_type"] == "hf_mtl"


def test_an_existing_output_dir_is_not_overwritten(build, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    trainer = build(output_dir=str(out), max_steps=1)
    with pytest.raises(ValueError, match="`output_dir`.*not empty.*overwrite_output_dir"):
        trainer.train()
    assert (out / "keep.txt").read_text() == "mine" and os.listdir(out) == ["keep.txt"]


def test_bad_trainer_input_fails_before_training(build, fsdd_sample, trec_sample, uci_digits, tmp_path):
    trainer = build(max_steps=1)
    model, args = trainer.model, trainer.args
    common = dict(model=model, args=args, processing_class={"text": trainer.processors["text"]})
    data = {
        "digit": fsdd_sample["train"],
        "speaker": fsdd_sample["train"],
        "coarse": trec_sample["train"],
        "fine": trec_sample["train"],
        "handwritten": uci_digits["train"],
    }
    with pytest.raises(ValueError, match="task 'handwritten' has no data"):
        MultiTaskTrainer(train_dataset={k: v for k, v in data.items() if k != "handwritten"}, **common)
    with pytest.raises(ValueError, match="unknown task.*'colour'"):
        MultiTaskTrainer(train_dataset={**data, "colour": uci_digits["train"]}, **common)
    wrong = uci_digits["train"].cast_column("label", uci_digits["train"].features["label"].__class__(num_classes=12))
    wrong = wrong.map(lambda row: {"label": 11 if row["label"] == 3 else row["label"]})
    with pytest.raises(ValueError, match=r"task 'handwritten'.*11.*outside \[0, 9\]"):
        MultiTaskTrainer(train_dataset={**data, "handwritten": wrong}, **common)
    with pytest.raises(ValueError, match="`processing_class`.*unknown encoder.*'audio'"):
        MultiTaskTrainer(train_dataset=data, model=model, args=args, processing_class={"audio": None})
    with pytest.raises(ValueError, match=r"task 'coarse' \(encoder 'text'.*reads `input_ids`.*processing_class"):
        MultiTaskTrainer(train_dataset=data, model=model, args=args)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mtl_method", "pcgard", "`mtl_method` must be one of .*pcgrad"),
        ("task_sampling", "random", "`task_sampling` must be one of .*round_robin"),
        ("sam", "gsam", "`sam` must be one of none, asam, fmtl, sam"),
        ("sam_rho", -1.0, "`sam_rho` must be > 0, got -1.0"),
        ("sampling_temperature", 0.0, "`sampling_temperature` must be > 0"),
        ("task_batch_sizes", '{"digit": 0}', "`task_batch_sizes` must map task names to positive integers"),
        ("mtl_method_kwargs", "{not json", "`mtl_method_kwargs` must be a JSON object"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_unknown_method_keyword_is_reported(build):
    with pytest.raises(ValueError, match="invalid `mtl_method_kwargs` for method 'cagrad'"):
        build(mtl_method="cagrad", mtl_method_kwargs={"alpha": 0.4})


class Neighbour(evaluate.Metric):
    """A user's `evaluate` module (no Hub): the fraction of predictions one class away from the label."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="neighbour confusions",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"neighbour": float((np.abs(predictions - references) == 1).mean())}


def test_a_user_evaluate_module_is_reported_per_task(build):
    trainer = build(max_steps=1)
    trainer.task_metric_modules = trainer._build_metrics({"handwritten": ["accuracy", Neighbour()]})
    metrics = trainer.evaluate()
    labels = np.asarray(trainer.eval_groups[-1].dataset["label"])
    logits = []
    model = trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(labels), 64):
            rows = trainer.eval_groups[-1].dataset[start : start + 64]
            pixels = torch.tensor(rows["pixel_values"]).unsqueeze(1)
            logits.append(model(task="handwritten", pixel_values=pixels).logits["handwritten"])
    predictions = torch.cat(logits).argmax(-1).numpy()
    assert metrics["eval_handwritten_neighbour"] == pytest.approx(float((np.abs(predictions - labels) == 1).mean()))
    assert metrics["eval_handwritten_accuracy"] == pytest.approx(float((predictions == labels).mean()))
    assert "eval_handwritten_f1" not in metrics and "eval_coarse_f1" in metrics


def test_floating_point_ops_sum_each_encoders_estimate_over_the_sub_batches(build):
    trainer = build(max_steps=2)
    batch = next(iter(trainer.get_train_dataloader()))
    encoders = trainer.model.encoders
    expected = 0
    for key, encoder in (("digit+speaker", "speech"), ("coarse+fine", "text"), ("handwritten", "vision")):
        tokens = batch[key][encoders[encoder].main_input_name].numel()
        expected += 6 * tokens * encoders[encoder].num_parameters(exclude_embeddings=True)
    assert expected > 0 and trainer.floating_point_ops(batch) == expected
    trainer.train()
    assert trainer.state.total_flos > 0

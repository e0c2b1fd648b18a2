"""Inference from a saved run: `AutoModel` returns the `MultiTaskModel`, the "multi-task-classification"
pipeline predicts on raw TREC text, UCI digit images and FSDD waveforms (arrays and files) exactly what the
model gives on the collated evaluation batch, with the accuracy `evaluate()` reported; `Trainer.predict`
returns per-task predictions; `hf-mtl predict` does the same from the shell, also by repo id from a Hub cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, pipeline

from hf_mtl import (
    MultiTaskConfig,
    MultiTaskModel,
    MultiTaskPipeline,
    MultiTaskTrainer,
    MultiTaskTrainingArguments,
    Task,
)
from hf_mtl.data import SpeechCollator, TextCollator

from .conftest import tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder
from .fake_hub import word_tokenizer, write_vocab

TASKS = ("digit", "coarse", "handwritten")
HF_MTL = Path(shutil.which("hf-mtl", path=str(Path(sys.executable).parent)) or "hf-mtl")


@pytest.fixture(scope="module")
def trec_words(tmp_path_factory, trec_sample):
    """A BERT tokenizer whose vocabulary is the frequent words of the TREC training questions."""
    return word_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab"), trec_sample["train"]["text"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, fsdd_sample, trec_sample, uci_digits, trec_words):
    """A model trained for 60 steps on three real tasks, evaluated and saved: (trainer, metrics, folder)."""
    folder = tmp_path_factory.mktemp("inference") / "run"
    tasks = [
        Task("digit", encoder="speech", label_names=fsdd_sample["train"].features["digit"].names),
        Task("coarse", encoder="text", label_names=trec_sample["train"].features["coarse"].names),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
    ]
    encoders = {
        "speech": tiny_speech_encoder(),
        "text": tiny_text_encoder(trec_words.vocab_size),
        "vision": tiny_vision_encoder(),
    }
    args = MultiTaskTrainingArguments(
        output_dir=str(folder),
        max_steps=60,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
    )
    trainer = MultiTaskTrainer(
        model=MultiTaskModel.from_encoders(encoders, tasks),
        args=args,
        train_dataset={
            "digit": fsdd_sample["train"],
            "coarse": trec_sample["train"],
            "handwritten": uci_digits["train"],
        },
        eval_dataset={"digit": fsdd_sample["test"], "coarse": trec_sample["test"], "handwritten": uci_digits["test"]},
        processing_class={"text": trec_words},
        data_collator={
            "speech": SpeechCollator(max_length_seconds=1.0),
            "text": TextCollator(trec_words, max_length=24),
        },
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    return trainer, metrics, folder


def _direct_predictions(trainer, task, rows):
    """The arg-max of the model's logits on the trainer's own collation of ``rows``."""
    model = trainer.model.eval()
    encoder = model.tasks[task].encoder
    batch = trainer.collators[encoder](rows)
    with torch.no_grad():
        return model({task: batch}, tasks=[task]).logits[task].argmax(-1).tolist()


def test_auto_classes_load_the_saved_run(run):
    trainer, _, folder = run
    assert isinstance(AutoConfig.from_pretrained(folder), MultiTaskConfig)
    model = AutoModel.from_pretrained(folder)
    assert type(model) is MultiTaskModel and model.task_names == list(TASKS)
    saved = trainer.model.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def test_pipeline_predicts_raw_inputs_as_the_model_does(run, fsdd_sample, trec_sample, uci_digits, tmp_path):
    trainer, _, folder = run
    classify = pipeline("multi-task-classification", model=str(folder))
    assert isinstance(classify, MultiTaskPipeline)
    coarse_names = trec_sample["train"].features["coarse"].names

    # raw TREC text, one at a time and as a list
    texts = trec_sample["test"]["text"][:6]
    expected = _direct_predictions(trainer, "coarse", [{"text": text} for text in texts])
    single = classify(texts[0], task="coarse")
    assert set(single) == {"coarse"} and single["coarse"]["label"] == coarse_names[expected[0]]
    assert 0 < single["coarse"]["score"] <= 1
    assert [out["coarse"]["label"] for out in classify(texts, task="coarse")] == [coarse_names[i] for i in expected]
    ranked = classify(texts[0], task="coarse", top_k=None)["coarse"]
    assert len(ranked) == 6 and sum(entry["score"] for entry in ranked) == pytest.approx(1.0, abs=1e-5)
    assert ranked[0]["label"] == single["coarse"]["label"]
    assert ranked[0]["score"] == pytest.approx(single["coarse"]["score"])

    # a UCI digit as a PIL image (8-bit grey, as an image file would hold it) and as an image file
    pixels = np.asarray(uci_digits["test"][0]["pixel_values"], dtype=np.float32)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    expected = _direct_predictions(trainer, "handwritten", [{"pixel_values": image}])
    assert classify(image)["handwritten"]["label"] == expected[0]  # no task: every vision task
    image.save(tmp_path / "digit.png")
    assert classify(str(tmp_path / "digit.png"))["handwritten"]["label"] == expected[0]

    # an FSDD waveform: array with its rate, audio dict, .wav file; all give the model's prediction
    row = fsdd_sample["test"][3]
    waveform = np.asarray(row["audio"], dtype=np.float32)
    expected = _direct_predictions(trainer, "digit", [{"audio": waveform, "sampling_rate": row["sampling_rate"]}])
    label = str(expected[0])
    assert classify(waveform, task="digit", sampling_rate=8000)["digit"]["label"] == label
    assert classify({"array": waveform, "sampling_rate": 8000})["digit"]["label"] == label
    soundfile.write(tmp_path / "clip.wav", waveform, 8000, subtype="FLOAT")
    assert classify(str(tmp_path / "clip.wav"))["digit"]["label"] == label
    # at another rate the clip is resampled to the training rate (recorded in processors/speech/collator_config.json)
    upsampled = classify({"array": waveform.repeat(2), "sampling_rate": 16000}, task="digit")
    assert set(upsampled) == {"digit"}

    with pytest.raises(ValueError, match="unknown task"):
        classify("hello", task="nope")
    with pytest.raises(ValueError, match="is not an image file"):
        classify("no such file", task="handwritten")


def test_pipeline_accuracy_equals_what_evaluate_reported(run, fsdd_sample, trec_sample, uci_digits):
    _, metrics, folder = run
    classify = MultiTaskPipeline(model=AutoModel.from_pretrained(folder), device="cpu")
    digit_names = fsdd_sample["test"].features["digit"].names
    coarse_names = trec_sample["test"].features["coarse"].names
    cases = {
        "coarse": (list(trec_sample["test"]["text"]), [coarse_names[i] for i in trec_sample["test"]["coarse"]], {}),
        "handwritten": (
            [np.asarray(p, dtype=np.float32) for p in uci_digits["test"]["pixel_values"]],
            list(uci_digits["test"]["label"]),
            {},
        ),
        "digit": (
            [np.asarray(a, dtype=np.float32) for a in fsdd_sample["test"]["audio"]],
            [digit_names[i] for i in fsdd_sample["test"]["digit"]],
            {"sampling_rate": 8000},
        ),
    }
    for task, (inputs, labels, options) in cases.items():
        outputs = classify(inputs, task=task, batch_size=64, **options)
        predicted = [out[task]["label"] for out in outputs]
        accuracy = float(np.mean([p == y for p, y in zip(predicted, labels)]))
        assert accuracy == pytest.approx(metrics[f"eval_{task}_accuracy"], abs=1e-12), task
        assert len(set(predicted)) > 1, f"{task}: a trained model predicts more than one class"


def test_trainer_predict_returns_per_task_predictions_in_row_order(run, fsdd_sample, trec_sample):
    trainer, metrics, _ = run
    coarse = trec_sample["test"].select(range(70))  # two batches of 64 and 6
    digit = fsdd_sample["test"].select(range(10))
    unlabelled = trec_sample["test"].select(range(5)).remove_columns(["coarse", "fine"])
    output = trainer.predict({"coarse": coarse, "digit": digit})
    assert set(output.predictions) == set(output.label_ids) == {"coarse", "digit"}
    assert output.predictions["coarse"].shape == (70, 6) and output.predictions["digit"].shape == (10, 10)
    assert output.label_ids["coarse"].tolist() == coarse["coarse"]
    expected = _direct_predictions(trainer, "coarse", [{"text": t} for t in coarse["text"]])
    assert output.predictions["coarse"].argmax(-1).tolist() == expected
    accuracy = float(np.mean(output.predictions["coarse"].argmax(-1) == np.asarray(coarse["coarse"])))
    assert output.metrics["test_coarse_accuracy"] == pytest.approx(accuracy)
    assert "test_coarse_loss" in output.metrics and "test_digit_f1" in output.metrics
    # a data set without labels: predictions only
    bare = trainer.predict({"coarse": unlabelled})
    assert bare.label_ids == {"coarse": None} and bare.predictions["coarse"].shape == (5, 6)
    assert not any(key.startswith("test_coarse_") for key in bare.metrics)
    np.testing.assert_allclose(bare.predictions["coarse"], output.predictions["coarse"][:5], rtol=1e-5, atol=1e-6)


def test_hf_mtl_predict_from_the_folder_and_by_repo_id_from_a_hub_cache(run, trec_sample, uci_digits, tmp_path):
    """The shell: texts and an image file from the run folder; then the run published in a Hugging Face cache
    and predicted by its repo id with HF_HUB_OFFLINE=1 (processors read from processors/<encoder>/ of the cache)."""
    trainer, _, folder = run
    coarse_names = trec_sample["train"].features["coarse"].names
    texts = trec_sample["test"]["text"][:3]
    expected = [coarse_names[i] for i in _direct_predictions(trainer, "coarse", [{"text": t} for t in texts])]
    pixels = np.asarray(uci_digits["test"][5]["pixel_values"], dtype=np.float32)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    image.save(tmp_path / "digit.png")
    digit = int(_direct_predictions(trainer, "handwritten", [{"pixel_values": image}])[0])

    home = tmp_path / "hf_home"
    snapshot = home / "hub" / "models--me--tiny-mtl" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (home / "hub" / "models--me--tiny-mtl" / "refs").mkdir()
    (home / "hub" / "models--me--tiny-mtl" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

    def predict(*args: str) -> list[dict]:
        result = subprocess.run([str(HF_MTL), "predict", *args], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    lines = predict(str(folder), "--task", "coarse", *texts)
    assert [line["input"] for line in lines] == texts
    assert [set(line["predictions"]) for line in lines] == [{"coarse"}] * 3
    assert [line["predictions"]["coarse"]["label"] for line in lines] == expected
    # by repo id from the cache; no task: each input's modality picks its tasks (texts -> coarse, the image file ->
    # handwritten)
    lines = predict("me/tiny-mtl", *texts, str(tmp_path / "digit.png"))
    assert [set(line["predictions"]) for line in lines] == [{"coarse"}] * 3 + [{"handwritten"}]
    assert [line["predictions"]["coarse"]["label"] for line in lines[:3]] == expected
    assert lines[3]["predictions"]["handwritten"]["label"] == digit


def test_pipeline_decodes_every_head_kind(tmp_path, trec_words):
    """Classification, multilabel, regression and token classification heads on one text encoder: the pipeline's
    labels and scores are the softmax / sigmoid / raw values of the model's logits on the collated input."""
    tasks = [
        Task("topic", encoder="text", label_names=["a", "b", "c"]),
        Task("tags", encoder="text", head="multilabel", label_names=["w", "x", "y", "z"]),
        Task("rating", encoder="text", head="regression"),
        Task("ner", encoder="text", head="token_classification", label_names=["O", "PER", "LOC"]),
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoders({"text": tiny_text_encoder(trec_words.vocab_size)}, tasks)
    model.save_pretrained(tmp_path / "model")  # no processors saved: the collator is given
    collator = TextCollator(trec_words)
    classify = MultiTaskPipeline(
        model=AutoModel.from_pretrained(tmp_path / "model"), collators={"text": collator}, device="cpu"
    )
    text = "Who wrote Hamlet ?"
    out = classify(text, threshold=0.45)
    assert set(out) == {"topic", "tags", "rating", "ner"}

    batch = collator([{"text": text}])
    with torch.no_grad():
        logits = classify.model({"x": batch}, tasks=[t.name for t in tasks]).logits
    topic = logits["topic"][0].softmax(-1)
    assert out["topic"] == {"label": "abc"[int(topic.argmax())], "score": pytest.approx(float(topic.max()))}
    ranked = classify(text, task="topic", top_k=2)["topic"]
    assert [entry["label"] for entry in ranked] == ["abc"[i] for i in topic.argsort(descending=True)[:2].tolist()]
    tags = logits["tags"][0].sigmoid()
    chosen = sorted(((score, name) for name, score in zip("wxyz", tags.tolist()) if score > 0.45), reverse=True)
    assert chosen and out["tags"] == [{"label": name, "score": pytest.approx(score)} for score, name in chosen]
    assert out["rating"] == pytest.approx(float(logits["rating"][0, 0]))
    tokens = trec_words.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    ner = logits["ner"][0].softmax(-1)
    expected = [
        {
            "index": i,
            "token": tokens[i],
            "label": ["O", "PER", "LOC"][int(ner[i].argmax())],
            "score": pytest.approx(float(ner[i].max())),
        }
        for i in range(len(tokens))
        if tokens[i] not in ("[CLS]", "[SEP]")
    ]
    assert out["ner"] == expected and [entry["token"] for entry in out["ner"]] == ["who", "wrote", "[UNK]", "?"]

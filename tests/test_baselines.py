"""Single-task baselines and Δm in the loop: `hf-mtl baseline` then `hf-mtl train` reports eval_delta_m equal
to Δm computed by hand from the two result files; `metric_for_best_model="delta_m"` keeps the checkpoint with
the lowest Δm; the directions come from the metrics; bad settings fail before training."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task, cli
from hf_mtl.baselines import baseline_delta_m, metric_directions
from hf_mtl.metrics import load_metric

from .conftest import tiny_text_encoder
from .fake_hub import tiny_recipe, word_tokenizer, write_vocab


@pytest.fixture(scope="module")
def trec_words(tmp_path_factory, trec_sample):
    """A BERT tokenizer whose vocabulary is the frequent words of the TREC training questions."""
    return word_tokenizer(write_vocab(tmp_path_factory.mktemp("words"), trec_sample["train"]["text"]))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from hf_mtl.data import load_trec

    return write_vocab(tmp_path_factory.mktemp("vocab"), load_trec()["train"]["text"])


def test_baseline_then_train_reports_delta_m_of_the_two_result_files(tmp_path, vocab, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml", vocab, tasks=("coarse", "handwritten"), output_dir=str(run), mtl_method="pcgrad"
    )
    assert cli.main(["baseline", str(recipe)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run-baselines"
    assert f"baselines saved to {folder / 'baselines.json'}" in out
    stored = json.loads((folder / "baselines.json").read_text())
    assert stored["method"] == "ew" and set(stored["tasks"]) == {"coarse", "handwritten"}
    for task in ("coarse", "handwritten"):  # each baseline is a saved single-task run; the file holds its results
        single = json.loads((folder / task / "eval_results.json").read_text())
        assert stored["tasks"][task] == {m: single[f"eval_{task}_{m}"] for m in ("accuracy", "f1")}
        single_recipe = yaml.safe_load((folder / task / "recipe.yaml").read_text())
        assert [t["name"] for t in single_recipe["tasks"]] == [task]
        assert single_recipe["training"]["mtl_method"] == "ew" and single_recipe["training"]["max_steps"] == 4
        assert list(MultiTaskModel.from_pretrained(folder / task).tasks) == [task]
    assert not run.exists()  # the baselines live beside the run's folder, which stays free for `train`

    assert cli.main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "eval_results.json").read_text())
    by_hand = 0.0
    for task, metrics in stored["tasks"].items():
        for metric, base in metrics.items():  # accuracy and F1: higher is better, so the sign is flipped
            by_hand -= (results[f"eval_{task}_{metric}"] - base) / abs(base)
    by_hand *= 100.0 / 4
    assert results["eval_delta_m"] == pytest.approx(by_hand, rel=1e-12, abs=1e-12)
    assert f"delta-m against the single-task baselines in {folder / 'baselines.json'}: {by_hand:+.2f}%" in out
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["mtl_baselines"] == str(
        folder / "baselines.json"
    )
    assert json.loads((run / "baselines.json").read_text()) == stored  # the run folder carries its baselines
    card = (run / "README.md").read_text()
    assert f"**Δm = {by_hand:+.2f}%**" in card
    base = stored["tasks"]["coarse"]["accuracy"]
    assert f"| coarse | accuracy | {results['eval_coarse_accuracy']:.4f} | {base:.4f} |" in card
    assert ModelCard(card).data.library_name == "hf_mtl"

    # a second `hf-mtl baseline` keeps what is there
    assert cli.main(["baseline", str(recipe)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


@pytest.fixture()
def text_trainer(tmp_path, trec_sample, trec_words):
    def make(baselines: dict | None = None, **overrides):
        path = None
        if baselines is not None:
            path = tmp_path / "baselines.json"
            path.write_text(json.dumps({"tasks": baselines}))
        tasks = [Task("coarse", encoder="text", num_labels=6), Task("fine", encoder="text", num_labels=50)]
        options = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=12,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=5e-3,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            dataloader_pin_memory=False,
            mtl_baselines=str(path) if path else None,
        )
        options.update(overrides)
        evaluation = trec_sample["test"].select(range(96))
        return MultiTaskTrainer(
            model=MultiTaskModel.from_encoders({"text": tiny_text_encoder(trec_words.vocab_size)}, tasks),
            args=MultiTaskTrainingArguments(**options),
            train_dataset={"coarse": trec_sample["train"], "fine": trec_sample["train"]},
            eval_dataset={"coarse": evaluation, "fine": evaluation},
            processing_class={"text": trec_words},
        )

    return make


BASELINES = {"coarse": {"accuracy": 0.6, "f1": 0.4}, "fine": {"accuracy": 0.3, "f1": 0.05}}


def test_load_best_model_at_end_keeps_the_checkpoint_with_the_lowest_delta_m(text_trainer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # files an earlier run left: they do not describe the model this run saves
    (out / "recipe.yaml").write_text("name: an earlier run\n")
    (out / "eval_results.json").write_text(json.dumps({"eval_coarse_accuracy": 0.99}))
    trainer = text_trainer(
        BASELINES,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="delta_m",
        overwrite_output_dir=True,
    )
    assert trainer.args.greater_is_better is False  # TrainingArguments alone would say True for a non-"loss" name
    trainer.train()
    evaluations = [
        (entry["step"], entry["eval_delta_m"]) for entry in trainer.state.log_history if "eval_delta_m" in entry
    ]
    assert [step for step, _ in evaluations] == [2, 4, 6, 8, 10, 12]
    best_step, best = min(evaluations, key=lambda item: item[1])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.state.best_metric == pytest.approx(best)
    trainer.save_model()  # the best weights were loaded after the last evaluation: no results are claimed for them
    assert not (out / "eval_results.json").exists() and not (out / "recipe.yaml").exists()
    assert "No evaluation recorded." in (out / "README.md").read_text()
    assert trainer.evaluate()["eval_delta_m"] == pytest.approx(best, abs=1e-9)  # the best model was reloaded
    trainer.save_model()
    assert json.loads((out / "eval_results.json").read_text())["eval_delta_m"] == pytest.approx(best, abs=1e-9)
    assert f"**Δm = {best:+.2f}%**" in (out / "README.md").read_text()
    for step, value in evaluations:  # every reported Δm is the formula on that evaluation's metrics
        metrics = next(e for e in trainer.state.log_history if e.get("step") == step and "eval_delta_m" in e)
        by_hand = (
            -sum(
                (metrics[f"eval_{task}_{metric}"] - base) / base
                for task, values in BASELINES.items()
                for metric, base in values.items()
            )
            * 100.0
            / 4
        )
        assert value == pytest.approx(by_hand)


def test_delta_m_directions_come_from_the_metrics():
    """MSE is lower-is-better, accuracy higher-is-better: halving the error and losing 10% accuracy cancel out."""
    modules = {"rating": {"mse": load_metric("mse")}, "topic": {"accuracy": load_metric("accuracy")}}
    baselines = {"rating": {"mse": 1.0}, "topic": {"accuracy": 0.5}}
    directions = metric_directions(baselines, modules, ["rating", "topic"])
    assert directions == {"rating": {"mse": False}, "topic": {"accuracy": True}}
    metrics = {"eval_rating_mse": 0.5, "eval_topic_accuracy": 0.25}
    # 100 / 2 * ((0.5 - 1) / 1 - (0.25 - 0.5) / 0.5) = 50 * (-0.5 + 0.5)
    assert baseline_delta_m(metrics, baselines, directions) == pytest.approx(0.0)
    assert baseline_delta_m(
        {"eval_rating_mse": 0.5, "eval_topic_accuracy": 0.5}, baselines, directions
    ) == pytest.approx(-25.0)
    assert math.isnan(
        baseline_delta_m({"eval_rating_mse": math.nan, "eval_topic_accuracy": 0.5}, baselines, directions)
    )

    unknown = load_metric("accuracy")
    unknown.greater_is_better = None
    with pytest.raises(ValueError, match="does not say whether higher is better"):
        metric_directions({"topic": {"accuracy": 0.5}}, {"topic": {"accuracy": unknown}}, ["topic"])
    with pytest.raises(ValueError, match="'recall' of task 'topic' is not one of the task's metrics"):
        metric_directions({"topic": {"recall": 0.5}}, modules, ["topic"])


def test_bad_baseline_settings_fail_before_training(tmp_path, text_trainer):
    with pytest.raises(ValueError, match="needs `mtl_baselines`"):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), metric_for_best_model="delta_m")
    (tmp_path / "baselines.json").write_text(json.dumps({"tasks": BASELINES}))
    with pytest.raises(ValueError, match="would keep the worst checkpoint"):
        MultiTaskTrainingArguments(
            output_dir=str(tmp_path),
            metric_for_best_model="delta_m",
            greater_is_better=True,
            mtl_baselines=str(tmp_path),
        )
    with pytest.raises(ValueError, match="does not exist; `hf-mtl baseline RECIPE` writes it"):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), mtl_baselines=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": {"coarse": {"accuracy": "high"}}}))
    with pytest.raises(ValueError, match="coarse.accuracy .* must be a number"):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), mtl_baselines=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no single-task result for task 'fine'"):
        text_trainer({"coarse": BASELINES["coarse"]})

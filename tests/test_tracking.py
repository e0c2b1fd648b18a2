"""Tracking and the shell: TensorBoard receives the per-task scalars (read back from the event files), evaluation
shows the Trainer's progress bar unless `disable_tqdm`, and recipes name callbacks (early stopping) with errors
that name the section and the valid choices."""

from __future__ import annotations

import glob

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task, cli, recipes

from .conftest import tiny_text_encoder, tiny_vision_encoder
from .fake_hub import tiny_recipe, word_tokenizer, write_vocab


@pytest.fixture(scope="module")
def trec_words(tmp_path_factory, trec_sample):
    """A BERT tokenizer whose vocabulary is the frequent words of the TREC training questions."""
    return word_tokenizer(write_vocab(tmp_path_factory.mktemp("words"), trec_sample["train"]["text"]))


@pytest.fixture()
def build(tmp_path, trec_sample, uci_digits, trec_words):
    def make(**overrides):
        tasks = [
            Task("coarse", encoder="text", num_labels=6),
            Task("fine", encoder="text", num_labels=50),
            Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
        ]
        encoders = {"text": tiny_text_encoder(trec_words.vocab_size), "vision": tiny_vision_encoder()}
        options = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=4,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=64,
            learning_rate=3e-3,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            dataloader_pin_memory=False,
        )
        options.update(overrides)
        questions = trec_sample["test"].select(range(96))
        return MultiTaskTrainer(
            model=MultiTaskModel.from_encoders(encoders, tasks),
            args=MultiTaskTrainingArguments(**options),
            train_dataset={
                "coarse": trec_sample["train"],
                "fine": trec_sample["train"],
                "handwritten": uci_digits["train"],
            },
            eval_dataset={"coarse": questions, "fine": questions, "handwritten": uci_digits["test"].select(range(70))},
            processing_class={"text": trec_words},
        )

    return make


def test_tensorboard_receives_the_per_task_scalars(build, tmp_path):
    trainer = build(report_to=["tensorboard"], logging_steps=2, eval_strategy="steps", eval_steps=4)
    trainer.train()
    (events,) = glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for task in ("coarse", "fine", "handwritten"):  # the Trainer's TensorBoardCallback: train/<key>, eval/<key>
        assert {f"train/loss/{task}", f"train/weight/{task}", f"eval/{task}_accuracy", f"eval/{task}_loss"} <= tags
    logged = [entry for entry in trainer.state.log_history if "loss/coarse" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for key in ("loss/coarse", "loss/fine", "loss/handwritten", "weight/fine"):
        scalars = accumulator.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [2, 4]
        assert [s.value for s in scalars] == pytest.approx([entry[key] for entry in logged], rel=1e-6)
    (evaluation,) = [entry for entry in trainer.state.log_history if "eval_coarse_accuracy" in entry]
    (accuracy,) = accumulator.Scalars("eval/coarse_accuracy")
    assert accuracy.step == 4 and accuracy.value == pytest.approx(evaluation["eval_coarse_accuracy"], rel=1e-6)


def test_evaluation_shows_a_progress_bar_unless_disable_tqdm(build, capfd):
    build(disable_tqdm=False).evaluate()
    bar = capfd.readouterr().err
    # the text group (coarse + fine share the 96 questions) has 2 batches of 64, the vision group 2: 4 in all
    assert "4/4" in bar and "0/4" in bar
    build(disable_tqdm=True).evaluate()
    assert "/4 [" not in capfd.readouterr().err


def test_recipe_callbacks_stop_training_early(tmp_path):
    from hf_mtl.data import load_trec

    vocab = write_vocab(tmp_path, load_trec()["train"]["text"])
    path = tiny_recipe(
        tmp_path / "tiny.yaml",
        vocab,
        tasks=("coarse",),
        output_dir=str(tmp_path / "run"),
        max_steps=10,
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="loss",
    )
    text = path.read_text() + (
        "callbacks:\n  - {class: EarlyStoppingCallback, early_stopping_patience: 2, early_stopping_threshold: 100.0}\n"
    )
    path.write_text(text)
    recipe = recipes.Recipe.from_yaml(path)
    assert recipe.callbacks == [
        {"class": "EarlyStoppingCallback", "early_stopping_patience": 2, "early_stopping_threshold": 100.0}
    ]
    trainer = recipes.build_trainer(recipe)
    trainer.train()
    # no evaluation improves the loss by 100: the counter reaches the patience at the third evaluation
    assert trainer.state.global_step == 3
    assert "callbacks:" in recipe.to_yaml()


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (
            "[{class: EarlyStopingCallback}]",
            "callbacks[0].class: unknown callback 'EarlyStopingCallback'; expected one of the transformers callbacks (DefaultFlowCallback, EarlyStoppingCallback,",
        ),
        (
            "[{class: EarlyStoppingCallback, patience: 2}]",
            "callbacks[0] (EarlyStoppingCallback): got an unexpected keyword argument 'patience'; its options are: early_stopping_patience, early_stopping_threshold",
        ),
        (
            "[{class: collections.OrderedDict}]",
            "callbacks[0].class: 'collections.OrderedDict' is not a transformers.TrainerCallback subclass",
        ),
        ("[{class: no_such_module.Callback}]", "callbacks[0].class: cannot import 'no_such_module.Callback'"),
        ("{class: EarlyStoppingCallback}", "recipe: `callbacks` must be a list"),
    ],
)
def test_bad_callbacks_are_refused_naming_the_section(tmp_path, capsys, callbacks, message):
    path = tmp_path / "r.yaml"
    path.write_text(
        "encoders: {vision: {config: {model_type: vit, image_size: 8, patch_size: 2, num_channels: 1}}}\n"
        "data: {d: {loader: digits}}\n"
        "tasks: [{name: handwritten, encoder: vision, data: d, label_column: label}]\n"
        f"callbacks: {callbacks}\n"
    )
    assert cli.main(["check", str(path)]) == 2
    assert message in capsys.readouterr().err

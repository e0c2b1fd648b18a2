"""Heads are whole units: each kind owns its loss, default metrics, label collation and checks, string-label
encoding, metric inputs and decoding. A head kind registered in this file (an ordinal-regression head, CORAL)
works in `Task`, `MultiTaskModel` (save and reload), the trainer's training and evaluation, recipes and
``hf-mtl list`` without any edit elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from torch import Tensor, nn

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.cli import main as hf_mtl_main
from hf_mtl.metrics import compute_task_metrics
from hf_mtl.modeling.heads import HEADS, IGNORE_INDEX, TaskHead
from hf_mtl.recipes import Recipe, build_trainer

from .conftest import no_dropout, tiny_vision_encoder

LEVELS = ["low", "mid", "high"]  # digits 0-3, 4-6, 7-9


class OrdinalHead(TaskHead):
    """CORAL ordinal regression (Cao, Mirjalili & Raschka, 2020): one weight vector and K - 1 thresholds give the
    logits of ``y > k`` for k = 0 .. K-2; the loss is their mean binary cross-entropy, the prediction the number of
    positive logits. Labels are ranks or the names in ``label_names`` (their order is the ranks' order)."""

    default_metrics = ("accuracy", "mae")
    default_num_labels = 3

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__(hidden_size, 1, dropout, pooling)
        self.num_labels = num_labels
        self.thresholds = nn.Parameter(torch.zeros(num_labels - 1))

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None) -> Tensor:
        return super().forward(hidden_states, mask) + self.thresholds

    def _rank(self, value):
        if value is None:
            return IGNORE_INDEX
        if isinstance(value, str):
            if value not in (self.label_names or []):
                raise ValueError(f"rank {value!r} is not one of the `label_names`: {self.label_names}")
            return self.label_names.index(value)
        return int(value)

    def collate_labels(self, values):
        return torch.tensor([self._rank(v) for v in values], dtype=torch.long)

    def check_labels(self, values):
        for value in values:
            try:
                rank = self._rank(value)
            except ValueError as error:
                return str(error)
            if rank != IGNORE_INDEX and not 0 <= rank < self.num_labels:
                return f"rank {value!r} is outside [0, {self.num_labels - 1}]"
        return None

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        present = labels != IGNORE_INDEX
        if not present.any():
            return logits.sum() * 0.0
        targets = (labels[present, None] > torch.arange(self.num_labels - 1, device=labels.device)).float()
        return F.binary_cross_entropy_with_logits(logits[present].float(), targets)

    def predictions(self, logits: Tensor) -> Tensor:
        return (logits > 0).sum(dim=-1)

    @classmethod
    def metric_inputs(cls, predictions, references):
        present = references != IGNORE_INDEX
        return predictions[present], references[present]

    def decode(self, logits, label_names=None, **kwargs):
        names = label_names or self.label_names
        return [names[int(rank)] if names else int(rank) for rank in self.predictions(logits)]


@pytest.fixture()
def ordinal():
    """Registers the ordinal head for one test (and removes it again, so the other tests see the built-in kinds)."""
    HEADS.register("ordinal")(OrdinalHead)
    yield OrdinalHead
    HEADS._entries.pop("ordinal")


def _ordinal_data(uci_digits, split: str, rows: int) -> Dataset:
    """UCI digits with a string label: the level of the digit ("low" 0-3, "mid" 4-6, "high" 7-9)."""
    data = uci_digits[split].select(range(rows))
    return data.map(lambda row: {"level": LEVELS[0 if row["label"] < 4 else 1 if row["label"] < 7 else 2]})


def test_a_registered_head_works_in_tasks_the_model_the_trainer_and_list(ordinal, uci_digits, tmp_path, capsys):
    task = Task("level", encoder="vision", head="ordinal", label_names=LEVELS)
    assert task.metrics == ["accuracy", "mae"] and task.num_labels == 3  # the head's defaults
    assert Task("rank", encoder="vision", head="ordinal").num_labels == 3
    model = MultiTaskModel.from_encoders({"vision": no_dropout(tiny_vision_encoder())}, [task], head_dropout=0.0)
    assert isinstance(model.heads["level"], OrdinalHead) and model.heads["level"].label_names == LEVELS

    train, evaluation = _ordinal_data(uci_digits, "train", 64), _ordinal_data(uci_digits, "test", 40)
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = MultiTaskTrainer(
        model=model, args=args, train_dataset={"level": train}, eval_dataset={"level": evaluation}
    )
    before = model.heads["level"].thresholds.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.heads["level"].thresholds)  # the head trained, its thresholds too
    metrics = trainer.evaluate()

    # the same numbers by hand: the model's ranks against the levels, accuracy and mean absolute error
    model.eval()
    images = torch.tensor(np.asarray(evaluation["pixel_values"], dtype=np.float32))[:, None]
    with torch.no_grad():
        logits = model(task="level", pixel_values=images).logits["level"]
    ranks = (logits > 0).sum(-1).numpy()
    truth = np.array([LEVELS.index(level) for level in evaluation["level"]])
    assert metrics["eval_level_accuracy"] == pytest.approx(float((ranks == truth).mean()))
    assert metrics["eval_level_mae"] == pytest.approx(float(np.abs(ranks - truth).mean()))
    assert model.heads["level"].decode(logits[:3]) == [LEVELS[r] for r in ranks[:3]]

    model.save_pretrained(tmp_path / "saved")  # the config names the head kind; reloading builds it again
    reloaded = MultiTaskModel.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(reloaded.heads["level"], OrdinalHead) and reloaded.tasks["level"].label_names == LEVELS
    with torch.no_grad():
        torch.testing.assert_close(reloaded(task="level", pixel_values=images).logits["level"], logits)

    bad = evaluation.map(lambda row, i: {"level": "huge" if i == 5 else row["level"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"task 'level': rank 'huge' is not one of the `label_names`"):
        MultiTaskTrainer(model=model, args=args, train_dataset={"level": bad})

    assert hf_mtl_main(["list"]) == 0
    heads_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("heads:"))
    assert heads_line == "heads: classification, multilabel, ordinal, regression, token_classification"


def test_a_registered_head_works_in_a_recipe(ordinal, uci_digits, tmp_path):
    folder = tmp_path / "levels"
    DatasetDict(
        {"train": _ordinal_data(uci_digits, "train", 32), "test": _ordinal_data(uci_digits, "test", 16)}
    ).save_to_disk(folder)
    recipe = {
        "encoders": {
            "vision": {
                "config": {
                    "model_type": "vit",
                    "image_size": 8,
                    "patch_size": 2,
                    "num_channels": 1,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                }
            }
        },
        "data": {"levels": {"path": str(folder)}},
        "tasks": [{"name": "level", "encoder": "vision", "data": "levels", "head": "ordinal", "label_names": LEVELS}],
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "save_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trainer = build_trainer(Recipe.from_yaml(path))
    assert isinstance(trainer.model.heads["level"], OrdinalHead)
    trainer.train()
    metrics = trainer.evaluate()
    assert set(metrics) >= {"eval_level_accuracy", "eval_level_mae", "eval_level_loss"}
    assert 0.0 <= metrics["eval_level_accuracy"] <= 1.0 and 0.0 <= metrics["eval_level_mae"] <= 2.0


# ---------------------------------------------------------------------------------------------- built-in units
def _head(kind: str, num_labels: int, label_names=None) -> TaskHead:
    head = HEADS.build(kind, hidden_size=4, num_labels=num_labels, dropout=0.0)
    head.label_names = label_names
    return head


def test_class_names_are_encoded_with_label_names_and_unknown_ones_are_named():
    head = _head("classification", 3, ["HUM", "LOC", "NUM"])
    assert head.collate_labels(["LOC", "NUM", None, 0, -100]).tolist() == [1, 2, -100, 0, -100]
    assert head.check_labels(["HUM", "LOC", 2]) is None
    assert head.check_labels(["LOC", "LOX"]) == "label 'LOX' is not one of the `label_names`: HUM, LOC, NUM"
    assert "is outside [0, 2]" in head.check_labels([3])
    assert "not a whole number" in head.check_labels([1.5])
    assert head.check_labels([[1]]) == "label [1] is not a class id (an integer) or a class name (a string)"
    unnamed = _head("classification", 3)
    assert "the task has no `label_names`" in unnamed.check_labels(["LOC"])
    assert head.label_names_from_values(["LOC", None, "HUM", "LOC"]) == ["HUM", "LOC"]
    assert head.label_names_from_values([0, 1]) is None
    assert head.label_names_from_feature(ClassLabel(names=["a", "b"])) == ["a", "b"]
    assert head.majority_accuracy(["LOC", "HUM", "LOC", None]) == pytest.approx(2 / 3)

    tokens = _head("token_classification", 3, ["O", "B", "I"])
    assert tokens.collate_labels([["B", "I"], ["O"]]).tolist() == [[1, 2], [0, -100]]
    assert tokens.check_labels([["B", "X"]]) == "label 'X' is not one of the `label_names`: O, B, I"
    assert tokens.label_names_from_values([["O", "B"], ["I"]]) == ["B", "I", "O"]
    assert tokens.label_names_from_feature(List(ClassLabel(names=["O", "B"]))) == ["O", "B"]

    multilabel = _head("multilabel", 3, ["news", "sport", "tech"])
    assert multilabel.collate_labels([["sport", "tech"], [], [1, None, 0]]).tolist() == [
        [0.0, 1.0, 1.0],
        [0.0, 0.0, 0.0],
        [1.0, -100.0, 0.0],
    ]
    assert (
        multilabel.check_labels([["sport", "art"]]) == "label 'art' is not one of the `label_names`: news, sport, tech"
    )
    assert multilabel.label_names_from_values([["b", "a"], None, ["c"]]) == ["a", "b", "c"]

    regression = _head("regression", 1)
    assert regression.check_labels(["tall"]) == "regression target 'tall' is not a number"
    assert regression.label_names_from_values(["1.5"]) is None


def test_decode_gives_label_names_and_scores():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5]])
    probabilities = logits.softmax(-1)
    head = _head("classification", 3, ["a", "b", "c"])
    decoded = head.decode(logits)
    assert [d["label"] for d in decoded] == ["a", "b"]
    assert decoded[0]["score"] == pytest.approx(probabilities[0, 0].item())
    top2 = head.decode(logits, top_k=2)
    assert [[d["label"] for d in row] for row in top2] == [["a", "b"], ["b", "c"]]
    assert [d["label"] for d in _head("classification", 3).decode(logits)] == [0, 1]  # no names: the ids
    assert [d["label"] for d in head.decode(logits, label_names=["x", "y", "z"])] == ["x", "y"]

    multilabel = _head("multilabel", 3, ["news", "sport", "tech"]).decode(torch.tensor([[1.0, -2.0, 3.0], [-1.0] * 3]))
    assert [[d["label"] for d in row] for row in multilabel] == [["tech", "news"], []]
    assert multilabel[0][0]["score"] == pytest.approx(1 / (1 + math.exp(-3.0)))

    assert _head("regression", 1).decode(torch.tensor([[0.5], [-2.0]])) == [0.5, -2.0]
    assert _head("regression", 2, ["height", "weight"]).decode(torch.tensor([[1.0, 2.0]])) == [
        {"height": 1.0, "weight": 2.0}
    ]

    tokens = _head("token_classification", 2, ["O", "B"]).decode(
        torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 0.0]]]), mask=torch.tensor([[1, 1, 0]])
    )
    assert [d["label"] for d in tokens[0]] == ["O", "B"]


def test_metrics_follow_the_head_kind(ordinal):
    # a registered kind is scored with its own metric inputs: ranks against ranks, -100 left out
    result = compute_task_metrics("ordinal", np.array([0, 2, 1, 2]), np.array([0, 1, -100, 2]), ["accuracy", "mae"])
    assert result == {"accuracy": pytest.approx(2 / 3), "mae": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match=r"unknown `head_kind` 'segmentation'; valid head kinds are: classification"):
        compute_task_metrics("segmentation", [0], [0], ["accuracy"])


def test_string_labels_from_a_recipe_become_label_names_in_the_saved_config(tmp_path, uci_digits):
    features = Features({"pixel_values": List(List(Value("float32"))), "level": Value("string")})
    train = _ordinal_data(uci_digits, "train", 24).select_columns(["pixel_values", "level"]).cast(features)
    test = _ordinal_data(uci_digits, "test", 12).select_columns(["pixel_values", "level"]).cast(features)
    DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "levels")
    recipe = {
        "encoders": {
            "vision": {
                "config": {
                    "model_type": "vit",
                    "image_size": 8,
                    "patch_size": 4,
                    "num_channels": 1,
                    "hidden_size": 16,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                }
            }
        },
        "data": {"levels": {"path": str(tmp_path / "levels")}},
        "tasks": [{"name": "level", "encoder": "vision", "data": "levels"}],
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 1,
            "report_to": [],
            "save_strategy": "no",
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
            "per_device_train_batch_size": 8,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trainer = build_trainer(Recipe.from_yaml(path))
    task = trainer.model.tasks["level"]
    assert task.label_names == ["high", "low", "mid"] and task.num_labels == 3  # sorted, as class_encode_column
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = MultiTaskModel.from_pretrained(tmp_path / "saved")
    assert saved.config.tasks[0]["label_names"] == ["high", "low", "mid"]
    assert saved.heads["level"].decode(torch.tensor([[0.0, 5.0, 0.0]]))[0]["label"] == "low"
    # labels the recipe gives are checked against the data, naming the task, the value and the valid names
    recipe["tasks"][0]["label_names"] = ["low", "mid"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"task 'level': label 'high' is not one of the `label_names`: low, mid"):
        build_trainer(Recipe.from_yaml(path))
    recipe["tasks"][0].pop("label_names")
    recipe["tasks"][0]["num_labels"] = 4
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        ValueError, match=r"task 'level': the label column 'level' of data 'levels' holds 3 class names"
    ):
        build_trainer(Recipe.from_yaml(path))

"""`MultiTaskModel`, `MultiTaskConfig` and the task heads on real inputs (TREC questions, UCI digits, FSDD
clips) and tiny encoders built from configs: save/load round trips, partial labels masked exactly as a loss
computed by hand, which parameters each task reaches, local checkpoints, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_mtl import MultiTaskConfig, MultiTaskModel, Task
from hf_mtl.data import SpeechCollator, TextCollator, VisionCollator
from hf_mtl.modeling import list_heads

from .conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder

TREC_COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TRUNK = {"hidden_size": 24, "num_layers": 2}
ROWS = 6


def make_tasks() -> list[Task]:
    """Every head kind, on all three modalities; two tasks per encoder."""
    return [
        Task("coarse", encoder="text", num_labels=6, label_names=TREC_COARSE),
        Task("tokens", encoder="text", head="token_classification", num_labels=3),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
        Task("shape", encoder="vision", head="multilabel", num_labels=3),
        Task("digit", encoder="speech", num_labels=10, label_names=[str(d) for d in range(10)]),
        Task("loudness", encoder="speech", head="regression", num_labels=2),
    ]


def make_model(vocab_size: int, trunk=None, seed: int = 0) -> MultiTaskModel:
    encoders = {
        "text": tiny_text_encoder(vocab_size, seed=seed),
        "vision": tiny_vision_encoder(seed=seed),
        "speech": tiny_speech_encoder(seed=seed),
    }
    torch.manual_seed(seed)
    return MultiTaskModel.from_encoders(encoders, make_tasks(), trunk=trunk)


@pytest.fixture(scope="module")
def real_batch(trec_sample, uci_digits, fsdd_sample, trec_tokenizer):
    """One multi-task batch of real rows; the tasks of one encoder share a sub-batch. Labels are the data
    sets' own (coarse, handwritten, digit) or derived from the rows (token parity, digit shape, loudness),
    with some of them missing."""
    model = make_model(trec_tokenizer.vocab_size)
    text_rows = [trec_sample["test"][i] for i in range(ROWS)]
    image_rows = [uci_digits["test"][i] for i in range(ROWS)]
    clip_rows = [fsdd_sample["test"][i * 20] for i in range(ROWS)]

    text = TextCollator(trec_tokenizer, max_length=24)(text_rows)
    token_labels = []
    for row, mask in zip(text["input_ids"].tolist(), text["attention_mask"].tolist()):
        token_labels.append([token % 3 if keep else -100 for token, keep in zip(row, mask)])
    text["labels"] = {
        "coarse": model.heads["coarse"].collate_labels([r["coarse"] for r in text_rows[:-1]] + [None]),
        "tokens": model.heads["tokens"].collate_labels(token_labels),
    }
    images = VisionCollator()(image_rows)
    shapes = [
        [int(r["label"] % 2 == 0), int(r["label"] > 4), None if r["label"] == 0 else int(r["label"] in (0, 6, 8, 9))]
        for r in image_rows
    ]
    shapes[1] = None  # a row with no labels at all
    images["labels"] = {
        "handwritten": model.heads["handwritten"].collate_labels([r["label"] for r in image_rows]),
        "shape": model.heads["shape"].collate_labels(shapes),
    }
    clips = SpeechCollator(max_length_seconds=1.0)(clip_rows)
    loudness = [
        [float(np.sqrt(np.mean(np.square(r["audio"])))), float(len(r["audio"]) / r["sampling_rate"])] for r in clip_rows
    ]
    loudness[2] = [loudness[2][0], None]
    clips["labels"] = {
        "digit": model.heads["digit"].collate_labels(
            [r["digit"] for r in clip_rows[:2]] + [-1] + [r["digit"] for r in clip_rows[3:]]
        ),
        "loudness": model.heads["loudness"].collate_labels(loudness),
    }
    return {"coarse+tokens": text, "handwritten+shape": images, "digit+loudness": clips}


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("trunk", [None, TRUNK], ids=["no-trunk", "trunk"])
def test_save_and_reload_give_identical_predictions(tmp_path, trec_tokenizer, real_batch, trunk):
    model = make_model(trec_tokenizer.vocab_size, trunk=trunk).eval()
    with torch.no_grad():
        before = model(real_batch)
    assert sorted(before.logits) == sorted(t.name for t in make_tasks()) == sorted(before.losses)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]

    reloaded, info = MultiTaskModel.from_pretrained(tmp_path / "saved", output_loading_info=True)
    reloaded.eval()
    # the encoders built without a pooler (add_pooling_layer=False) come back without one
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.removed_modules == {"text": ["pooler"], "vision": ["pooler"]}
    assert list(reloaded.state_dict()) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        after = reloaded(real_batch)
    for task in before.logits:
        assert torch.equal(after.logits[task], before.logits[task]), task
        assert torch.equal(after.losses[task], before.losses[task]), task
    assert (reloaded.trunk is None) == (trunk is None)


def test_config_round_trips_tasks_and_label_names(tmp_path, trec_tokenizer):
    model = make_model(trec_tokenizer.vocab_size, trunk=TRUNK)
    model.config.head_dropout = 0.25
    model.save_pretrained(tmp_path)
    config = MultiTaskConfig.from_pretrained(tmp_path)
    assert config.model_type == "hf_mtl"
    assert config.tasks == [task.to_dict() for task in make_tasks()]
    assert config.trunk == TRUNK and config.head_dropout == 0.25
    assert {key: data["model_type"] for key, data in config.encoders.items()} == {
        "text": "bert",
        "vision": "vit",
        "speech": "wav2vec2",
    }
    reloaded = MultiTaskModel.from_pretrained(tmp_path)
    assert list(reloaded.tasks.values()) == make_tasks()
    assert reloaded.tasks["coarse"].label_names == TREC_COARSE
    assert reloaded.tasks["digit"].label_names == [str(d) for d in range(10)]
    assert reloaded.tasks["handwritten"].label_column == "label"
    assert {name: task.head for name, task in reloaded.tasks.items()} == {
        "coarse": "classification",
        "tokens": "token_classification",
        "handwritten": "classification",
        "shape": "multilabel",
        "digit": "classification",
        "loudness": "regression",
    }
    assert set(list_heads()) == {"classification", "multilabel", "regression", "token_classification"}
    assert reloaded.encoders["speech"].config.conv_dim == [16, 32, 32]


def test_from_encoders_keeps_a_local_checkpoint_s_weights(tmp_path, trec_tokenizer):
    encoder = tiny_text_encoder(trec_tokenizer.vocab_size, seed=3)
    encoder.save_pretrained(tmp_path / "text-encoder")
    tasks = [Task("coarse", encoder="text", num_labels=6)]
    for given in (str(tmp_path / "text-encoder"), tmp_path / "text-encoder"):
        model = MultiTaskModel.from_encoders({"text": given}, tasks)
        loaded = model.encoders["text"].state_dict()
        for name, tensor in encoder.state_dict().items():
            assert torch.equal(loaded[name], tensor), name
    with pytest.raises(ValueError, match=r"encoder 'text': '.*missing' is not a local checkpoint folder"):
        MultiTaskModel.from_encoders({"text": str(tmp_path / "missing")}, tasks)


def test_single_task_call_and_inference_without_labels(trec_tokenizer, real_batch):
    model = no_dropout(make_model(trec_tokenizer.vocab_size)).eval()
    text = {k: v for k, v in real_batch["coarse+tokens"].items() if k != "labels"}
    with torch.no_grad():
        whole = model(real_batch)
        single = model(task="coarse", labels=real_batch["coarse+tokens"]["labels"]["coarse"], **text)
        unlabelled = model({"questions": text}, tasks=["coarse"])
    assert list(single.logits) == ["coarse"] and list(unlabelled.logits) == ["coarse"] and not unlabelled.losses
    torch.testing.assert_close(single.logits["coarse"], whole.logits["coarse"])
    torch.testing.assert_close(unlabelled.logits["coarse"], whole.logits["coarse"])
    torch.testing.assert_close(single.losses["coarse"], whole.losses["coarse"])
    assert whole.loss == pytest.approx(torch.stack(list(whole.losses.values())).mean().item())
    images = {k: v for k, v in real_batch["handwritten+shape"].items() if k != "labels"}
    with torch.no_grad():
        by_key = model({"coarse": text, "handwritten+shape": images})
    assert sorted(by_key.logits) == ["coarse", "handwritten", "shape"] and not by_key.losses
    with pytest.raises(ValueError, match=r"sub-batch 'x' has no `labels` and its key names no task"):
        model({"x": text, "handwritten": images}, tasks=["coarse"])
    with pytest.raises(
        ValueError, match=r"`tasks` names unknown task\(s\) \['colour'\]; the model's tasks are: coarse, tokens"
    ):
        model({"coarse": text}, tasks=["colour"])


# ---------------------------------------------------------------------------------------------- partial labels
def _bce(logit: float, target: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def _cross_entropy(logits: list[float], label: int) -> float:
    return -(logits[label] - math.log(sum(math.exp(x) for x in logits)))


@pytest.fixture()
def heads(trec_tokenizer):
    return make_model(trec_tokenizer.vocab_size).heads


def test_multilabel_masks_missing_entries_and_rows(heads):
    head = heads["shape"]
    logits = torch.tensor([[0.3, -1.2, 2.0], [5.0, -5.0, 1.0], [-0.7, 0.4, 0.1], [1.1, 0.2, -0.3]], requires_grad=True)
    rows = [[1, None, 0], [None, None, None], None, [0, 1, None]]
    labels = head.collate_labels(rows)
    assert head.check_labels(rows) is None
    loss = head.loss(logits, labels)
    present = [(0, 0, 1), (0, 2, 0), (3, 0, 0), (3, 1, 1)]
    expected = sum(_bce(logits[r, c].item(), y) for r, c, y in present) / len(present)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[1:3]) == 0  # the unlabelled rows contribute nothing
    assert logits.grad[0, 1] == 0 and logits.grad[3, 2] == 0 and torch.count_nonzero(logits.grad[0]) == 2
    # NaN marks a missing entry in a label tensor too
    nan_labels = torch.tensor(
        [[1.0, float("nan"), 0.0], [float("nan")] * 3, [float("nan")] * 3, [0.0, 1.0, float("nan")]]
    )
    assert head.loss(logits, nan_labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("task", "values"),
    [
        ("shape", [None, [None, None, None]]),
        ("coarse", [None, -100, -1]),
        ("loudness", [None, [None, None], [float("nan"), None]]),
        ("tokens", [[-100, -100], None]),
    ],
)
def test_a_batch_without_labels_gives_zero_loss_with_a_graph(heads, task, values):
    head = heads[task]
    labels = head.collate_labels(values)
    hidden = torch.randn(len(values), 2, 32, requires_grad=True)
    loss = head.loss(head(hidden), labels)
    assert loss.item() == 0.0 and loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) == 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in head.parameters())


def test_an_unlabelled_sub_batch_gives_zero_task_losses_through_the_model(trec_tokenizer, real_batch):
    model = make_model(trec_tokenizer.vocab_size)
    images = dict(real_batch["handwritten+shape"])
    images["labels"] = {
        "handwritten": model.heads["handwritten"].collate_labels([None] * ROWS),
        "shape": model.heads["shape"].collate_labels([None] * ROWS),
    }
    outputs = model({"handwritten+shape": images})
    assert outputs.losses["handwritten"].item() == 0.0 and outputs.losses["shape"].item() == 0.0
    assert outputs.loss.item() == 0.0 and outputs.loss.grad_fn is not None
    outputs.loss.backward()
    for name in ("handwritten", "shape"):
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.heads[name].parameters())


def test_classification_ignores_missing_labels(heads):
    head = heads["coarse"]
    logits = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [2.0, -1.0, 0.5, 0.0, 0.3, 0.1],
            [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],
            [-0.5, 0.5, -0.5, 0.5, -0.5, 0.5],
        ],
        requires_grad=True,
    )
    values = [4, -100, None, -1, 1]
    labels = head.collate_labels(values)
    assert labels.tolist() == [4, -100, -100, -100, 1]
    assert head.check_labels(values) is None and "outside [0, 5]" in head.check_labels([6])
    expected = (_cross_entropy(logits[0].tolist(), 4) + _cross_entropy(logits[4].tolist(), 1)) / 2
    assert head.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # a label tensor straight from a ClassLabel column (-1 for missing) is read the same way
    assert head.loss(logits, torch.tensor([4, -1, -1, -100, 1])).item() == pytest.approx(expected, rel=1e-6)
    head.loss(logits, labels).backward()
    assert torch.count_nonzero(logits.grad[1:4]) == 0


def test_regression_masks_missing_targets(heads):
    head = heads["loudness"]
    predictions = torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.0, 0.0], [3.0, 3.0]], requires_grad=True)
    values = [[1.0, None], [float("nan"), 0.5], None, [2.0, 4.0]]
    assert head.check_labels(values) is None
    assert "expected num_labels=2" in head.check_labels([[1.0]])
    labels = head.collate_labels(values)
    present = [(0.5, 1.0), (-1.0, 0.5), (3.0, 2.0), (3.0, 4.0)]
    expected = sum((p - y) ** 2 for p, y in present) / len(present)
    assert head.loss(predictions, labels).item() == pytest.approx(expected, rel=1e-6)
    single = Task("score", encoder="text", head="regression")
    assert single.num_labels == 1  # one target unless told otherwise


def test_token_classification_masks_ignored_tokens(heads):
    head = heads["tokens"]
    logits = torch.tensor(
        [[[0.2, 0.1, -0.3], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[0.5, -0.5, 0.0], [0.3, 0.3, 0.9], [2.0, 1.0, 0.0]]],
        requires_grad=True,
    )
    labels = head.collate_labels([[2, -100, 1], [0, 2]])
    assert labels.tolist() == [[2, -100, 1], [0, 2, -100]]
    expected = (
        sum(_cross_entropy(logits[b, t].tolist(), y) for b, t, y in [(0, 0, 2), (0, 2, 1), (1, 0, 0), (1, 1, 2)]) / 4
    )
    assert head.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    head.loss(logits, labels).backward()
    assert torch.count_nonzero(logits.grad[0, 1]) == 0 and torch.count_nonzero(logits.grad[1, 2]) == 0


def test_multilabel_label_checks_name_the_problem(heads):
    assert heads["shape"].check_labels([[1, 0, 1], None, [None, 1, 0]]) is None
    assert "2 entries, expected num_labels=3" in heads["shape"].check_labels([[1, 0]])
    assert "entry 2 is not 0, 1 or None" in heads["shape"].check_labels([[1, 2, 0]])


# ---------------------------------------------------------------------------------------------- structure
def test_task_parameter_names_say_who_reaches_what(trec_tokenizer):
    model = make_model(trec_tokenizer.vocab_size, trunk=TRUNK)
    model.encoders["text"].embeddings.word_embeddings.weight.requires_grad_(False)
    reached = model.task_parameter_names()
    assert list(reached) == [t.name for t in make_tasks()]
    encoder_of = {t.name: t.encoder for t in make_tasks()}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted({n for names in reached.values() for n in names}) == sorted(trainable)
    for names in reached.values():
        assert names == [n for n in trainable if n in set(names)]  # named_parameters order
        assert "encoders.text.embeddings.word_embeddings.weight" not in names
        for parameter in trainable:
            readers = {task for task, params in reached.items() if parameter in params}
            if parameter.startswith("heads."):
                assert readers == {parameter.split(".")[1]}, parameter
            elif parameter.startswith("trunk.blocks."):
                assert readers == set(encoder_of), parameter
            else:  # an encoder or its trunk projection: the tasks of that encoder
                key = parameter.split(".")[2] if parameter.startswith("trunk.") else parameter.split(".")[1]
                assert readers == {t for t, e in encoder_of.items() if e == key}, parameter
    without = make_model(trec_tokenizer.vocab_size).task_parameter_names()
    assert not any(n.startswith("trunk.") for names in without.values() for n in names)
    shared = [n for n in without["digit"] if not n.startswith("heads.")]
    assert shared == [n for n in without["loudness"] if not n.startswith("heads.")]
    assert shared and all(n.startswith("encoders.speech.") for n in shared)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_field_and_the_valid_values(trec_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    text = tiny_text_encoder(trec_tokenizer.vocab_size)
    with pytest.raises(
        ValueError,
        match=r"task 'x': unknown `head` 'ranking'; valid heads are: classification, multilabel, regression, token_classification",
    ):
        Task("x", encoder="text", head="ranking")
    with pytest.raises(ValueError, match=r"task 'x' reads `encoder` 'audio', which is not one of the encoders: text"):
        MultiTaskModel.from_encoders({"text": text}, [Task("x", encoder="audio")])
    with pytest.raises(ValueError, match=r"task 'x' is defined twice in `tasks`"):
        MultiTaskModel.from_encoders(
            {"text": text}, [Task("x", encoder="text"), Task("x", encoder="text", num_labels=3)]
        )
    with pytest.raises(ValueError, match=r"task 'x': `label_names` has 2 names but `num_labels` is 3"):
        Task("x", encoder="text", num_labels=3, label_names=["a", "b"])
    with pytest.raises(
        ValueError, match=r"`encoders`: encoder 'text' must be a transformers PreTrainedModel or the path .*got Linear"
    ):
        MultiTaskModel.from_encoders({"text": nn.Linear(2, 2)}, [Task("x", encoder="text")])
    masked_lm = BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(
        ValueError, match=r"encoder 'text' \(BertForMaskedLM\) has weights .*pass the base encoder \(BertModel\)"
    ):
        MultiTaskModel.from_encoders({"text": masked_lm}, [Task("x", encoder="text")])
    with pytest.raises(
        ValueError, match=r"unknown task field\(s\) \['colour'\]; valid fields are: encoder, head, head_kwargs"
    ):
        Task.from_dict({"name": "x", "encoder": "text", "colour": "red"})
    with pytest.raises(
        ValueError,
        match=r"task 'x': unknown `head_kwargs` \['pool'\] for head 'classification'; valid keys are: pooling",
    ):
        Task("x", encoder="text", head_kwargs={"pool": "cls"})
    with pytest.raises(ValueError, match=r"task 'x': `num_labels` must be a positive integer, got 0"):
        Task("x", encoder="text", num_labels=0)
    with pytest.raises(ValueError, match=r"`name` of a task must start with a letter.*got '1st'"):
        Task("1st", encoder="text")
    with pytest.raises(
        ValueError, match=r"`trunk` has unknown key\(s\) \['width'\]; valid keys are: hidden_size, num_layers"
    ):
        MultiTaskModel.from_encoders({"text": text}, [Task("x", encoder="text")], trunk={"width": 8})
    with pytest.raises(ValueError, match=r"`tasks` is empty"):
        MultiTaskModel.from_encoders({"text": text}, [])
    with pytest.raises(ValueError, match=r"`pooling` must be 'mean' or 'cls', got 'max'"):
        MultiTaskModel.from_encoders({"text": text}, [Task("x", encoder="text", head_kwargs={"pooling": "max"})])

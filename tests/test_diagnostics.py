"""Gradient-conflict diagnostics: the measures against direct computations, per-sample gradients against
one-sample-at-a-time gradients, and the callback in a real training run (real FSDD and TREC data, tiny
encoders)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.callbacks import DIAGNOSTICS_FILE, GradientDiagnosticsCallback, per_sample_gradients, read_diagnostics
from hf_mtl.data import SpeechCollator, TextCollator
from hf_mtl.data.collators import collator_for
from hf_mtl.engine import parameter_blocks
from hf_mtl.metrics import (
    conflicting_parameter_ratio,
    gradient_conflict,
    inter_sample_conflict,
    inter_task_conflict_per_sample,
)

from .conftest import tiny_speech_encoder, tiny_text_encoder

# ------------------------------------------------------------------------------- the measures


def test_conflicting_parameter_ratio_counts_opposite_signs() -> None:
    # coordinates: (+,-) conflict, (-,-) agree, (0,+) no conflict (a zero conflicts with nothing), (+,-) conflict
    jacobian = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 2.0, -3.0], [2.0, 1.0, -1.0, 0.0]])
    ratio = conflicting_parameter_ratio(jacobian)
    expected = torch.tensor([[0.0, 2 / 4, 1 / 4], [2 / 4, 0.0, 3 / 4], [1 / 4, 3 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ratio, expected)
    result = gradient_conflict(jacobian)
    torch.testing.assert_close(result.conflicting_parameters, expected.float())
    assert result.summary()["conflict/conflicting_parameters_mean"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)


def test_conflicting_parameter_ratio_equals_a_direct_count_over_chunks(monkeypatch) -> None:
    import hf_mtl.metrics as metrics

    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(5, 1001, generator=generator)
    jacobian[jacobian.abs() < 0.3] = 0.0
    direct = torch.tensor(
        [[float(((jacobian[i] * jacobian[j]) < 0).sum()) / 1001 for j in range(5)] for i in range(5)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(conflicting_parameter_ratio(jacobian), direct)
    monkeypatch.setattr(metrics, "_SIGN_CHUNK", 7)  # many chunks, one ragged: the same counts
    torch.testing.assert_close(conflicting_parameter_ratio(jacobian), direct)
    with pytest.raises(ValueError, match=r"`jacobian` must have shape \(K, P\)"):
        conflicting_parameter_ratio(torch.ones(3))


def test_inter_sample_and_per_sample_inter_task_measures_are_the_pairwise_ones() -> None:
    generator = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 4, 50, generator=generator, dtype=torch.float64)  # (K tasks, n samples, P)
    grads[1] *= 10.0  # task 1's gradients are ten times larger
    within = inter_sample_conflict(grads)
    across = inter_task_conflict_per_sample(grads)
    assert len(within) == 3 and len(across) == 4
    for k in range(3):
        for s in range(4):
            for t in range(4):
                a, b = grads[k, s], grads[k, t]
                cosine = float(a @ b / (a.norm() * b.norm()))
                assert float(within[k].cosine[s, t]) == pytest.approx(cosine, abs=1e-12)
                mag = 2 * float(a.norm() * b.norm()) / float(a.norm() ** 2 + b.norm() ** 2)
                assert float(within[k].magnitude_similarity[s, t]) == pytest.approx(mag, abs=1e-12)
                assert float(within[k].conflicting_parameters[s, t]) == pytest.approx(
                    float((a * b < 0).double().mean())
                )
    for s in range(4):
        for i in range(3):
            for j in range(3):
                a, b = grads[i, s], grads[j, s]
                assert float(across[s].cosine[i, j]) == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
                mag = 2 * float(a.norm() * b.norm()) / float(a.norm() ** 2 + b.norm() ** 2)
                assert float(across[s].magnitude_similarity[i, j]) == pytest.approx(mag, abs=1e-12)
    # a ten-fold norm ratio: S_mag = 2 * 10 / 101 in expectation between task 1 and the others, ~1 within a task
    assert float(across[0].magnitude_similarity[0, 1]) < 0.3 < float(within[1].magnitude_similarity[0, 1])
    record = within[0].to_dict()
    assert set(record) == {"norms", "cosine", "magnitude_similarity", "conflicting_parameters", "conflict_fraction"}
    assert record["cosine"][1][2] == pytest.approx(float(within[0].cosine[1, 2]))
    with pytest.raises(ValueError, match=r"shape \(K, n, P\)"):
        inter_sample_conflict(torch.ones(2, 3))


# ------------------------------------------------------------------------------- per-sample gradients


@pytest.fixture()
def speech_text_model(trec_tokenizer):
    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=50),
    ]
    encoders = {"speech": tiny_speech_encoder(), "text": tiny_text_encoder(trec_tokenizer.vocab_size)}
    return MultiTaskModel.from_encoders(encoders, tasks)


def _collate(rows, collator, tasks):
    batch = collator(rows)
    batch["labels"] = {task: torch.tensor([row[task] for row in rows]) for task in tasks}
    return batch


def _one_at_a_time(model, key, rows, collator, tasks, params):
    """Each row collated alone and run alone; one torch.autograd.grad per task: (K, n, P)."""
    tensors = [p for _, p in params]
    out = torch.zeros(len(tasks), len(rows), sum(p.numel() for p in tensors))
    for s, row in enumerate(rows):
        output = model({key: _collate([row], collator, tasks)})
        for k, task in enumerate(tasks):
            grads = torch.autograd.grad(output.losses[task], tensors, retain_graph=True, allow_unused=True)
            out[k, s] = torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, tensors)]
            )
    return out


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_sample_gradients_equal_one_sample_at_a_time(
    mode, speech_text_model, fsdd_sample, trec_sample, trec_tokenizer
):
    model = speech_text_model.eval()
    blocks = {block.tasks: block for block in parameter_blocks(model)}
    cases = [
        ("digit+speaker", fsdd_sample["train"], SpeechCollator(max_length_seconds=1.0), ("digit", "speaker")),
        ("coarse+fine", trec_sample["train"], TextCollator(trec_tokenizer, max_length=32), ("coarse", "fine")),
    ]
    for key, data, collator, tasks in cases:
        rows = [data[i] for i in (3, 50, 7, 200, 11)]
        params = blocks[tasks].params
        probe = per_sample_gradients(model, key, _collate(rows, collator, tasks), tasks, params, mode=mode)
        per_sample, batch = probe.split([name for name, _ in params])
        expected = _one_at_a_time(model, key, rows, collator, tasks, params)
        scale = expected.abs().max()
        torch.testing.assert_close(per_sample, expected, atol=1e-5 * float(scale), rtol=1e-4)
        # the probe-level gradient is the gradient of the head's loss over the whole sub-batch: here (every
        # label present) the mean of the per-sample gradients
        torch.testing.assert_close(batch, expected.mean(1), atol=1e-5 * float(scale), rtol=1e-4)
        assert all(p.grad is None for _, p in params)  # nothing written to .grad
    with pytest.raises(ValueError, match="`mode` must be one of vmap, loop"):
        per_sample_gradients(model, "coarse+fine", {}, ["coarse"], [], mode="jit")


# ------------------------------------------------------------------------------- the callback in training


@pytest.fixture()
def make_trainer(tmp_path, fsdd_sample, trec_sample, trec_tokenizer):
    def make(output="out", speech_encoder=None, **overrides):
        tasks = [
            Task("digit", encoder="speech", num_labels=10),
            Task("speaker", encoder="speech", num_labels=6),
            Task("coarse", encoder="text", num_labels=6),
            Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
        ]
        speech = speech_encoder if speech_encoder is not None else tiny_speech_encoder()
        encoders = {"speech": speech, "text": tiny_text_encoder(trec_tokenizer.vocab_size)}
        model = MultiTaskModel.from_encoders(encoders, tasks)
        options = dict(
            output_dir=str(tmp_path / output),
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            logging_steps=3,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            dataloader_pin_memory=False,
            mtl_method="pcgrad",
        )
        options.update(overrides)
        train = {"digit": fsdd_sample["train"], "speaker": fsdd_sample["train"]}
        train.update({"coarse": trec_sample["train"], "fine": trec_sample["train"]})
        return MultiTaskTrainer(
            model=model,
            args=MultiTaskTrainingArguments(**options),
            train_dataset=train,
            processing_class={"text": trec_tokenizer},
            data_collator={"speech": SpeechCollator(max_length_seconds=1.0)},
        )

    return make


def test_diagnostics_are_off_by_default_and_do_not_change_training(make_trainer):
    plain = make_trainer("plain")
    assert not any(isinstance(cb, GradientDiagnosticsCallback) for cb in plain.callback_handler.callbacks)
    plain.train()
    assert not os.path.exists(os.path.join(plain.args.output_dir, DIAGNOSTICS_FILE))
    measured = make_trainer("measured", mtl_diagnostics_steps=3, mtl_diagnostics_samples=4)
    measured.train()

    def losses(trainer):
        return [
            {k: v for k, v in e.items() if k == "loss" or k.startswith("loss/")}
            for e in trainer.state.log_history
            if "loss" in e
        ]

    # the probe runs its own forwards (eval mode), so the run is bit for bit the same, training logs included
    assert losses(plain) == losses(measured) and len(losses(plain)) == 2
    for a, b in zip(plain.model.parameters(), measured.model.parameters()):
        assert torch.equal(a, b)
    records = read_diagnostics(measured.args.output_dir)
    assert [(r["step"], r["block"]) for r in records] == [
        (step, block) for step in (0, 3, 6) for block in ("digit+speaker", "coarse+fine")
    ]
    # trainer_state.json (with the diagnostics in its log history) is in the run folder at the end
    with open(os.path.join(measured.args.output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    assert [e["step"] for e in history if "diagnostics/seconds" in e] == [0, 3, 6]


def test_logged_measures_equal_gradients_computed_directly(make_trainer, fsdd_sample, trec_sample, trec_tokenizer):
    trainer = make_trainer(mtl_diagnostics_steps=100, mtl_diagnostics_samples=4, max_steps=1)
    initial = copy.deepcopy(trainer.model).eval()  # the weights of the step-0 measurement
    trainer.train()
    records = {r["block"]: r for r in read_diagnostics(trainer.args.output_dir) if r["step"] == 0}
    logged = next(e for e in trainer.state.log_history if "diagnostics/seconds" in e and e["step"] == 0)
    blocks = {"+".join(b.tasks): b for b in parameter_blocks(initial)}
    data = {"digit+speaker": fsdd_sample["train"], "coarse+fine": trec_sample["train"]}
    collators = {"digit+speaker": SpeechCollator(max_length_seconds=1.0), "coarse+fine": collator_for(trec_tokenizer)}
    for key, record in records.items():
        tasks = record["tasks"]
        assert tasks == key.split("+") and record["num_samples"] == 4 and record["per_sample"] == "vmap"
        indices = record["probe_rows"][key]
        rows = [data[key][i] for i in indices]
        params = [p for _, p in blocks[key].params]
        output = initial({key: _collate(rows, collators[key], tasks)})
        grads = []
        for task in tasks:
            g = torch.autograd.grad(output.losses[task], params, retain_graph=True, allow_unused=True)
            grads.append(
                torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
            )
        cosine = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        assert record["inter_task"]["cosine"][0][1] == pytest.approx(cosine, abs=1e-5)
        assert logged[f"diagnostics/{key}/cosine_mean"] == pytest.approx(cosine, abs=1e-5)
        a, b = grads[0].norm(), grads[1].norm()
        assert logged[f"diagnostics/{key}/magnitude_similarity_mean"] == pytest.approx(
            float(2 * a * b / (a**2 + b**2)), abs=1e-5
        )
        assert record["inter_task"]["norms"] == pytest.approx([float(a), float(b)], rel=1e-4)
        assert logged[f"diagnostics/{key}/conflict_fraction"] == float(cosine < 0)
        # inter-sample: the gradients of each row alone, collated alone
        expected = _one_at_a_time(initial, key, rows, collators[key], tasks, blocks[key].params)
        for k, task in enumerate(tasks):
            within = gradient_conflict(expected[k])
            got = record["inter_sample"][task]
            torch.testing.assert_close(
                torch.tensor(got["cosine"], dtype=torch.float64), within.cosine.double(), atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                torch.tensor(got["magnitude_similarity"], dtype=torch.float64),
                within.magnitude_similarity.double(),
                atol=1e-4,
                rtol=0,
            )
            pairs = within.pairs(within.cosine)
            assert logged[f"diagnostics/{key}/inter_sample/{task}/cosine_mean"] == pytest.approx(
                float(pairs.mean()), abs=1e-4
            )
        per_sample = inter_task_conflict_per_sample(expected)
        for s, one in enumerate(per_sample):
            assert record["inter_task_per_sample"]["cosine"][s][0][1] == pytest.approx(
                float(one.cosine[0, 1]), abs=1e-4
            )


class _LegacySquare(torch.autograd.Function):
    """An autograd.Function in the legacy style (``ctx`` in ``forward``, no ``setup_context``), as custom
    kernels often are: `torch.func` transforms refuse it."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _LegacyActivation(torch.nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return _LegacySquare.apply(x)


def test_a_model_torch_func_cannot_transform_falls_back_to_the_loop(make_trainer, fsdd_sample):
    speech = tiny_speech_encoder()
    speech.encoder.layers[0].feed_forward.intermediate_act_fn = _LegacyActivation()
    with pytest.raises(RuntimeError, match="setup_context"):  # what torch.func says of such a model
        model = MultiTaskModel.from_encoders({"speech": speech}, [Task("digit", encoder="speech", num_labels=10)])
        batch = _collate(
            [fsdd_sample["train"][0], fsdd_sample["train"][1]], SpeechCollator(max_length_seconds=1.0), ["digit"]
        )
        params = [(n, p) for n, p in model.named_parameters() if n.startswith("encoders.")]
        per_sample_gradients(model.eval(), "digit", batch, ["digit"], params, mode="vmap")
    trainer = make_trainer(speech_encoder=speech, mtl_diagnostics_steps=100, mtl_diagnostics_samples=3, max_steps=1)
    initial = copy.deepcopy(trainer.model).eval()
    trainer.train()
    record = next(r for r in read_diagnostics(trainer.args.output_dir) if r["block"] == "digit+speaker")
    assert record["per_sample"] == "loop"
    rows = [fsdd_sample["train"][i] for i in record["probe_rows"]["digit+speaker"]]
    block = next(b for b in parameter_blocks(initial) if b.tasks == ("digit", "speaker"))
    expected = _one_at_a_time(
        initial, "digit+speaker", rows, SpeechCollator(max_length_seconds=1.0), ["digit", "speaker"], block.params
    )
    for k, task in enumerate(["digit", "speaker"]):
        within = gradient_conflict(expected[k])
        got = torch.tensor(record["inter_sample"][task]["cosine"], dtype=torch.float64)
        torch.testing.assert_close(got, within.cosine.double(), atol=1e-4, rtol=0)


def test_a_resumed_run_keeps_the_records_up_to_its_step(make_trainer, tmp_path):
    trainer = make_trainer(
        mtl_diagnostics_steps=2, mtl_diagnostics_samples=2, max_steps=4, save_strategy="steps", save_steps=2
    )
    trainer.train()
    path = os.path.join(trainer.args.output_dir, DIAGNOSTICS_FILE)
    first = read_diagnostics(trainer.args.output_dir)
    assert sorted({r["step"] for r in first}) == [0, 2, 4]
    with open(path, "a", encoding="utf-8") as f:  # a record past the checkpoint, as an interrupted run leaves
        f.write(json.dumps({**first[-1], "step": 3}) + "\n")
    resumed = make_trainer(mtl_diagnostics_steps=2, mtl_diagnostics_samples=2, max_steps=4, save_strategy="no")
    resumed.train(resume_from_checkpoint=os.path.join(trainer.args.output_dir, "checkpoint-2"))
    again = read_diagnostics(resumed.args.output_dir)
    assert [r["step"] for r in again] == [0, 0, 2, 2, 4, 4]
    assert again[:4] == first[:4]
    # the resumed run reaches the same weights at step 4, so measures the same
    for key in ("cosine", "magnitude_similarity", "norms"):
        torch.testing.assert_close(torch.tensor(again[4]["inter_task"][key]), torch.tensor(first[4]["inter_task"][key]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mtl_diagnostics_steps", -1, "`mtl_diagnostics_steps` must be an integer >= 0, got -1"),
        ("mtl_diagnostics_samples", 1, "`mtl_diagnostics_samples` must be an integer >= 2, got 1"),
        ("mtl_diagnostics_per_sample", "jit", "`mtl_diagnostics_per_sample` must be one of vmap, loop; got 'jit'"),
    ],
)
def test_bad_diagnostics_arguments_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), report_to=[], **{field: value})


def test_the_jsonl_is_strict_json(make_trainer):
    trainer = make_trainer(mtl_diagnostics_steps=6, mtl_diagnostics_samples=2, max_steps=1)
    trainer.train()
    with open(os.path.join(trainer.args.output_dir, DIAGNOSTICS_FILE), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
            assert all(math.isfinite(x) for row in record["inter_task"]["cosine"] for x in row)


# ------------------------------------------------------------------------------- hf-mtl report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    from PIL import Image

    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return False
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def test_report_plots_what_the_run_logged(make_trainer, fsdd_sample, trec_sample, capsys):
    from hf_mtl.cli import main
    from hf_mtl.report import PLOT_FILES, make_report

    trainer = make_trainer(mtl_diagnostics_steps=2, mtl_diagnostics_samples=3, max_steps=4, logging_steps=2)
    trainer.train()
    trainer.evaluate({"digit": fsdd_sample["test"].select(range(16)), "coarse": trec_sample["test"].select(range(16))})
    trainer.save_state()
    run = trainer.args.output_dir
    report = make_report(run)
    assert set(report.files) == set(PLOT_FILES) and not report.skipped
    for name, path in report.files.items():
        assert path == os.path.join(run, "plots", PLOT_FILES[name]) and _is_png(path)
    with open(os.path.join(run, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    train_logs = [e for e in history if "loss" in e]
    # every plotted value is the logged one, at its step
    (total, *per_task) = report.series["training_loss"]["loss"]
    assert total.steps == [e["step"] for e in train_logs] == [2, 4] and total.values == [e["loss"] for e in train_logs]
    assert [s.label for s in per_task] == ["digit", "speaker", "coarse", "fine"]
    for series in per_task:
        assert series.values == [e[f"loss/{series.label}"] for e in train_logs]
    for series in report.series["task_weights"]["weight"]:
        assert series.values == [e[f"weight/{series.label}"] for e in train_logs]
    evaluation = next(e for e in history if "eval_digit_accuracy" in e)
    accuracy = {s.label: s for s in report.series["eval_metrics"]["accuracy"]}
    assert set(accuracy) == {"digit", "coarse"} and accuracy["digit"].values == [evaluation["eval_digit_accuracy"]]
    assert accuracy["coarse"].steps == [4]
    assert "loss" in report.series["eval_metrics"]  # eval_<task>_loss, its own panel
    records = read_diagnostics(run)
    for heatmap in report.heatmaps:
        mine = [r for r in records if r["block"] == heatmap.block]
        assert heatmap.steps == [0, 2, 4]
        expected = sum(r["inter_task"]["cosine"][0][1] for r in mine) / len(mine)
        assert heatmap.matrix[0][1] == pytest.approx(expected)
    panel = report.series["conflict"]["digit+speaker/cosine"]
    by_label = {s.label: s for s in panel}
    assert set(by_label) == {
        "inter-task (per sample)",
        "inter-task (probe batch)",
        "inter-sample: digit",
        "inter-sample: speaker",
    }
    mine = [r for r in records if r["block"] == "digit+speaker"]
    digit = torch.tensor([r["inter_sample"]["digit"]["cosine"] for r in mine], dtype=torch.float64)
    rows, cols = torch.triu_indices(3, 3, offset=1)
    assert by_label["inter-sample: digit"].values == pytest.approx(digit[:, rows, cols].mean(1).tolist())
    per_sample = torch.tensor([r["inter_task_per_sample"]["cosine"] for r in mine], dtype=torch.float64)
    assert by_label["inter-task (per sample)"].values == pytest.approx(per_sample[:, :, 0, 1].mean(1).tolist())
    assert by_label["inter-task (per sample)"].low == pytest.approx(
        torch.quantile(per_sample[:, :, 0, 1], 0.25, dim=1).tolist()
    )
    # the command: same files, into another folder, and a clear error for a folder with no run in it
    other = os.path.join(os.path.dirname(run), "elsewhere")
    capsys.readouterr()
    assert main(["report", run, "--output_dir", other, "--heatmap", "last"]) == 0
    assert sorted(os.listdir(other)) == sorted(PLOT_FILES.values())
    # it prints the mean, min and max over the measurements of each conflict line
    means = digit[:, rows, cols].mean(1)
    line = next(x for x in capsys.readouterr().out.splitlines() if "inter-sample: digit" in x and "/cosine" in x)
    assert line.split()[0] == "digit+speaker/cosine" and "n=3" in line
    expected = f"{means.mean().item():+.3f} [{means.min().item():+.3f}, {means.max().item():+.3f}]"
    assert line.endswith(expected), (line, expected)
    empty = os.path.join(os.path.dirname(run), "empty")
    os.makedirs(empty)
    assert main(["report", empty]) == 2
    with pytest.raises(ValueError, match="holds no trainer_state.json"):
        make_report(empty)


def test_report_of_a_run_without_diagnostics_skips_their_plots(make_trainer):
    from hf_mtl.report import make_report

    trainer = make_trainer(max_steps=2, logging_steps=1, mtl_method="ew")
    trainer.train()
    report = make_report(trainer.args.output_dir)
    assert set(report.files) == {"training_loss", "task_weights"}
    assert set(report.skipped) == {"eval_metrics", "cosine_heatmap", "conflict"}
    assert "mtl_diagnostics_steps" in report.skipped["conflict"]

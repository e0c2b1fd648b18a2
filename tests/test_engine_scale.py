"""The engine at scale (per-task batches, method problems per block, memory controls, counts, faults), against
direct computations with ``torch.autograd.grad`` on tiny real models and real data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_mtl import MultiTaskModel, Task
from hf_mtl.data import SpeechCollator, TextCollator, VisionCollator
from hf_mtl.data.loader import fetch_rows, group_tasks
from hf_mtl.engine import MultiTaskEngine, ParameterPartition
from hf_mtl.methods import get_method

from .conftest import no_dropout, tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder

FIVE = ["digit", "speaker", "coarse", "fine", "handwritten"]


def _grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _rows(model, batch, names, params):
    losses = model(batch).losses
    return torch.stack(
        [
            _flat(torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True, materialize_grads=True))
            for t in names
        ]
    )


def _step(engine, model, batches, **kwargs):
    model.zero_grad(set_to_none=True)
    engine.begin_window(model, batches, step=kwargs.pop("step", 0), **kwargs)
    for batch in batches:
        engine.micro_step(model, batch)
    engine.finalize()
    return _grads(model)


@pytest.fixture(scope="module")
def five(fsdd_sample, trec_sample, uci_digits, trec_tokenizer):
    """Speech (digit, speaker: one sub-batch), text (coarse, fine: one sub-batch) and vision (handwritten)."""
    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
    ]
    encoders = {
        "speech": tiny_speech_encoder(dropout=0.0),
        "text": tiny_text_encoder(trec_tokenizer.vocab_size, dropout=0.0),
        "vision": tiny_vision_encoder(),
    }
    model = no_dropout(MultiTaskModel.from_encoders(encoders, tasks, head_dropout=0.0))
    data = {
        "digit": fsdd_sample["train"],
        "speaker": fsdd_sample["train"],
        "coarse": trec_sample["train"],
        "fine": trec_sample["train"],
        "handwritten": uci_digits["train"],
    }
    groups = group_tasks(
        tasks,
        data,
        batch_sizes={},
        default_batch_size=4,
        collators={
            "speech": SpeechCollator(max_length_seconds=0.25),
            "text": TextCollator(trec_tokenizer),
            "vision": VisionCollator(),
        },
        label_collators={t.name: model.heads[t.name].collate_labels for t in tasks},
    )

    def batch(offset: int = 0, keys: tuple[str, ...] | None = None) -> dict:
        return {
            g.key: g.collate(fetch_rows(g.dataset, range(offset, offset + 4)))
            for g in groups
            if keys is None or g.key in keys
        }

    return model, batch, groups


@pytest.fixture(scope="module")
def per_task(trec_sample, trec_tokenizer):
    """One text encoder read by three tasks, each with its own sub-batch (per-task batches)."""
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
        Task("coarse2", encoder="text", num_labels=6, label_column="coarse"),
    ]
    model = no_dropout(
        MultiTaskModel.from_encoders(
            {"text": tiny_text_encoder(trec_tokenizer.vocab_size, dropout=0.0)}, tasks, head_dropout=0.0
        )
    )
    train = trec_sample["train"]
    data = {"coarse": train.select(range(0, 500)), "fine": train.select(range(500, 1000)), "coarse2": train}
    groups = group_tasks(
        tasks,
        data,
        batch_sizes={},
        default_batch_size=8,
        collators={"text": TextCollator(trec_tokenizer)},
        label_collators={t.name: model.heads[t.name].collate_labels for t in tasks},
    )
    assert [g.key for g in groups] == ["coarse", "fine", "coarse2"]

    def batch(offset: int = 0) -> dict:
        return {g.key: g.collate(fetch_rows(g.dataset, range(offset, offset + 8))) for g in groups}

    return model, batch


# ------------------------------------------------------------------ 1. per-task batches: one backward in all
def test_a_tasks_backward_runs_through_its_own_sub_graph_only(per_task):
    """A hook on each sub-batch's encoder output counts the backwards that reach it: each fires once per step
    (its own task's), never for another task's backward, as it would if the losses were stacked first."""
    model, make_batch = per_task
    batch = make_batch()
    fired: list[str] = []
    current: list[str] = []
    original = model.encode

    def encode(encoder_key, inputs):
        hidden, mask = original(encoder_key, inputs)
        key = next(k for k, sub in batch.items() if sub is inputs)
        hidden.register_hook(lambda grad, key=key: fired.append((key, current[-1] if current else None)))
        return hidden, mask

    engine = MultiTaskEngine(model, get_method("upgrad", num_tasks=3), ["coarse", "fine", "coarse2"], seed=0)
    backward = engine.backward_into
    order = iter(["coarse", "fine", "coarse2"])  # the engine's task order: which task each backward is for
    engine.backward_into = lambda loss, pairs, **kw: (current.append(next(order)), backward(loss, pairs, **kw))[1]
    model.encode = encode
    try:
        _step(engine, model, [batch])
    finally:
        model.encode = original
    assert sorted(fired) == [("coarse", "coarse"), ("coarse2", "coarse2"), ("fine", "fine")]


def test_per_task_batches_give_each_task_its_exact_row(per_task):
    model, make_batch = per_task
    batch = make_batch()
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=3), ["coarse", "fine", "coarse2"], seed=0)
    (problem,) = engine.problems
    params = [p for _, p in problem.block.params]
    model.zero_grad(set_to_none=True)
    engine.begin_window(model, [batch], step=0)
    engine.micro_step(model, batch)
    rows = engine.block_rows(problem).clone()
    engine.finalize()
    expected = _rows(model, batch, ["coarse", "fine", "coarse2"], params)
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-7)
    got = _flat([p.grad for p in params])
    torch.testing.assert_close(got, get_method("mgda", num_tasks=3).aggregate(expected), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ 2. one method problem per shared block
def test_one_problem_per_block_equals_the_method_on_each_blocks_rows(five):
    model, make_batch, _ = five
    batch = make_batch()
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0)
    assert [p.name for p in engine.problems] == ["digit+speaker", "coarse+fine"]
    got = _step(engine, model, [batch])
    for problem in engine.problems:
        names, params = list(problem.tasks), [p for _, p in problem.block.params]
        rows = _rows(model, batch, names, params)
        expected = get_method("mgda", num_tasks=2).aggregate(rows)
        torch.testing.assert_close(_flat([got[n] for n, _ in problem.block.params]), expected, rtol=1e-5, atol=1e-7)
    # the buffer holds Σ_b K_b P_b rows, not K x (all shared parameters)
    speech, text = (p.size for p in engine.problems)
    assert engine.row_buffer["rows"].numel() == 2 * speech + 2 * text


def test_an_unrelated_encoder_no_longer_changes_another_encoders_step(five):
    """MGDA's minimum norm over one global problem mixes the speech rows into the text update; per block it does
    not: another speech batch leaves the text update as it is."""
    model, make_batch, groups = five
    first = make_batch(0)
    other = dict(first)
    speech_key = next(g.key for g in groups if g.encoder == "speech")
    other[speech_key] = make_batch(8, keys=(speech_key,))[speech_key]
    text = [n for n, p in model.named_parameters() if n.startswith("encoders.text.")]

    def text_update(global_problem, batch):
        engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0, global_problem=global_problem)
        grads = _step(engine, model, [batch])
        return _flat([grads[n] for n in text])

    torch.testing.assert_close(text_update(False, first), text_update(False, other), rtol=0, atol=0)
    assert (text_update(True, first) - text_update(True, other)).abs().max() > 1e-4


def test_the_quickstart_row_buffer_shrinks_below_055(five):
    """On the quickstart's layout (speech and text each shared by two tasks, vision by one) the rows per block take
    half of the global problem's K x P (there, every task's row spans both encoders)."""
    model, _, _ = five
    per_block = ParameterPartition.from_model(model, FIVE)
    global_problem = ParameterPartition.from_model(model, FIVE, global_problem=True)
    before, after = global_problem.row_size(), per_block.row_size()
    assert before == 4 * (per_block.blocks[0].size + per_block.blocks[1].size)
    assert after / before <= 0.55


# ------------------------------------------------------------------ 3. memory controls
def test_surgery_restricted_to_parameters_by_name(five):
    """Rows only for the matching parameters; the other shared parameters get ∇ Σ_i L_i."""
    model, make_batch, _ = five
    batch = make_batch()
    patterns = [r"encoders\.text\.encoder\.layer\.0\.output\."]
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0, surgery_parameters=patterns)
    (problem,) = engine.problems
    assert problem.tasks == ("coarse", "fine") and all("layer.0.output." in n for n, _ in problem.block.params)
    got = _step(engine, model, [batch])
    params = [p for _, p in problem.block.params]
    expected = get_method("mgda", num_tasks=2).aggregate(_rows(model, batch, ["coarse", "fine"], params))
    torch.testing.assert_close(_flat([p.grad for p in params]), expected, rtol=1e-5, atol=1e-7)
    losses = model(batch).losses
    plain = [(n, p) for n, p in engine.partition.plain_shared]
    assert plain and any(n.startswith("encoders.speech.") for n, _ in plain)
    summed = torch.autograd.grad(sum(losses.values()), [p for _, p in plain], allow_unused=True, materialize_grads=True)
    for (name, _), g in zip(plain, summed):
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="matches no shared parameter"):
        MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0, surgery_parameters=["nothing_here"])


@pytest.mark.parametrize("method", ["upgrad", "pcgrad", "gradvac"])
def test_bfloat16_rows_give_the_float32_update_to_bfloat16_precision(five, method):
    model, make_batch, _ = five
    batch = make_batch()
    reference = _step(MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0), model, [batch])
    engine = MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0, rows_dtype=torch.bfloat16)
    assert engine.row_buffer["rows"].dtype == torch.bfloat16
    assert (
        engine.row_buffer["rows"].numel() * 2 == engine.row_buffer.flat.element_size() * engine.row_buffer.flat.numel()
    )
    got = _step(engine, model, [batch])
    for problem in engine.problems:
        names = [n for n, _ in problem.block.params]
        a, b = _flat([got[n] for n in names]), _flat([reference[n] for n in names])
        assert (a - b).norm() <= 2e-2 * b.norm()  # bfloat16 keeps 8 bits of mantissa
        assert (a - b).norm() > 0  # the rows were really stored in bfloat16


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad", "imtl"])
def test_feature_level_mode_weights_from_the_gramian_of_the_feature_gradients(five, method):
    model, make_batch, groups = five
    batch = make_batch()
    engine = MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0, jacobian_mode="features")
    got = _step(engine, model, [batch])
    outputs = model(batch, return_representations=True)
    expected_total = {}
    for problem in engine.problems:
        names = list(problem.tasks)
        keys = [g.key for g in groups if g.encoder in problem.encoders]
        features = [outputs.representations[k] for k in keys]
        rows = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(outputs.losses[t], features, retain_graph=True)])
                for t in names
            ]
        )
        weights = get_method(method, num_tasks=2).weights_from_gramian(rows @ rows.T)
        combined = sum(w * outputs.losses[t] for w, t in zip(weights, names))
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(f"encoders.{problem.encoders[0]}.")]
        grads = torch.autograd.grad(combined, [p for _, p in params], retain_graph=True, allow_unused=True)
        expected_total.update({n: g for (n, _), g in zip(params, grads) if g is not None})
    for name, value in expected_total.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad", "nash_mtl", "imtl"])
def test_gramian_path_equals_exact_rows_on_shared_input(five, method):
    model, make_batch, groups = five
    batch = make_batch()
    rows = _step(MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0), model, [batch])
    engine = MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0, jacobian_mode="gramian")
    engine._gramian.check_groups(groups)
    try:
        got = _step(engine, model, [batch])
    finally:
        engine._gramian.remove()
    assert engine.row_buffer.flat.numel() == engine.buffer["plain"].numel() + 5  # no rows anywhere
    for name, value in rows.items():
        if value is not None:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_gramian_path_refuses_per_task_batches_and_unseen_parameter_uses(per_task, five):
    model, _ = per_task
    engine = MultiTaskEngine(
        model, get_method("mgda", num_tasks=3), ["coarse", "fine", "coarse2"], seed=0, jacobian_mode="gramian"
    )
    try:
        from hf_mtl.data.loader import TaskGroup

        groups = [TaskGroup(tasks=[model.tasks[t]], dataset=[], batch_size=1, collator=dict) for t in model.tasks]
        with pytest.raises(ValueError, match="share one sub-batch"):
            engine._gramian.check_groups(groups)
    finally:
        engine._gramian.remove()
    # a parameter used outside the forward of the module holding it: the taps miss it, the first step refuses
    model, make_batch, _ = five
    embeddings = model.encoders["text"].embeddings
    norm = embeddings.LayerNorm
    object.__setattr__(
        embeddings, "LayerNorm", lambda x: F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    )
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0, jacobian_mode="gramian")
    try:
        with pytest.raises(ValueError, match="outside the forward"):
            _step(engine, model, [make_batch()])
    finally:
        engine._gramian.remove()
        del embeddings.__dict__["LayerNorm"]


# ------------------------------------------------------------------ 4. counts over the whole step
def test_losses_average_over_the_labelled_items_of_the_whole_step(five):
    """Two micro-batches with 1 and 4 labelled items of `coarse`: its head gets the gradient of the mean over the 5
    items (the Trainer's num_items_in_batch), not the mean of the two micro-batch means."""
    model, make_batch, groups = five
    key = next(g.key for g in groups if g.encoder == "text")
    first, second = make_batch(0, keys=(key,)), make_batch(4, keys=(key,))
    first[key]["labels"] = dict(first[key]["labels"])
    first[key]["labels"]["coarse"] = first[key]["labels"]["coarse"].clone()
    first[key]["labels"]["coarse"][1:] = -100
    engine = MultiTaskEngine(model, get_method("ew", num_tasks=5), FIVE, seed=0)
    got = _step(engine, model, [first, second])
    head = list(model.heads["coarse"].parameters())

    def summed(batch):
        logits = model(batch).logits["coarse"]
        return F.cross_entropy(logits, batch[key]["labels"]["coarse"], ignore_index=-100, reduction="sum")

    expected = torch.autograd.grad((summed(first) + summed(second)) / 5, head)
    for (name, _), e in zip(model.heads["coarse"].named_parameters(prefix="heads.coarse"), expected):
        # ew is the mean over the present tasks (coarse, fine): weight 1/2
        torch.testing.assert_close(got[name], 0.5 * e, rtol=1e-5, atol=1e-7, msg=name)
    assert engine.global_counts.tolist()[FIVE.index("coarse")] == 5


def test_a_task_absent_from_a_micro_step_keeps_its_full_row_and_unlabelled_does_not_count(five):
    model, make_batch, groups = five
    text = next(g.key for g in groups if g.encoder == "text")
    speech = next(g.key for g in groups if g.encoder == "speech")
    first, second = make_batch(0, keys=(text,)), make_batch(0, keys=(speech,))
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0)
    model.zero_grad(set_to_none=True)
    engine.begin_window(model, [first, second], step=0)
    for batch in (first, second):
        engine.micro_step(model, batch)
    text_problem = next(p for p in engine.problems if "coarse" in p.tasks)
    rows = engine.block_rows(text_problem).clone()
    engine.finalize()
    params = [p for _, p in text_problem.block.params]
    # the text tasks are in one micro-step of two: their rows are their whole gradients, not halves
    torch.testing.assert_close(rows, _rows(model, first, ["coarse", "fine"], params), rtol=1e-5, atol=1e-7)
    # a sub-batch whose labels for a task are all missing does not make the task present
    unlabelled = make_batch(0, keys=(text,))
    unlabelled[text]["labels"] = {**unlabelled[text]["labels"], "fine": torch.full((4,), -100)}
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=5), FIVE, seed=0)
    seen = {}
    original = engine.problems[1].method.aggregate
    engine.problems[1].method.aggregate = lambda J, **kw: seen.update(rows=J.shape[0], **kw) or original(J, **kw)
    _step(engine, model, [unlabelled])
    assert "fine" not in engine.present and seen["rows"] == 1 and seen["task_ids"].tolist() == [2]


# ------------------------------------------------------------------ 5. faults
def test_a_non_finite_step_without_a_scaler_is_skipped_logged_and_counted(five):
    model, make_batch, groups = five
    batch = make_batch()
    key = next(g.key for g in groups if g.encoder == "vision")
    batch[key] = {**batch[key], "pixel_values": batch[key]["pixel_values"].clone()}
    batch[key]["pixel_values"][0, 0, 0, 0] = float("nan")
    for method in ("pcgrad", "ew"):
        engine = MultiTaskEngine(model, get_method(method, num_tasks=5), FIVE, seed=0)
        got = _step(engine, model, [batch])
        assert all(value is None for value in got.values())  # no parameter moves, whatever the optimizer
        assert engine.skipped_steps == 1 and engine.last_step_skipped
        assert engine.pop_logs()["mtl/skipped_steps"] == 1.0
        assert "mtl/skipped_steps" not in engine.pop_logs()
    # with the option off, NaN is written as it is
    engine = MultiTaskEngine(model, get_method("ew", num_tasks=5), FIVE, seed=0, skip_non_finite=False)
    got = _step(engine, model, [batch])
    assert not torch.isfinite(got["heads.handwritten.classifier.weight"]).all() and engine.skipped_steps == 0


def test_feature_level_mode_on_per_task_batches(per_task):
    """Each task reads its own sub-batch: the feature Gramian is block-diagonal; the update equals the one from the
    dense K x (all features) Jacobian computed by hand."""
    model, make_batch = per_task
    batch = make_batch()
    names = ["coarse", "fine", "coarse2"]
    engine = MultiTaskEngine(model, get_method("mgda", num_tasks=3), names, seed=0, jacobian_mode="features")
    got = _step(engine, model, [batch])
    outputs = model(batch, return_representations=True)
    features = [outputs.representations[t] for t in names]
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(
                        outputs.losses[t], features, retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                ]
            )
            for t in names
        ]
    )
    weights = get_method("mgda", num_tasks=3).weights_from_gramian(rows @ rows.T)
    assert (weights > 0.05).all()  # not a degenerate corner
    combined = sum(w * outputs.losses[t] for w, t in zip(weights, names))
    params = [(n, p) for n, p in model.named_parameters() if n.startswith("encoders.")]
    expected = torch.autograd.grad(combined, [p for _, p in params], allow_unused=True)
    for (name, _), value in zip(params, expected):
        if value is not None:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)

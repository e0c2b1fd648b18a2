"""The engine's step against direct computations on a tiny real model and real data (docs/architecture.md, steps 2-5).

Every expected value is computed here by hand with ``torch.autograd.grad`` on the same model and batch:
the engine must put each task's gradient of the shared parameters in its own row, combine the rows with
the method exactly once per optimizer step, give each task-private parameter its own task's gradient,
and handle loss weighting, representation methods, loss scaling and task subsets.
"""

from __future__ import annotations

import pytest
import torch

from hf_mtl import MultiTaskModel, Task
from hf_mtl.data import TextCollator, VisionCollator
from hf_mtl.data.loader import fetch_rows, group_tasks
from hf_mtl.data.sampling import step_generator
from hf_mtl.engine import _METHOD_SALT, MultiTaskEngine
from hf_mtl.methods import get_method

from .conftest import tiny_speech_encoder, tiny_text_encoder, tiny_vision_encoder

TASKS = ["coarse", "fine", "handwritten"]


@pytest.fixture()
def setup(trec_sample, uci_digits, trec_tokenizer):
    """A model with a text encoder shared by two tasks and a vision encoder read by one, and one batch."""
    text, vision = tiny_text_encoder(trec_tokenizer.vocab_size), tiny_vision_encoder()
    num_fine = trec_sample["train"].features["fine"].num_classes
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=num_fine),
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
    ]
    model = MultiTaskModel.from_encoders({"text": text, "vision": vision}, tasks, head_dropout=0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = {"coarse": trec_sample["train"], "fine": trec_sample["train"], "handwritten": uci_digits["train"]}
    groups = group_tasks(
        tasks,
        data,
        batch_sizes={},
        default_batch_size=8,
        collators={"text": TextCollator(trec_tokenizer), "vision": VisionCollator()},
        label_collators={name: model.heads[name].collate_labels for name in TASKS},
    )

    def batch(offset: int = 0, keys: tuple[str, ...] | None = None) -> dict:
        out = {}
        for group in groups:
            if keys is None or group.key in keys:
                out[group.key] = group.collate(fetch_rows(group.dataset, range(offset, offset + 8)))
        return out

    return model, batch


def _direct(model, batch, params):
    """Per-task gradients of ``params`` and the losses, by hand."""
    losses = model(batch).losses
    grads = {t: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for t, loss in losses.items()}
    return {t: float(loss.detach()) for t, loss in losses.items()}, grads


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _engine(model, name, **kwargs):
    return MultiTaskEngine(model, get_method(name, num_tasks=3, **kwargs), TASKS, seed=7)


def test_parameter_partition(setup):
    model, _ = setup
    engine = _engine(model, "pcgrad")
    (block,) = engine.partition.blocks
    shared = {name for name, _ in block.params}
    assert shared and all(name.startswith("encoders.text.") for name in shared)
    assert all(
        name.startswith(("encoders.vision.", "heads.handwritten."))
        for name, _ in engine.partition.private["handwritten"]
    )
    assert all(name.startswith("heads.coarse.") for name, _ in engine.partition.private["coarse"])
    # only the tasks that reach a shared parameter have a Jacobian row
    assert [p.tasks for p in engine.problems] == [("coarse", "fine")]
    assert engine.block_rows(engine.problems[0]).shape == (2, block.size)


def test_jacobian_rows_update_and_private_gradients(setup):
    model, make_batch = setup
    batch = make_batch()
    engine = _engine(model, "pcgrad")
    engine.micro_step(model, batch, step=3)
    rows = engine.block_rows(engine.problems[0]).clone()
    engine.finalize()
    shared = engine.row_params
    private = {t: [p for _, p in engine.partition.private[t]] for t in TASKS}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}

    _, direct = _direct(model, batch, shared)
    jacobian = torch.stack([_flat(direct[t]) for t in TASKS[:2]])
    torch.testing.assert_close(rows, jacobian, rtol=1e-5, atol=1e-7)
    expected = get_method("pcgrad").aggregate(jacobian, generator=step_generator(7, _METHOD_SALT, 3, -1))
    got = torch.cat([grads[n].reshape(-1) for n, _ in engine.partition.blocks[0].params])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for task in TASKS:  # each private parameter gets its own task's plain gradient
        names = [n for n, _ in engine.partition.private[task]]
        _, own = _direct(model, batch, private[task])
        for name, g in zip(names, own[task]):
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


def test_loss_weighting_is_one_backward_of_the_mean(setup):
    model, make_batch = setup
    batch = make_batch()
    engine = _engine(model, "ew")
    assert engine.mode == "combined" and not engine.problems and not engine.row_params  # no Jacobian
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    params = [p for p in model.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    losses = model(batch).losses
    expected = torch.autograd.grad(torch.stack(list(losses.values())).mean(), params, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-5, atol=1e-7)


def test_accumulation_combines_the_summed_rows_once(setup):
    model, make_batch = setup
    first, second = make_batch(0), make_batch(8)
    engine = _engine(model, "upgrad")
    calls = []
    original = engine.method.aggregate
    engine.method.aggregate = lambda J, **kw: calls.append(J.clone()) or original(J, **kw)
    engine.begin_window(model, [first, second], step=0)
    engine.micro_step(model, first, step=0)
    engine.micro_step(model, second, step=0)
    engine.finalize()
    got = torch.cat([p.grad.reshape(-1) for p in engine.row_params])

    shared = engine.row_params
    _, g1 = _direct(model, first, shared)
    _, g2 = _direct(model, second, shared)
    rows = torch.stack([0.5 * (_flat(g1[t]) + _flat(g2[t])) for t in TASKS[:2]])
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], rows, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, get_method("upgrad").aggregate(rows), rtol=1e-5, atol=1e-7)
    head = model.heads["coarse"].classifier.weight
    _, h1 = _direct(model, first, [head])
    _, h2 = _direct(model, second, [head])
    torch.testing.assert_close(head.grad, 0.5 * (h1["coarse"][0] + h2["coarse"][0]), rtol=1e-5, atol=1e-7)


def test_a_task_that_shares_nothing_stays_out_of_the_method(setup):
    """The vision task reaches no shared parameter: a zero row would be MGDA's minimum-norm point (a zero update)."""
    model, make_batch = setup
    batch = make_batch()
    engine = _engine(model, "mgda")
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    update = torch.cat([p.grad.reshape(-1) for p in engine.row_params])
    _, direct = _direct(model, batch, engine.row_params)
    jacobian = torch.stack([_flat(direct[t]) for t in TASKS[:2]])
    torch.testing.assert_close(update, get_method("mgda").aggregate(jacobian), rtol=1e-5, atol=1e-7)
    assert update.norm() > 0 and engine.method.last_weights.numel() == 2


def test_a_window_without_some_tasks_combines_the_present_ones(setup):
    model, make_batch = setup
    batch = make_batch(keys=("coarse+fine",))
    engine = _engine(model, "mgda")
    seen = {}
    original = engine.method.aggregate
    engine.method.aggregate = lambda J, **kw: seen.update(kw, rows=J.shape[0]) or original(J, **kw)
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    assert seen["rows"] == 2 and seen["task_ids"].tolist() == [0, 1]
    assert all(p.grad is None for p in model.heads["handwritten"].parameters())
    assert all(p.grad is None for p in model.encoders["vision"].parameters())


def test_loss_scale_is_removed_before_the_method_and_restored_after(setup):
    model, make_batch = setup
    batch = make_batch()
    reference = _engine(model, "nash_mtl")  # scale invariant: a forgotten unscale would change nothing
    reference.micro_step(model, batch, step=0)
    reference.finalize()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.row_params]).clone()
    model.zero_grad()
    scaled = _engine(model, "nash_mtl")
    scaled.micro_step(model, batch, step=0, grad_scale=1024.0)
    scaled.finalize()
    got = torch.cat([p.grad.reshape(-1) for p in scaled.row_params])
    torch.testing.assert_close(got, 1024.0 * expected, rtol=1e-4, atol=1e-6)

    model.zero_grad()
    scaled.micro_step(model, batch, step=1, grad_scale=float("inf"))
    scaled.finalize()
    assert torch.isnan(torch.cat([p.grad.reshape(-1) for p in scaled.row_params])).all()  # the scaler skips


def test_method_parameters_receive_their_gradient(setup):
    model, make_batch = setup
    batch = make_batch()
    engine = _engine(model, "uw")
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    s = engine.method.log_variance
    losses = torch.tensor([float(v.detach()) for v in model(batch).losses.values()])
    expected = 0.5 - losses / (2 * torch.exp(s.detach()))  # ∂/∂s of L/(2e^s) + s/2
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_representation_method_backpropagates_the_combined_feature_gradient(setup):
    model, make_batch = setup
    batch = make_batch(keys=("coarse+fine",))
    engine = _engine(model, "mgda_ub")
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    weights = engine.method.last_weights
    params = list(model.encoders["text"].parameters())
    got = [p.grad.clone() for p in params]
    losses = model(batch).losses
    combined = weights[0] * losses["coarse"] + weights[1] * losses["fine"]
    expected = torch.autograd.grad(combined, params, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-6)
    _, head = _direct(model, batch, list(model.heads["fine"].parameters()))
    for p, e in zip(model.heads["fine"].parameters(), head["fine"]):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_famo_learns_from_the_losses_after_the_step(setup):
    model, make_batch = setup
    batch = make_batch()
    engine = _engine(model, "famo")
    engine.micro_step(model, batch, step=0)
    engine.finalize()
    before = torch.tensor([float(v.detach()) for v in model(batch).losses.values()])
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    after = torch.tensor([float(v.detach()) for v in model(batch).losses.values()])
    expected = get_method("famo", num_tasks=3)
    expected.after_optimizer_step(before, after)
    engine.after_optimizer_step(model)
    torch.testing.assert_close(engine.method.logits, expected.logits, rtol=1e-5, atol=1e-7)
    assert not torch.equal(engine.method.logits, torch.zeros(3))


def test_logs_average_losses_and_weights(setup):
    model, make_batch = setup
    engine = _engine(model, "imtl", loss_balancing=False)
    losses = []
    for step in range(2):
        batch = make_batch(8 * step)
        losses.append({t: float(v) for t, v in model(batch).losses.items()})
        engine.micro_step(model, batch, step=step)
        engine.finalize()
        model.zero_grad()
    logs = engine.pop_logs()
    for task in TASKS:
        assert logs[f"loss/{task}"] == pytest.approx((losses[0][task] + losses[1][task]) / 2, rel=1e-5)
    # IMTL-G weights of the tasks with a Jacobian row sum to 1; the vision task has no row, so no weight
    assert sum(logs[f"weight/{t}"] for t in TASKS[:2]) == pytest.approx(1.0, abs=1e-5)
    assert "weight/handwritten" not in logs
    assert engine.pop_logs() == {}


def test_parameter_blocks_group_shared_parameters_by_the_tasks_that_reach_them(trec_tokenizer):
    from hf_mtl.engine import parameter_blocks

    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=50),
        Task("handwritten", encoder="vision", num_labels=10),
    ]
    encoders = {
        "speech": tiny_speech_encoder(),
        "text": tiny_text_encoder(trec_tokenizer.vocab_size),
        "vision": tiny_vision_encoder(),
    }
    model = MultiTaskModel.from_encoders(encoders, tasks)
    blocks = parameter_blocks(model)
    assert [b.tasks for b in blocks] == [("digit", "speaker"), ("coarse", "fine")]
    speech = {n for n, p in model.named_parameters() if n.startswith("encoders.speech.") and p.requires_grad}
    assert {n for n, _ in blocks[0].params} == speech
    assert blocks[1].size == sum(p.numel() for p in model.encoders["text"].parameters() if p.requires_grad)
    with_trunk = MultiTaskModel.from_encoders(encoders, tasks, trunk={"hidden_size": 16, "num_layers": 1})
    blocks = parameter_blocks(with_trunk)
    assert [b.tasks for b in blocks] == [
        ("digit", "speaker"),
        ("coarse", "fine"),
        ("digit", "speaker", "coarse", "fine", "handwritten"),
    ]
    assert {n for n, _ in blocks[0].params} == speech | {
        n for n, _ in with_trunk.named_parameters() if n.startswith("trunk.projections.speech.")
    }
    assert all(n.startswith("trunk.blocks.") for n, _ in blocks[2].params)

"""SAM, ASAM and F-MTL (`hf_mtl.sharpness`) against direct implementations on tiny real models and real data.

Every expected value is computed here from the definitions (Foret et al., ICLR 2021; Kwon et al., ICML 2021; Phan et al., arXiv 2211.13723) with
``torch.autograd.grad`` on the same model and batch, independently of the engine:

- SAM: ``g = ∇C(w)``, ``e = ρ g / (‖g‖ + 1e-12)`` over every trainable parameter, then the method's step
  at ``w + e`` (the combined loss for loss-weighting methods; per-task rows combined by the method, heads
  their own task's gradient, for Jacobian methods); ASAM scales by ``T_w = |w| + η`` on parameters whose
  name contains "weight" (official code), ``sam_adaptive=True`` on every parameter.
- F-MTL: a loop over the tasks as in Algorithm 1: per-task perturbations with separate norms for the
  shared and the head parameters, ``h_i = g_i^SAM - g_i``, shared update ``AGG(g) + AGG(h)``, heads
  ``g_i^{ns,SAM}``.

Plus: weights restored bit for bit, BatchNorm statistics updated once per step, bf16 training, the fp16
GradScaler path, per-micro-batch perturbation under gradient accumulation, and every Jacobian method with
every variant.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import weakref

import pytest
import torch

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.data import TextCollator, VisionCollator
from hf_mtl.data.loader import fetch_rows, group_tasks
from hf_mtl.engine import MultiTaskEngine
from hf_mtl.methods import get_method, list_methods
from hf_mtl.sharpness import frozen_batch_norm, get_sharpness, list_sharpness

from .conftest import no_dropout, tiny_text_encoder

TASKS = ["coarse", "fine"]
VISION_TASKS = ["handwritten", "parity"]
RTOL, ATOL = 1e-4, 1e-6


# ---------------------------------------------------------------------------------------------- fixtures
def _batcher(tasks, model, data, collators):
    groups = group_tasks(
        tasks,
        data,
        batch_sizes={},
        default_batch_size=8,
        collators=collators,
        label_collators={t.name: model.heads[t.name].collate_labels for t in tasks},
    )
    assert len(groups) == 1  # the two tasks read the same rows: one sub-batch, one encoder pass

    def batch(offset: int = 0, size: int = 8) -> dict:
        group = groups[0]
        return {group.key: group.collate(fetch_rows(group.dataset, range(offset, offset + size)))}

    return batch


@pytest.fixture(scope="module")
def text(trec_sample, trec_tokenizer):
    """A tiny BERT shared by the two TREC tasks (coarse, fine), dropout 0, and a batch maker.

    Module scoped: the engine never changes the weights (only ``.grad``); tests that step copy the model."""
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
    ]
    model = MultiTaskModel.from_encoders(
        {"text": tiny_text_encoder(trec_tokenizer.vocab_size, dropout=0.0)}, tasks, head_dropout=0.0
    )
    no_dropout(model).train()
    data = {"coarse": trec_sample["train"], "fine": trec_sample["train"]}
    return model, _batcher(tasks, model, data, {"text": TextCollator(trec_tokenizer)})


@pytest.fixture(scope="module")
def vision_bn(uci_digits):
    """A tiny HF ResNet (BatchNorm2d layers) shared by two tasks on the UCI digits (the digit, its parity)."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    encoder = ResNetModel(
        ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic")
    )
    tasks = [
        Task("handwritten", encoder="vision", num_labels=10, label_column="label"),
        Task("parity", encoder="vision", num_labels=2),
    ]
    model = MultiTaskModel.from_encoders({"vision": encoder}, tasks, head_dropout=0.0).train()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    train = uci_digits["train"].select(range(64))
    train = train.add_column("parity", [label % 2 for label in train["label"]])
    data = {"handwritten": train, "parity": train}
    return model, _batcher(tasks, model, data, {"vision": VisionCollator()})


@pytest.fixture(autouse=True)
def _no_grads(request):
    """Each test starts (and leaves the shared models) without gradients."""
    models = [request.getfixturevalue(name)[0] for name in ("text", "vision_bn") if name in request.fixturenames]
    for model in models:
        model.zero_grad(set_to_none=True)
    yield
    for model in models:
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- helpers
def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _shared(model):
    """The parameters both tasks reach: the one encoder (decided here by name, not by the engine)."""
    return [(n, p) for n, p in _trainable(model) if n.startswith("encoders.")]


def _head(model, task):
    return [(n, p) for n, p in _trainable(model) if n.startswith(f"heads.{task}.")]


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, (_, p) in zip(grads, params)])


def _split(vector, params):
    out, offset = {}, 0
    for name, p in params:
        out[name] = vector[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def _unit(named, grads, rho, scaling=None):
    """``ρ T² g / (‖T g‖ + 1e-12)`` over ``named`` jointly (T = 1 when ``scaling`` gives None)."""
    scales = [None if scaling is None else scaling(n, p.detach()) for n, p in named]
    scaled = [g if t is None else t * g for g, t in zip(grads, scales)]
    norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled)).float()
    return [(s if t is None else t * s) * (rho / (norm + 1e-12)) for s, t in zip(scaled, scales)]


def asam_official(eta):
    return lambda name, p: p.abs() + eta if "weight" in name else None


def every_parameter(eta):
    return lambda name, p: p.abs() + eta


@contextlib.contextmanager
def _moved(named, perturbation):
    """``w + e`` for the block, then the saved weights back."""
    saved = [p.detach().clone() for _, p in named]
    with torch.no_grad():
        for (_, p), e in zip(named, perturbation):
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, p), w in zip(named, saved):
                p.copy_(w)


def _grad(loss, named, **kwargs):
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(grads, named)]


def _losses(model, batch, tasks):
    losses = model(batch).losses
    return [losses[t] for t in tasks]


def _engine(model, tasks, method, variant=None, *, method_kwargs=None, **sharpness_kwargs):
    sharpness = None if variant is None else get_sharpness(variant, **sharpness_kwargs)
    method = get_method(method, num_tasks=len(tasks), **(method_kwargs or {}))
    return MultiTaskEngine(model, method, list(tasks), seed=3, sharpness=sharpness)


def _run(engine, model, batches, grad_scale=1.0, step=0):
    """Micro-steps over ``batches`` (each with scale 1/N), finalize; returns name -> ``.grad`` (a copy)."""
    model.zero_grad(set_to_none=True)
    engine.begin_window(model, batches, step=step, grad_scale=grad_scale)
    for batch in batches:
        engine.micro_step(model, batch)
    engine.finalize()
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_grads(got, expected, rtol=RTOL, atol=ATOL):
    assert set(expected) <= set(got)
    for name, e in expected.items():
        g = got[name]
        g = torch.zeros_like(e) if g is None else g
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _distance(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in b)


# --------------------------------------------------------------------- direct implementations (references)
def sam_reference(model, batch, tasks, method, rho, scaling=None, method_kwargs=None):
    """One SAM / ASAM micro-step by hand. Returns (name -> gradient at w + e of the objective the method's step
    takes: for a loss-weighting method the combined loss over all parameters; for a Jacobian method the
    per-task rows of the shared parameters, to be combined, and the heads' own-task gradients)."""
    params = _trainable(model)
    probe = get_method(method, num_tasks=len(tasks), **(method_kwargs or {}))
    losses = _losses(model, batch, tasks)
    objective = torch.stack(losses).sum() if probe.requires_jacobian else probe.combine_losses(torch.stack(losses))
    e = _unit(params, _grad(objective, params), rho, scaling)
    with _moved(params, e):
        losses = _losses(model, batch, tasks)
        if not probe.requires_jacobian:
            return {"full": dict(zip([n for n, _ in params], _grad(probe.combine_losses(torch.stack(losses)), params)))}
        shared = _shared(model)
        rows, heads = [], {}
        for i, task in enumerate(tasks):
            grads = _grad(losses[i], shared + _head(model, task), retain_graph=True)
            rows.append(_flat(grads[: len(shared)], shared))
            heads.update({n: g for (n, _), g in zip(_head(model, task), grads[len(shared) :])})
    return {"rows": torch.stack(rows), "heads": heads}


def fmtl_reference(model, batch, tasks, rho, scaling=None):
    """F-MTL's Algorithm 1, loop by loop: returns the loss rows g_i, the flat rows h_i and the heads' g_i^{ns,SAM}."""
    shared = _shared(model)
    losses = _losses(model, batch, tasks)
    at_theta = [_grad(losses[i], shared + _head(model, t), retain_graph=True) for i, t in enumerate(tasks)]
    loss_rows, flat_rows, heads = [], [], {}
    for i, task in enumerate(tasks):
        head = _head(model, task)
        g_sh, g_ns = at_theta[i][: len(shared)], at_theta[i][len(shared) :]
        eps_sh = _unit(shared, g_sh, rho, scaling)  # ρ g_i / ‖g_i‖
        eps_ns = _unit(head, g_ns, rho, scaling)  # ρ g_i^ns / ‖g_i^ns‖, its own norm
        with _moved(shared + head, eps_sh + eps_ns):
            sam = _grad(_losses(model, batch, tasks)[i], shared + head)
        loss_rows.append(_flat(g_sh, shared))
        flat_rows.append(_flat(sam[: len(shared)], shared) - _flat(g_sh, shared))  # h_i = g_i^SAM - g_i
        heads.update({n: g for (n, _), g in zip(head, sam[len(shared) :])})
    return {"loss_rows": torch.stack(loss_rows), "flat_rows": torch.stack(flat_rows), "heads": heads}


def _mean_losses(model, batches, tasks):
    with torch.no_grad():
        return torch.stack([torch.stack(_losses(model, b, tasks)) for b in batches]).mean(0)


def expected_sam(model, batches, tasks, method, rho, scaling=None, method_kwargs=None):
    """Gradients of a SAM step accumulated over ``batches`` (each perturbed along its own gradient)."""
    parts = [sam_reference(model, b, tasks, method, rho, scaling, method_kwargs) for b in batches]
    n = len(batches)
    if "full" in parts[0]:
        return {name: sum(p["full"][name] for p in parts) / n for name in parts[0]["full"]}
    rows = sum(p["rows"] for p in parts) / n
    aggregator = get_method(method, num_tasks=len(tasks), **(method_kwargs or {}))
    update = aggregator.aggregate(rows, losses=_mean_losses(model, batches, tasks))
    out = _split(update, _shared(model))
    out.update({name: sum(p["heads"][name] for p in parts) / n for name in parts[0]["heads"]})
    return out


def expected_fmtl(model, batches, tasks, method, rho, scaling=None, method_kwargs=None):
    parts = [fmtl_reference(model, b, tasks, rho, scaling) for b in batches]
    n = len(batches)
    loss_rows = sum(p["loss_rows"] for p in parts) / n
    flat_rows = sum(p["flat_rows"] for p in parts) / n
    losses = _mean_losses(model, batches, tasks)
    first = get_method(method, num_tasks=len(tasks), **(method_kwargs or {}))
    second = get_method(method, num_tasks=len(tasks), **(method_kwargs or {}))
    update = first.aggregate(loss_rows, losses=losses) + second.aggregate(flat_rows, losses=losses)
    out = _split(update, _shared(model))
    out.update({name: sum(p["heads"][name] for p in parts) / n for name in parts[0]["heads"]})
    return out


def plain_gradients(model, batch, tasks, method):
    """The method's step without any perturbation (to show that the perturbation matters)."""
    engine = _engine(model, tasks, method)
    return _run(engine, model, [batch])


# ------------------------------------------------------------------------------------- 1. SAM and ASAM
SAM_CASES = [
    # (variant, sharpness kwargs, reference scaling, rho)
    pytest.param("sam", {}, None, 0.5, id="sam"),
    pytest.param("sam", {"adaptive": True, "eta": 0.01}, every_parameter(0.01), 2.0, id="sam-adaptive"),
    pytest.param("asam", {"eta": 0.01}, asam_official(0.01), 2.0, id="asam"),
]


@pytest.mark.parametrize("method", ["ew", "mgda", "upgrad"])
@pytest.mark.parametrize(("variant", "options", "scaling", "rho"), SAM_CASES)
def test_sam_equals_a_hand_written_step(text, method, variant, options, scaling, rho):
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, method, variant, rho=rho, **options), model, [batch])
    expected = expected_sam(model, [batch], TASKS, method, rho, scaling)
    _assert_grads(got, expected)
    # not vacuous: the perturbation moves the gradient far beyond the tolerance
    assert _distance(plain_gradients(model, batch, TASKS, method), expected) > 100 * ATOL


def test_asam_scales_only_parameters_named_weight(text):
    """The official rule (T_w = 1 for biases) is observable: scaling every parameter gives another step."""
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, "ew", "asam", rho=2.0, eta=0.01), model, [batch])
    assert _distance(got, expected_sam(model, [batch], TASKS, "ew", 2.0, every_parameter(0.01))) > 100 * ATOL
    assert get_sharpness("asam").rho == 0.5 and get_sharpness("asam", adaptive=False).adaptive


def test_sam_perturbs_along_the_objective_of_the_method(text):
    """Loss weighting ascends along its combined loss; IMTL's transformed losses e^s L - s enter the sum."""
    model, make_batch = text
    batch = make_batch()
    engine = _engine(model, TASKS, "imtl", "sam", rho=0.5)
    with torch.no_grad():
        engine.method.s.copy_(torch.tensor([0.7, -0.4]))
    got = _run(engine, model, [batch])
    # by hand: objective Σ(e^s L - s), rows of e^s L_i at w + e
    s = engine.method.s.detach()
    params = _trainable(model)
    losses = torch.stack(_losses(model, batch, TASKS))
    e = _unit(params, _grad((torch.exp(s) * losses - s).sum(), params), 0.5)
    shared = _shared(model)
    with _moved(params, e):
        losses = torch.stack(_losses(model, batch, TASKS))
        rows = torch.stack(
            [_flat(_grad(torch.exp(s[i]) * losses[i], shared, retain_graph=True), shared) for i in range(2)]
        )
        heads = {}
        for i, task in enumerate(TASKS):
            head = _head(model, task)
            heads.update(zip([n for n, _ in head], _grad(torch.exp(s[i]) * losses[i], head, retain_graph=True)))
        s_grad = torch.exp(s) * losses.detach() - 1  # ∂/∂s of e^s L - s, at w + e
    method = get_method("imtl", num_tasks=2)
    expected = _split(method.aggregate(rows), shared)
    expected.update(heads)
    _assert_grads(got, expected)
    torch.testing.assert_close(engine.method.s.grad, s_grad, rtol=RTOL, atol=ATOL)


def test_sam_with_a_representation_method(text):
    """MGDA-UB at w + e: MGDA's weights from the per-task gradients at the shared features, backpropagated once."""
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, "mgda_ub", "sam", rho=0.5), model, [batch])
    params, shared = _trainable(model), _shared(model)
    e = _unit(params, _grad(torch.stack(_losses(model, batch, TASKS)).sum(), params), 0.5)
    expected = {}
    with _moved(params, e):
        outputs = model(batch, return_representations=True)
        (features,) = outputs.representations.values()
        losses = [outputs.losses[t] for t in TASKS]
        rows = torch.stack([torch.autograd.grad(loss, features, retain_graph=True)[0].reshape(-1) for loss in losses])
        solver = get_method("mgda", num_tasks=2)
        solver.aggregate(rows)
        weights = solver.last_weights
        combined = weights[0] * losses[0] + weights[1] * losses[1]
        expected.update(zip([n for n, _ in shared], _grad(combined, shared, retain_graph=True)))
        for loss, task in zip(losses, TASKS):
            expected.update(zip([n for n, _ in _head(model, task)], _grad(loss, _head(model, task), retain_graph=True)))
    _assert_grads(got, expected)


# ------------------------------------------------------------------------------------------- 2. F-MTL
FMTL_METHODS = [
    pytest.param("mgda", None, id="mgda"),
    pytest.param("imtl", {"loss_balancing": False}, id="imtl"),
    pytest.param("cagrad", None, id="cagrad"),
    pytest.param("upgrad", None, id="upgrad"),
]


def _conflicting_batch(model, make_batch):
    """The first batch on which the two tasks' gradients conflict (g_1 · g_2 < 0): there non-conflicting methods
    (UPGrad) are not the mean, so the decomposition of F-MTL is observable."""
    shared = _shared(model)
    for offset in range(0, 400, 8):
        batch = make_batch(offset)
        losses = _losses(model, batch, TASKS)
        g1, g2 = (_flat(_grad(loss, shared, retain_graph=True), shared) for loss in losses)
        if float(g1 @ g2) < 0:
            return batch
    raise AssertionError("no batch with conflicting task gradients in the first 400 questions")


@pytest.mark.parametrize(("method", "method_kwargs"), FMTL_METHODS)
def test_fmtl_equals_algorithm_1(text, method, method_kwargs):
    model, make_batch = text
    batch = _conflicting_batch(model, make_batch)
    engine = _engine(model, TASKS, method, "fmtl", method_kwargs=method_kwargs, rho=0.5)
    (problem,) = engine.problems
    assert engine.block_rows(problem, "rows/flat").shape == engine.block_rows(problem).shape == (2, problem.size)
    assert engine.sharpness.flat_methods[0] is not engine.method  # F-MTL's own copy, with its own state
    got = _run(engine, model, [batch])
    expected = expected_fmtl(model, [batch], TASKS, method, 0.5, method_kwargs=method_kwargs)
    _assert_grads(got, expected)
    # the decomposition matters: AGG(g) + AGG(h) is neither AGG(g) alone nor AGG(g^SAM) ("direct")
    parts = fmtl_reference(model, batch, TASKS, 0.5)
    kwargs = method_kwargs or {}
    direct = get_method(method, num_tasks=2, **kwargs).aggregate(parts["loss_rows"] + parts["flat_rows"])
    no_flat = get_method(method, num_tasks=2, **kwargs).aggregate(parts["loss_rows"])
    shared = [n for n, _ in _shared(model)]
    for other in (direct, no_flat):
        assert _distance(got, {n: v for n, v in _split(other, _shared(model)).items() if n in shared}) > 100 * ATOL


def test_fmtl_with_ew_is_the_mean_of_the_per_task_sam_gradients(text):
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, "ew", "fmtl", rho=0.5), model, [batch])
    parts = fmtl_reference(model, batch, TASKS, 0.5)
    sam_rows = parts["loss_rows"] + parts["flat_rows"]  # g_i^SAM
    expected = _split(sam_rows.mean(0), _shared(model))
    expected.update(parts["heads"])
    _assert_grads(got, expected)
    # F-MTL is not SAM: each task is perturbed along its own gradient, not along the joint one
    assert _distance(got, expected_sam(model, [batch], TASKS, "ew", 0.5)) > 100 * ATOL


def test_fmtl_with_a_random_loss_weighting_draws_one_set_of_weights(text):
    """A linear aggregator with the step's weights λ: AGG(g) + AGG(h) = Σ λ_i g_i^SAM (Phan et al., arXiv 2211.13723, EW)."""
    model, make_batch = text
    batch = make_batch()
    engine = _engine(model, TASKS, "rlw", "fmtl", rho=0.5)
    got = _run(engine, model, [batch])
    weights = engine.method.last_weights
    assert weights is not None and not torch.allclose(weights, torch.full((2,), 0.5))
    parts = fmtl_reference(model, batch, TASKS, 0.5)
    expected = _split(weights @ (parts["loss_rows"] + parts["flat_rows"]), _shared(model))
    expected.update(parts["heads"])
    _assert_grads(got, expected)


def test_fmtl_turns_a_representation_method_into_its_parameter_form(text):
    """Under F-MTL, MGDA-UB acts on the parameter Jacobian: it is F-MGDA."""
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, "mgda_ub", "fmtl", rho=0.5), model, [batch])
    _assert_grads(got, expected_fmtl(model, [batch], TASKS, "mgda", 0.5))


def test_fmtl_adaptive_matches_the_released_code(text):
    """``sam_adaptive=True, sam_eta=0``: e = ρ w² g / ‖|w| g‖ on every parameter, separate norms (nyuv2)."""
    model, make_batch = text
    batch = make_batch()
    got = _run(_engine(model, TASKS, "mgda", "fmtl", rho=2.0, adaptive=True, eta=0.0), model, [batch])
    _assert_grads(got, expected_fmtl(model, [batch], TASKS, "mgda", 2.0, every_parameter(0.0)))


# --------------------------------------------------------------------------------- 3. exact restore
@pytest.mark.parametrize("method", ["ew", "upgrad", "mgda_ub"])
@pytest.mark.parametrize(
    ("variant", "options"),
    [("sam", {"rho": 0.5}), ("sam", {"rho": 2.0, "adaptive": True}), ("asam", {"rho": 2.0}), ("fmtl", {"rho": 0.5})],
    ids=["sam", "sam-adaptive", "asam", "fmtl"],
)
def test_weights_are_restored_bit_for_bit(text, method, variant, options):
    model, make_batch = text
    batch = make_batch()
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    engine = _engine(model, TASKS, method, variant, **options)
    engine.micro_step(model, batch, step=0, grad_scale=2.0**10)
    engine.finalize(0)
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert torch.equal(tensor.detach(), before[name]), name
    # ... which ``w + e - e`` would not give: the test can tell an exact restore from a subtraction
    params = _trainable(model)
    e = engine.sharpness.perturbation(params, _grad(torch.stack(_losses(model, batch, TASKS)).sum(), params))
    assert any(not torch.equal((p.detach() + d) - d, p.detach()) for (_, p), d in zip(params, e) if d is not None)


@pytest.mark.parametrize("variant", ["sam", "asam", "fmtl"])
def test_the_graph_at_the_weights_is_freed_before_the_perturbed_passes(text, variant):
    """Peak memory: an activation of the forward at w is gone when the perturbed forwards run (F-MTL's K
    per-task backwards at w must not retain the graph through its K perturbed passes)."""
    model, make_batch = text
    seen, alive = [], []

    def hook(module, inputs, output):
        gc.collect()
        alive.append([ref() is not None for ref in seen])
        seen.append(weakref.ref(output))

    handle = model.encoders["text"].encoder.layer[0].intermediate.register_forward_hook(hook)
    try:
        _run(_engine(model, TASKS, "mgda", variant, rho=0.5), model, [make_batch()])
    finally:
        handle.remove()
    assert len(alive) == (3 if variant == "fmtl" else 2)  # the forward at w, then one per perturbation
    assert not any(any(flags) for flags in alive[1:]), alive


# ------------------------------------------------------------------------------------------- 4. BatchNorm
def _bn_state(model):
    return {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize(
    ("variant", "method"),
    [("sam", "ew"), ("sam", "mgda"), ("sam", "mgda_ub"), ("asam", "upgrad"), ("fmtl", "mgda"), ("fmtl", "ew")],
)
def test_batch_norm_statistics_update_once_per_step(vision_bn, variant, method):
    model, make_batch = vision_bn
    batch = make_batch()
    start = copy.deepcopy(model.state_dict())
    try:
        plain = copy.deepcopy(model)
        with torch.no_grad():
            plain(batch)  # one ordinary forward in train mode
        expected = _bn_state(plain)
        engine = _engine(model, VISION_TASKS, method, variant, rho=0.5)
        engine.micro_step(model, batch, step=0)
        engine.finalize(0)
        got = _bn_state(model)
        for name, value in expected.items():
            assert torch.equal(got[name], value), name
        assert all(int(v) == 1 for n, v in got.items() if n.endswith("num_batches_tracked"))
        assert any(not torch.equal(v, start[n]) for n, v in got.items() if "running_mean" in n)
        assert all(torch.isfinite(p.grad).all() for _, p in _trainable(model))
    finally:
        model.load_state_dict(start)


def test_frozen_batch_norm_normalises_with_batch_statistics(vision_bn):
    """Inside `frozen_batch_norm` a train-mode forward gives an ordinary forward's output; no statistic moves."""
    model, make_batch = vision_bn
    batch = make_batch()
    start = copy.deepcopy(model.state_dict())
    try:
        with torch.no_grad():
            with frozen_batch_norm(model):
                frozen = model(batch).losses
            assert _bn_state(model).keys() and all(torch.equal(v, start[n]) for n, v in _bn_state(model).items())
            ordinary = model(batch).losses
        for task in VISION_TASKS:
            assert torch.equal(frozen[task], ordinary[task])
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    finally:
        model.load_state_dict(start)


# ------------------------------------------------------------------------------------------------ 5. bf16
@pytest.mark.parametrize(("variant", "method"), [("sam", "upgrad"), ("fmtl", "mgda")])
def test_bf16_training_runs(tmp_path, trec_sample, trec_tokenizer, variant, method):
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
    ]
    model = MultiTaskModel.from_encoders({"text": tiny_text_encoder(trec_tokenizer.vocab_size)}, tasks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MultiTaskTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
        bf16=True,
        use_cpu=True,
        mtl_method=method,
        sam=variant,
        sam_rho=0.05,
    )
    data = {"coarse": trec_sample["train"].select(range(64)), "fine": trec_sample["train"].select(range(64))}
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, processing_class={"text": trec_tokenizer})
    assert trainer.accelerator.mixed_precision == "bf16"
    seen = []
    hook = model.heads["coarse"].classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        trainer.train()
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # the forwards ran under bf16 autocast
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    for task in TASKS:
        assert all(math.isfinite(e[f"loss/{task}"]) for e in trainer.state.log_history if "loss" in e)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n.startswith("heads."))
    name = "encoders.text.embeddings.LayerNorm.weight"
    assert not torch.equal(dict(model.named_parameters())[name].detach(), before[name])


# ----------------------------------------------------------------------------------------------- 6. fp16
FP16_CASES = [("sam", "ew"), ("sam", "mgda"), ("asam", "upgrad"), ("fmtl", "mgda"), ("fmtl", "cagrad"), ("fmtl", "ew")]


@pytest.mark.parametrize(("variant", "method"), FP16_CASES)
def test_loss_scale_multiplies_the_written_gradients(text, variant, method):
    """The perturbation ignores the scale S; the rows are unscaled before the (non-linear) method and the update
    is scaled back, so every ``.grad`` is S times the unscaled run's."""
    model, make_batch = text
    batch = make_batch()
    reference = _run(_engine(model, TASKS, method, variant, rho=0.5), model, [batch])
    scaled = _run(_engine(model, TASKS, method, variant, rho=0.5), model, [batch], grad_scale=2.0**10)
    assert set(scaled) == set(reference)
    for name, value in reference.items():
        assert (value is None) == (scaled[name] is None), name
        if value is not None:
            torch.testing.assert_close(scaled[name], value * 2.0**10, rtol=1e-5, atol=1e-6 * 2.0**10, msg=name)


def _nan_batch(make_batch):
    batch = make_batch()
    for sub in batch.values():
        sub["pixel_values"] = sub["pixel_values"].clone()
        sub["pixel_values"][0, 0, 0, 0] = float("nan")
    return batch


@pytest.mark.parametrize(("variant", "method"), FP16_CASES)
def test_a_non_finite_loss_makes_the_shared_update_nan(vision_bn, variant, method):
    model = copy.deepcopy(vision_bn[0])  # the NaN forward spoils the BatchNorm statistics
    engine = _engine(model, VISION_TASKS, method, variant, rho=0.5)
    got = _run(engine, model, [_nan_batch(vision_bn[1])], grad_scale=2.0**10)
    shared = [n for n, _ in _shared(model)]
    if engine.mode == "rows":
        assert all(torch.isnan(got[n]).all() for n in shared)
    else:  # loss weighting writes the one backward as it is: non-finite, which the scaler sees
        assert not all(torch.isfinite(got[n]).all() for n in shared)


@pytest.mark.parametrize(("variant", "method"), [("sam", "mgda"), ("fmtl", "mgda"), ("fmtl", "ew")])
def test_grad_scaler_unscales_once_and_skips_a_non_finite_step(vision_bn, variant, method):
    model, make_batch = vision_bn
    start = copy.deepcopy(model.state_dict())
    batch = make_batch()
    try:
        expected = _run(_engine(model, VISION_TASKS, method, variant, rho=0.5), model, [batch])
    finally:
        model.load_state_dict(start)
    model = copy.deepcopy(model)
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    engine = _engine(model, VISION_TASKS, method, variant, rho=0.5)
    # the scale a trainer reads: `scaler.scale` also creates the scaler's state, which `unscale_` / `step` need
    grad_scale = float(scaler.scale(torch.ones(())))
    weights = {n: p.detach().clone() for n, p in _trainable(model)}

    optimizer.zero_grad(set_to_none=True)
    engine.micro_step(model, batch, step=0, grad_scale=grad_scale)
    engine.finalize(0)
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(optimizer)  # one unscale per step: the engine must not have done one
    for name, p in _trainable(model):
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10
    for name, p in _trainable(model):
        torch.testing.assert_close(p.detach(), weights[name] - 0.1 * expected[name], rtol=1e-5, atol=1e-7, msg=name)

    # a NaN loss: the step is skipped and the scale backs off
    stepped = {n: p.detach().clone() for n, p in _trainable(model)}
    optimizer.zero_grad(set_to_none=True)
    grad_scale = float(scaler.scale(torch.ones(())))
    engine.micro_step(model, _nan_batch(make_batch), step=1, grad_scale=grad_scale)
    engine.finalize(1)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for name, p in _trainable(model):
        assert torch.equal(p.detach(), stepped[name]), name


def _text_trainer(tmp_path, trec_sample, trec_tokenizer, name, **overrides):
    tasks = [
        Task("coarse", encoder="text", num_labels=6),
        Task("fine", encoder="text", num_labels=trec_sample["train"].features["fine"].num_classes),
    ]
    model = MultiTaskModel.from_encoders(
        {"text": tiny_text_encoder(trec_tokenizer.vocab_size, dropout=0.0)}, tasks, head_dropout=0.0
    )
    options = dict(
        output_dir=str(tmp_path / name),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=0.5,
        optim="sgd",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    options.update(overrides)
    data = {"coarse": trec_sample["train"].select(range(64)), "fine": trec_sample["train"].select(range(64))}
    return MultiTaskTrainer(
        model=no_dropout(model),
        args=MultiTaskTrainingArguments(**options),
        train_dataset=data,
        processing_class={"text": trec_tokenizer},
    )


def test_trainer_fp16_grad_scaler_path_matches_the_unscaled_run(tmp_path, trec_sample, trec_tokenizer):
    """The Trainer's own fp16 path: Accelerate's GradScaler (given here by hand, since Accelerate makes none on a
    CPU) scales the engine's backward, unscales once and steps; the weights match a run without a scaler.

    No clipping: on a CPU Accelerate's `clip_grad_norm_` does not unscale (its mixed precision is "no"), so the
    scaler's one `unscale_` happens in `scaler.step`."""
    options = dict(mtl_method="mgda", sam="fmtl", sam_rho=0.5, max_grad_norm=0.0)
    plain = _text_trainer(tmp_path, trec_sample, trec_tokenizer, "plain", **options)
    plain.train()
    scaled = _text_trainer(tmp_path, trec_sample, trec_tokenizer, "scaled", **options)
    scaled.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # what Accelerate builds for fp16
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0**10  # no step was skipped
    for (name, a), (_, b) in zip(scaled.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------- 7. gradient accumulation
@pytest.mark.parametrize(("variant", "method"), [("sam", "ew"), ("sam", "upgrad"), ("fmtl", "mgda"), ("fmtl", "ew")])
def test_accumulation_equals_the_large_batch(text, variant, method):
    """Exact SAM (the default ``sam_scope="step"``): two micro-batches of 8 give the step of one batch of 16,
    the perturbation following the whole step's gradient and both micro-batches replayed at it."""
    model, make_batch = text
    first, second = make_batch(0), make_batch(8)
    got = _run(_engine(model, TASKS, method, variant, rho=0.5), model, [first, second])
    reference = expected_fmtl if variant == "fmtl" else expected_sam
    _assert_grads(got, reference(model, [make_batch(0, 16)], TASKS, method, 0.5))
    # not per-micro-batch perturbation (m-sharpness), which gives another step
    separate = reference(model, [first, second], TASKS, method, 0.5)
    assert _distance(got, separate) > 100 * ATOL


@pytest.mark.parametrize(("variant", "method"), [("sam", "ew"), ("sam", "upgrad"), ("fmtl", "mgda")])
def test_micro_batch_scope_perturbs_each_micro_batch_along_its_own_gradient(text, variant, method):
    model, make_batch = text
    first, second = make_batch(0), make_batch(8)
    got = _run(_engine(model, TASKS, method, variant, rho=0.5, scope="micro_batch"), model, [first, second])
    reference = expected_fmtl if variant == "fmtl" else expected_sam
    _assert_grads(got, reference(model, [first, second], TASKS, method, 0.5))
    # m-sharpness, not SAM on the full batch of 16
    whole = _run(_engine(model, TASKS, method, variant, rho=0.5), model, [make_batch(0, 16)])
    assert _distance(got, {n: v for n, v in whole.items() if v is not None}) > 100 * ATOL


# ------------------------------------------------------------------------- 8. every Jacobian method
JACOBIAN_METHODS = [name for name in list_methods() if get_method(name, num_tasks=2).requires_jacobian]


@pytest.mark.parametrize("variant", list_sharpness())
@pytest.mark.parametrize("method", JACOBIAN_METHODS)
def test_every_jacobian_method_runs_with_every_variant(text, method, variant):
    model, make_batch = text
    engine = _engine(model, TASKS, method, variant, rho=0.5 if variant != "sam" else 0.05)
    got = _run(engine, model, [make_batch()])
    for name, _ in _trainable(model):
        assert got[name] is not None, f"{name} got no gradient"
        assert torch.isfinite(got[name]).all(), name
    for p in engine.method_params:
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_the_variants_are_registered():
    assert list_sharpness() == ["asam", "fmtl", "sam"]
    with pytest.raises(ValueError, match="rho"):
        get_sharpness("sam", rho=0.0)

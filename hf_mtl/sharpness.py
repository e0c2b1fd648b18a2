"""Sharpness-aware training inside ``training_step``: SAM, ASAM and F-MTL.

Each variant is a small registered unit (`list_sharpness()`, `get_sharpness(name, ...)`) that owns its
state (SAM's ascent gradient, F-MTL's flat rows, its per-task gradients at θ and its second methods) and
talks to the engine (`hf_mtl.engine.MultiTaskEngine`) through a small protocol:

- ``segments(engine, ...)`` declares the buffer segments it needs (reduced before its perturbed passes, or
  with the step), ``bind(engine)`` takes its views of them;
- ``micro_step(engine, model, batch, index)`` runs one micro-step and returns the losses at the
  unperturbed weights; at the window's last micro-step (``scope="step"``) it reduces its early segments,
  perturbs, replays every micro-batch of the window through the engine's primitives, and restores;
- ``combine(engine, problem, ...)`` maps a problem's rows to its update (F-MTL: the method on the loss rows
  plus its copy on the flat rows), ``apply_transform`` applies a loss transform's chain rule to its rows;
- ``methods()``, ``state_dict()`` / ``load_state_dict()``: its own method instances and state.

Shared rules (SAM: Foret et al., ICLR 2021; ASAM: Kwon et al., ICML 2021; F-MTL: Phan et al., arXiv
2211.13723; davda54/sam and the papers' code):

- **Exact by default** (``scope="step"``): the perturbation follows the gradient of the whole step, every
  micro-batch on every rank (the first pass accumulates it and one collective sums it), and the second pass
  replays the same micro-batches at the perturbed weights; so gradient accumulation equals the large batch
  and two processes equal one. ``scope="micro_batch"`` perturbs each micro-batch along its own gradient on
  its own rank ("m-sharpness"), what data-parallel SAM does.
- **Restore bit for bit.** The weights are copied before the perturbation and copied back after the
  perturbed passes (`perturbed_weights`), not ``w + e - e``.
- **BatchNorm.** Running statistics update in the first forward only (`frozen_batch_norm` during the
  perturbed forwards).
- **Mixed precision.** The perturbation ρ g/‖g‖ is invariant to the loss scale, so the ascent uses the
  GradScaler's scaled gradients as they are (norm in float32); a non-finite ascent gradient gives no
  perturbation. F-MTL's ``h_i = g_i^SAM - g_i`` is formed after both are unscaled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .methods.base import GradientMethod
from .registry import Registry

if TYPE_CHECKING:
    from .engine import MultiTaskEngine

SHARPNESS: Registry[type[Sharpness]] = Registry("sharpness-aware variant")

#: Added to gradient norms before dividing, as in davda54/sam.
_NORM_EPS = 1e-12


def list_sharpness() -> list[str]:
    """The names of the registered sharpness-aware variants."""
    return SHARPNESS.names()


def get_sharpness(name: str, **kwargs: Any) -> Sharpness:
    """Builds the variant registered as ``name`` (`sam`, `asam`, `fmtl`)."""
    return SHARPNESS.build(name, **kwargs)


@contextlib.contextmanager
def perturbed_weights(params: Sequence[nn.Parameter], perturbation: Sequence[Tensor | None]) -> Iterator[None]:
    """Adds ``perturbation`` to ``params`` for the duration of the block, then restores the saved copies.

    Writes go through ``.data`` so that autograd's version counters do not change and the graph of
    the forward at the unperturbed weights stays usable.
    """
    saved = []
    for p, e in zip(params, perturbation):
        if e is None:
            continue
        saved.append((p, p.data.clone()))
        p.data.add_(e.to(p.dtype))
    try:
        yield
    finally:
        for p, copy_ in saved:
            p.data.copy_(copy_)


@contextlib.contextmanager
def frozen_batch_norm(model: nn.Module) -> Iterator[None]:
    """Stops BatchNorm layers from updating running statistics (batch statistics still normalise)."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and module.training:
            module.track_running_stats = False
            changed.append(module)
    try:
        yield
    finally:
        for module in changed:
            module.track_running_stats = True


def _norm(tensors: Sequence[Tensor | None]) -> Tensor:
    present = [t.float() for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in present]))


class Sharpness:
    """Base of the sharpness-aware variants.

    Args:
        rho (`float`, *optional*, defaults to `0.05`): radius ρ of the perturbation.
        adaptive (`bool`, *optional*, defaults to `False`): ASAM scaling, ``e = ρ T² g / ‖T g‖``.
        eta (`float`, *optional*, defaults to `0.01`): η of ``T = |w| + η``.
        scope (`str`, *optional*, defaults to `"step"`): ``"step"`` (the gradient of the whole step, exact
            under accumulation and across ranks) or ``"micro_batch"`` (m-sharpness).

    Class attributes:
        per_task (`bool`): whether the variant needs per-task rows whatever the method (F-MTL).
    """

    name = ""
    per_task = False
    SCOPES = ("step", "micro_batch")

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, scope: str = "step") -> None:
        if not rho > 0:
            raise ValueError(f"`sam_rho` must be > 0, got {rho!r}")
        if not eta >= 0:
            raise ValueError(f"`sam_eta` must be >= 0, got {eta!r}")
        if scope not in self.SCOPES:
            raise ValueError(f"`sam_scope` must be one of {', '.join(self.SCOPES)}, got {scope!r}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.scope = scope

    # ------------------------------------------------------------------ the protocol
    def segments(
        self, engine: MultiTaskEngine, *, rows_size: int, plain_size: int
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], bool]:
        """The buffer segments this variant needs: ``(early, late, rows_early)``; ``rows_early`` asks for the
        engine's rows in the early span (reduced before the perturbed passes)."""
        return [], [], False

    def bind(self, engine: MultiTaskEngine) -> None:
        """Takes the views of the segments, once the engine has allocated its buffer."""

    def begin_window(self, engine: MultiTaskEngine) -> None:
        """Called when a step opens (the buffer is zeroed)."""

    def micro_step(
        self, engine: MultiTaskEngine, model: nn.Module, batch: Mapping[str, Any], index: int
    ) -> dict[str, Tensor]:
        """One micro-step; returns the normalised task losses at the unperturbed weights (detached)."""
        raise NotImplementedError

    def combine(
        self, engine: MultiTaskEngine, problem: Any, names: Sequence[str], rows: Tensor, **kwargs: Any
    ) -> Tensor:
        """A problem's update from its (unscaled, transformed) rows: the method's by default."""
        return engine.aggregate(problem.method, rows, **kwargs)

    def apply_transform(self, engine: MultiTaskEngine, derivative: Tensor) -> None:
        """The chain rule of an elementwise loss transform on this variant's rows (none by default)."""

    def methods(self) -> list[GradientMethod]:
        """Method instances of this variant's own, whose per-step hooks the engine runs."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ perturbation
    def scaling(self, name: str, param: nn.Parameter) -> Tensor | None:
        """ASAM's ``T_w`` for one parameter (`None` = 1)."""
        return param.detach().abs() + self.eta if self.adaptive else None

    def perturbation(
        self, named_params: Sequence[tuple[str, nn.Parameter]], grads: Sequence[Tensor | None]
    ) -> list[Tensor | None]:
        """``e = ρ g / ‖g‖`` (SAM) or ``ρ T² g / ‖T g‖`` (adaptive), over all the given parameters together.
        A non-finite or zero gradient gives no perturbation."""
        scales = [self.scaling(n, p) if g is not None else None for (n, p), g in zip(named_params, grads)]
        scaled = [None if g is None else (g.float() if t is None else t * g.float()) for g, t in zip(grads, scales)]
        norm = _norm(scaled)
        if not torch.isfinite(norm) or norm == 0:
            return [None] * len(grads)
        factor = self.rho / (norm + _NORM_EPS)
        return [None if s is None else (s if t is None else t * s) * factor for s, t in zip(scaled, scales)]


@SHARPNESS.register("sam")
class SAM(Sharpness):
    """SAM (Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412).

    Per step (``scope="step"``)::

        g  = ∇ C(w)                       C: the step's objective, summed over micro-batches and ranks
                                             (Σ_i w_i L_i for loss-weighting methods, Σ_i L_i otherwise)
        e  = ρ g / (‖g‖ + 1e-12)          over every trainable model parameter
        the engine's step (per-task rows, combined loss or features) at w + e over the same micro-batches;
        w restored exactly

    With ``sam_adaptive=True`` this is ASAM's scaling with ``T_w = |w| + η`` on every parameter
    (davda54/sam's ``adaptive=True``, plus η); `asam` follows the official ASAM code instead. Cost: one
    backward of the objective per micro-batch, then the method's own step at the perturbed weights.
    """

    def segments(self, engine, *, rows_size, plain_size):  # noqa: ANN001, ANN201
        if self.scope != "step":
            return [], [], False
        return [("sam/ascent", sum(p.numel() for p in engine.model_params))], [], False

    def bind(self, engine: MultiTaskEngine) -> None:
        from .engine.buffer import views

        self._pairs = (
            list(zip(engine.model_params, views(engine.buffer["sam/ascent"], engine.model_params)))
            if self.scope == "step"
            else []
        )

    def micro_step(
        self, engine: MultiTaskEngine, model: nn.Module, batch: Mapping[str, Any], index: int
    ) -> dict[str, Tensor]:
        losses = engine.forward_losses(model, batch, index).losses
        engine.ensure_loss_weights(model, losses, index)
        engine.record_losses(losses)
        detached = {task: loss.detach() for task, loss in losses.items()}
        params = engine.model_params
        objective = engine.objective(losses) * engine.grad_scale
        del losses  # with `objective`, the only references to the graph at w: freed by its backward
        if self.scope == "micro_batch":
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            del objective
            perturbation = self.perturbation(engine.named(params), grads)
            with perturbed_weights(params, perturbation), frozen_batch_norm(model):
                _reset_loss_dependent_weights(engine)
                engine.accumulate(model, batch, index, perturbed=True)
            return detached
        engine.backward_into(objective, self._pairs)
        del objective
        if engine.is_last_micro_step:
            engine.buffer.all_reduce_early()
            perturbation = self.perturbation(engine.named(params), [view for _, view in self._pairs])
            with perturbed_weights(params, perturbation), frozen_batch_norm(model):
                _reset_loss_dependent_weights(engine)
                for position, replayed in enumerate(engine.window_batches):
                    engine.accumulate(model, replayed, position, perturbed=True)
        return detached


@SHARPNESS.register("asam")
class ASAM(SAM):
    """ASAM (Kwon et al., ICML 2021, https://arxiv.org/abs/2102.11600), as the official ``SamsungLabs/ASAM``
    code::

        T_w = |w| + η   for parameters whose name contains "weight",   T_w = 1 otherwise
        e   = ρ T_w² g / ‖T_w g‖

    ``adaptive`` is always on; ρ is typically ten times SAM's (0.5 on CIFAR-10, η = 0.01).
    """

    def __init__(self, rho: float = 0.5, adaptive: bool = True, eta: float = 0.01, scope: str = "step") -> None:
        super().__init__(rho=rho, adaptive=True, eta=eta, scope=scope)

    def scaling(self, name: str, param: nn.Parameter) -> Tensor | None:
        return param.detach().abs() + self.eta if "weight" in name else None


@SHARPNESS.register("fmtl")
class FMTL(Sharpness):
    """F-MTL: task-based flat regions (Phan et al., arXiv 2211.13723, Algorithm 1).

    Per step, for every task i present::

        g_i, g_i^ns   = ∇_sh L_i(θ), ∇_i L_i(θ)                          K backwards at θ (the step's, summed
                                                                        over micro-batches and ranks)
        ε_sh^i        = ρ g_i / ‖g_i‖,     ε_ns^i = ρ g_i^ns / ‖g_i^ns‖     (separate norms, as Alg. 1
                                                                        and the NYUv2 script)
        g_i^SAM, g_i^ns,SAM = ∇ L_i(θ_sh + ε_sh^i, θ_i + ε_ns^i)          K more forward + backward
        h_i           = g_i^SAM − g_i                                    the "flat" gradient

    and, per problem, ``g_sh = AGG(g_1..g_K) + AGG'(h_1..h_K)`` (the paper's "Ours": the same aggregator
    applied separately, then a plain sum; ``AGG'`` is a copy of the problem's method with its own state —
    GradVac's EMA, Nash-MTL's warm start — and the same learnable parameters, which learn from the loss
    rows only); every task-private parameter (the head) gets ``g_i^ns,SAM``. F-MTL keeps its flat rows, its
    gradients of the private parameters at θ and its flat methods itself; the engine keeps the loss rows.

    With ``adaptive=True`` the perturbation is ``ρ T² g / ‖T g‖`` with ``T = |w| + η`` on every parameter,
    biases included; the released code has η = 0 and ρ = 2 (set ``sam_eta=0`` to match it). Shared
    parameters outside surgery (``mtl_surgery_parameters``) are not perturbed and get ``Σ_i`` of their
    perturbed-point gradients.

    Representation methods act here on the parameter Jacobian (GradDrop with sign 1 as in the CAGrad code and
    TorchJD; MGDA-UB becomes MGDA). Loss-weighting methods combine the rows with their loss weights (``ew``:
    the mean of the g_i^SAM).
    """

    per_task = True

    def segments(self, engine, *, rows_size, plain_size):  # noqa: ANN001, ANN201
        return [("fmtl/theta", plain_size)], [("rows/flat", rows_size)] if rows_size else [], True

    def bind(self, engine: MultiTaskEngine) -> None:
        from .engine.buffer import views

        self.theta_views = views(engine.buffer["fmtl/theta"], engine.plain_params)
        self.flat_methods = [engine._copy_method(problem.method) for problem in engine.problems]
        for problem, method in zip(engine.problems, self.flat_methods):
            method.bind_parameter_layout([(n, p.numel()) for n, p in problem.block.params])

    def methods(self) -> list[GradientMethod]:
        return list(getattr(self, "flat_methods", []))

    def micro_step(
        self, engine: MultiTaskEngine, model: nn.Module, batch: Mapping[str, Any], index: int
    ) -> dict[str, Tensor]:
        losses = engine.forward_losses(model, batch, index).losses
        engine.record_losses(losses)
        detached = {task: loss.detach() for task, loss in losses.items()}
        if self.scope == "micro_batch":
            self._micro_batch_step(engine, model, batch, index, losses)
            return detached
        engine.backward_rows(batch, losses, plain_area=self.theta_views)
        del losses
        if engine.is_last_micro_step:
            engine.row_buffer.all_reduce_early()
            if engine.buffer is not engine.row_buffer:
                engine.buffer.all_reduce_early()
            for task in engine.present:
                shared = engine.row_pairs(task)
                private = engine.plain_pairs(engine.task_private_indices[task], self.theta_views)
                self._perturbed_passes(
                    engine, model, task, shared, private, [v for _, v in shared], [v for _, v in private], None
                )
        return detached

    def _perturbed_passes(
        self,
        engine: MultiTaskEngine,
        model: nn.Module,
        task: str,
        shared: Sequence[tuple[nn.Parameter, Tensor]],
        private: Sequence[tuple[nn.Parameter, Tensor]],
        shared_grads: Sequence[Tensor | None],
        private_grads: Sequence[Tensor | None],
        only: int | None,
    ) -> None:
        """Task ``task``'s gradients at ``θ + ε^i`` over the window's micro-batches (or micro-batch ``only``):
        its block gradients into the flat rows, its own parameters' into the plain segment."""
        shared_params, private_params = [p for p, _ in shared], [p for p, _ in private]
        perturbation = self.perturbation(engine.named(shared_params), shared_grads) + self.perturbation(
            engine.named(private_params), private_grads
        )
        targets = engine.task_pairs(task, "rows/flat")
        with perturbed_weights(shared_params + private_params, perturbation), frozen_batch_norm(model):
            for position, replayed in enumerate(engine.window_batches):
                if (only is not None and position != only) or task not in engine._window_counts[position]:
                    continue
                single = engine.forward_losses(model, _single_task_batch(replayed, task), position).losses
                engine.record_losses(single, perturbed=True)
                engine.backward_into(single[task] * engine.grad_scale, targets)

    def _micro_batch_step(
        self, engine: MultiTaskEngine, model: nn.Module, batch: Mapping[str, Any], index: int, losses: dict
    ) -> None:
        """m-sharpness: each task perturbed along this micro-batch's own gradients on this rank."""
        at_theta = []
        for task, retain in engine.task_order(batch, losses):
            shared = engine.row_pairs(task)
            private = engine.plain_pairs(engine.task_private_indices[task])
            params = [p for p, _ in shared] + [p for p, _ in private]
            grads = torch.autograd.grad(
                losses[task] * engine.grad_scale, params, retain_graph=retain, allow_unused=True
            )
            present = [(v, g) for (_, v), g in zip(shared, grads) if g is not None]
            if present:
                torch._foreach_add_([v for v, _ in present], [g.to(v.dtype) for v, g in present])
            at_theta.append((task, shared, private, grads[: len(shared)], grads[len(shared) :]))
        del losses
        for task, shared, private, shared_grads, private_grads in at_theta:
            self._perturbed_passes(engine, model, task, shared, private, shared_grads, private_grads, index)

    def apply_transform(self, engine: MultiTaskEngine, derivative: Tensor) -> None:
        for position, task in enumerate(engine.present):
            pairs = engine.row_pairs(task, "rows/flat")
            if pairs:
                torch._foreach_mul_([v for _, v in pairs], derivative[position].to(pairs[0][1].dtype))

    def combine(
        self, engine: MultiTaskEngine, problem: Any, names: Sequence[str], rows: Tensor, **kwargs: Any
    ) -> Tensor:
        flat_all = engine.block_rows(problem, "rows/flat")
        if engine.grad_scale != 1.0:
            flat_all.div_(engine.grad_scale)
        if len(names) == len(problem.tasks):
            flat = flat_all.sub_(rows)  # h_i = g_i^SAM - g_i in place: the flat rows are not needed after
        else:
            flat = flat_all[[problem.tasks.index(t) for t in names]] - rows
        generator = kwargs.pop("generator", None)
        state = generator.get_state() if generator is not None else None
        update = engine.aggregate(problem.method, rows, generator=generator, **kwargs)
        auxiliary = getattr(problem.method, "auxiliary_loss", None)  # learnable weights learn from the loss rows
        weights = problem.method.last_weights
        if generator is not None:
            generator.set_state(state)  # the flat rows get the same random draws (RLW's weights)
        flat_method = self.flat_methods[engine.problems.index(problem)]
        update = update + engine.aggregate(flat_method, flat, generator=generator, **kwargs)
        flat_method.auxiliary_loss = None
        problem.method.auxiliary_loss = auxiliary
        problem.method.last_weights = weights
        return update

    def state_dict(self) -> dict[str, Any]:
        return {"flat_methods": [method.state_dict() for method in getattr(self, "flat_methods", [])]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for method, method_state in zip(getattr(self, "flat_methods", []), state.get("flat_methods", [])):
            method.load_state_dict(method_state)


def _reset_loss_dependent_weights(engine: MultiTaskEngine) -> None:
    """A loss-weighting method whose weights depend on the losses weighs the perturbed pass with the weights at the
    perturbed losses (SAM's gradient of C(L(w + e)))."""
    if engine.mode == "combined" and getattr(engine.method, "weights_depend_on_losses", False):
        engine._loss_weights = None


def _single_task_batch(batch: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The sub-batch that carries ``task``'s labels, with only that task's labels."""
    for key, sub_batch in batch.items():
        labels = sub_batch.get("labels") or {}
        if task in labels:
            return {key: {**sub_batch, "labels": {task: labels[task]}}}
    raise KeyError(f"no sub-batch carries labels for task {task!r}")

"""Sharpness-aware training inside ``training_step``: SAM, ASAM and F-MTL (docs/METHODS.md §1-2).

Each variant is a small registered unit (`list_sharpness()`, `get_sharpness(name, ...)`) that drives
one micro-step through the engine's primitives (`hf_mtl.engine.MultiTaskEngine`): a forward and
backward at the current weights, a perturbation, the gradients at the perturbed weights into the
engine's buffer, and an exact restore. They compose with every gradient method.

Shared rules, from METHODS.md §1.6 and §2.3-2.5:

- **Restore bit for bit.** The weights are copied before the perturbation and copied back after the
  perturbed backward (`perturbed_weights`), not ``w + e - e``, so the optimizer steps from exactly
  the weights it would have without SAM.
- **BatchNorm.** Running statistics update in the first forward only: during perturbed forwards
  ``track_running_stats`` is switched off (`frozen_batch_norm`), so batch statistics normalise, and
  neither the running averages nor ``num_batches_tracked`` move.
- **Mixed precision.** The perturbation ρ g/‖g‖ is invariant to the loss scale, so the ascent uses
  the scaled gradients of the GradScaler as they are (norm in float32); a non-finite ascent gradient
  gives no perturbation and the scaler decides about the step from the perturbed gradients. At the
  sync step the engine divides the Jacobian rows by the scale before the method (F-MTL's
  ``h_i = g_i^SAM - g_i`` is formed at one scale, then unscaled with the rows) and multiplies the
  update back, so the written ``.grad`` carry the scale and the GradScaler's single ``unscale_`` and
  inf/NaN check at the optimizer step work as for a plain Trainer.
- **Gradient accumulation** uses per-micro-batch perturbation ("m-sharpness", METHODS.md §2.5): each
  micro-batch is perturbed along its own gradient and its perturbed-point gradients accumulate in the
  engine's buffer. Under DDP each rank perturbs along its own gradient (the rows are averaged once,
  at the sync step), which is what data-parallel SAM does.
"""

from __future__ import annotations

import contextlib
import copy
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

    Class attributes:
        per_task (`bool`): whether the variant needs per-task gradients of the shared parameters
            whatever the method (F-MTL).
        rows_per_task (`int`): Jacobian rows per task in the engine's buffer (F-MTL: the loss row and
            the flat row).
    """

    name = ""
    per_task = False
    rows_per_task = 1

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01) -> None:
        if not rho > 0:
            raise ValueError(f"`sam_rho` must be > 0, got {rho!r}")
        if not eta >= 0:
            raise ValueError(f"`sam_eta` must be >= 0, got {eta!r}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)

    def scaling(self, name: str, param: nn.Parameter) -> Tensor | None:
        """ASAM's ``T_w`` for one parameter (`None` = 1)."""
        return param.detach().abs() + self.eta if self.adaptive else None

    def perturbation(
        self, named_params: Sequence[tuple[str, nn.Parameter]], grads: Sequence[Tensor | None]
    ) -> list[Tensor | None]:
        """``e = ρ g / ‖g‖`` (SAM) or ``ρ T² g / ‖T g‖`` (adaptive), over all the given parameters together.
        A non-finite gradient gives no perturbation."""
        scales = [self.scaling(n, p) if g is not None else None for (n, p), g in zip(named_params, grads)]
        scaled = [None if g is None else (g.float() if t is None else t * g.float()) for g, t in zip(grads, scales)]
        norm = _norm(scaled)
        if not torch.isfinite(norm) or norm == 0:
            return [None] * len(grads)
        factor = self.rho / (norm + _NORM_EPS)
        return [None if s is None else (s if t is None else t * s) * factor for s, t in zip(scaled, scales)]

    def accumulate(
        self,
        engine: MultiTaskEngine,
        model: nn.Module,
        batch: Mapping[str, Any],
        scale: float,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """One micro-step; returns the task losses at the unperturbed weights."""
        raise NotImplementedError

    def make_flat_method(self, method: GradientMethod) -> GradientMethod:
        """The method that combines F-MTL's flat rows (F-MTL only)."""
        raise NotImplementedError(f"{self.name} has no flat rows")


@SHARPNESS.register("sam")
class SAM(Sharpness):
    """SAM (Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412; METHODS.md §2).

    Per micro-batch::

        g  = ∇ C(w)                       C: the training objective (the method's combined loss,
                                             or the sum of the task losses for Jacobian methods)
        e  = ρ g / (‖g‖ + 1e-12)          over every trainable model parameter
        the engine's step (per-task rows or combined loss) at w + e; w restored exactly

    With ``sam_adaptive=True`` this is ASAM's scaling with ``T_w = |w| + η`` on every parameter
    (davda54/sam's ``adaptive=True``, plus η); `asam` follows the official ASAM code instead.
    """

    def accumulate(
        self,
        engine: MultiTaskEngine,
        model: nn.Module,
        batch: Mapping[str, Any],
        scale: float,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        losses = engine.forward_losses(model, batch)
        state = generator.get_state()  # the same random draws (RLW) for ascent and descent
        grads = engine.objective_gradients(losses, generator)
        params = engine.model_params
        named = engine.named(params)
        perturbation = self.perturbation(named, grads)
        generator.set_state(state)
        with perturbed_weights(params, perturbation), frozen_batch_norm(model):
            if engine.method.requires_representation:
                engine.accumulate_representation(model, batch, scale, generator)
            else:
                engine.accumulate(engine.forward_losses(model, batch), scale, generator)
        return {task: loss.detach() for task, loss in losses.items()}


@SHARPNESS.register("asam")
class ASAM(SAM):
    """ASAM (Kwon et al., ICML 2021, https://arxiv.org/abs/2102.11600; METHODS.md §2.1), as the official
    ``SamsungLabs/ASAM`` code::

        T_w = |w| + η   for parameters whose name contains "weight",   T_w = 1 otherwise
        e   = ρ T_w² g / ‖T_w g‖

    ``adaptive`` is always on; ρ is typically ten times SAM's (0.5 on CIFAR-10, η = 0.01).
    """

    def __init__(self, rho: float = 0.5, adaptive: bool = True, eta: float = 0.01) -> None:
        super().__init__(rho=rho, adaptive=True, eta=eta)

    def scaling(self, name: str, param: nn.Parameter) -> Tensor | None:
        return param.detach().abs() + self.eta if "weight" in name else None


@SHARPNESS.register("fmtl")
class FMTL(Sharpness):
    """F-MTL: task-based flat regions (Phan et al., arXiv 2211.13723; METHODS.md §1, Algorithm 1).

    Per micro-batch, for every task i present::

        g_i, g_i^ns   = ∇_sh L_i(θ), ∇_i L_i(θ)                          K backwards at θ
        ε_sh^i        = ρ g_i / ‖g_i‖,     ε_ns^i = ρ g_i^ns / ‖g_i^ns‖     (separate norms, as Alg. 1
                                                                        and the NYUv2 script)
        g_i^SAM, g_i^ns,SAM = ∇ L_i(θ_sh + ε_sh^i, θ_i + ε_ns^i)          K more forward + backward
        h_i           = g_i^SAM − g_i                                    the "flat" gradient

    and at the sync step ``g_sh = AGG(g_1..g_K) + AGG(h_1..h_K)`` (the paper's "Ours": the same
    aggregator applied separately, then a plain sum); every task-private parameter (the head) gets
    ``g_i^ns,SAM``. The engine keeps the loss rows and the flat rows as 2K rows of its buffer.

    With ``adaptive=True`` the perturbation is ``ρ T² g / ‖T g‖`` with ``T = |w| + η`` on every
    parameter, biases included; the released code has η = 0 and ρ = 2 (set ``sam_eta=0`` to match
    it). The second aggregation uses a copy of the method (its own state: GradVac's EMA, Nash-MTL's
    warm start) unless the method has learnable parameters, which must stay the ones the optimizer
    trains; then the same method combines both, and the engine keeps only the loss rows' gradient for
    those parameters (GradNorm's logits learn from the g_i, not from the h_i).

    Representation methods act here on the parameter Jacobian (GradDrop with sign 1 as in the CAGrad
    code and TorchJD; MGDA-UB becomes MGDA). Loss-weighting methods combine the rows with their loss
    weights (``ew``: the mean of the g_i^SAM, METHODS.md §1.3).
    """

    per_task = True
    rows_per_task = 2

    def make_flat_method(self, method: GradientMethod) -> GradientMethod:
        if any(True for _ in method.parameters()):
            return method
        return copy.deepcopy(method)

    def accumulate(
        self,
        engine: MultiTaskEngine,
        model: nn.Module,
        batch: Mapping[str, Any],
        scale: float,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        losses = engine.forward_losses(model, batch)
        names, transformed, ids = engine.stacked(losses)
        detached = {task: loss.detach() for task, loss in losses.items()}
        del losses  # with `transformed`, the only references to the graph at θ: freed after the last backward
        num_tasks = len(engine.task_names)
        shared = engine.row_params
        num_shared = len(shared)
        method_params = [p for _, p in engine.partition.method]
        at_theta: list[tuple[str, tuple[Tensor | None, ...]]] = []
        for position, task in enumerate(names):
            private = [p for _, p in engine.partition.private[task]]
            grads = torch.autograd.grad(
                transformed[position] * engine.grad_scale,
                shared + private + method_params,
                retain_graph=position < len(names) - 1,  # the K perturbed passes must not hold the graph at θ
                allow_unused=True,
            )
            if task in engine.row_index:
                engine.add_row(engine.row(task), grads[:num_shared], scale)
            engine.add_plain(method_params, grads[num_shared + len(private) :], scale)
            at_theta.append((task, grads[: num_shared + len(private)]))
        if method_params and not engine.method.requires_jacobian:
            # loss-weighting methods (UW) learn their parameters from the combined loss
            combined = engine.method.combine_losses(
                transformed.detach(), task_ids=ids if len(names) < num_tasks else None, generator=generator
            )
            grads = torch.autograd.grad(combined * engine.grad_scale, method_params, allow_unused=True)
            engine.add_plain(method_params, grads, scale)
        del transformed
        for task, grads in at_theta:
            private_named = engine.partition.private[task]
            private = [p for _, p in private_named]
            shared_grads, private_grads = grads[:num_shared], grads[num_shared:]
            perturbation = self.perturbation(engine.named(shared), shared_grads) + self.perturbation(
                private_named, private_grads
            )
            with perturbed_weights(shared + private, perturbation), frozen_batch_norm(model):
                single = engine.forward_losses(model, _single_task_batch(batch, task))
                _, single_transformed, _ = engine.stacked(single)
                sam_grads = torch.autograd.grad(
                    single_transformed[0] * engine.grad_scale, shared + private, allow_unused=True
                )
            flat = [
                None if s is None and g is None else (s if s is not None else 0) - (g if g is not None else 0)
                for s, g in zip(sam_grads[:num_shared], shared_grads)
            ]
            if task in engine.row_index:
                engine.add_row(engine.row(task, flat=True), flat, scale)
            engine.add_plain(private, sam_grads[num_shared:], scale)
        return detached


def _single_task_batch(batch: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The sub-batch that carries ``task``'s labels, with only that task's labels."""
    for key, sub_batch in batch.items():
        labels = sub_batch.get("labels") or {}
        if task in labels:
            return {key: {**sub_batch, "labels": {task: labels[task]}}}
    raise KeyError(f"no sub-batch carries labels for task {task!r}")

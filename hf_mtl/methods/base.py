"""The common base of every gradient method (docs/METHODS.md §3).

A method is mathematics: it maps the K x P Jacobian of the shared parameters (one row per task,
``g_i = ∇_θsh L_i``) to one update vector of shape (P,), or, for loss-weighting methods, maps the K
per-task losses to one scalar whose single backward gives the update. No model, device, optimizer
or Trainer appears here; the engine (`hf_mtl/engine.py`) calls these hooks.

Hooks, all optional except the one that defines the method:

- ``aggregate(jacobian, ...) -> (P,)``: the combined update. Every method implements it, so
  ``get_method(name).aggregate(J)`` works on a plain matrix (DESIGN.md, "Contracts").
- ``combine_losses(losses, ...) -> scalar`` for loss-weighting methods (``requires_jacobian=False``):
  the engine backpropagates it once instead of building the Jacobian.
- ``transform_losses(losses, ...) -> (K,)``: applied to the per-task losses before anything else
  (IMTL-L's ``e^s L - s``, DB-MTL's ``log L``). Learnable parameters of the method receive their
  gradient through it.
- ``after_optimizer_step(losses_before, losses_after, ...)``: for methods that learn from the change
  of the losses across the optimizer step (FAMO); the engine runs the extra forward only when
  ``needs_losses_after_step`` is set.
- ``observe_losses(losses, task_ids=...)``: once per optimizer step, the global mean losses of the
  step (identical on every rank), for methods that keep loss statistics (DWA).
- ``on_epoch_end(epoch)``: for methods that keep epoch statistics (DWA).
- ``bind_parameter_layout(blocks)``: called once by the engine with the ``(name, numel)`` of each
  shared parameter tensor, in the order of the Jacobian's columns, for methods that act per layer
  or per matrix (GradVac). A plain matrix with no layout is one block.

Representation-level methods (``requires_representation = True``: MGDA-UB, GradDrop) receive as rows
the per-task gradients with respect to the shared representation ``z`` (the features the heads read,
flattened over the batch), ``representation=z`` flattened the same way, and return the gradient to
send back into ``z``; the engine then backpropagates it once through the encoders.

Methods are ``torch.nn.Module`` objects so that learnable state (UW's log-variances, FAMO's logits)
is made of parameters the Trainer's optimizer can own, and so that ``state_dict()`` /
``load_state_dict()`` carry all state into checkpoints. Non-tensor state goes through
``get_extra_state`` / ``set_extra_state``.

``task_ids`` (a ``LongTensor`` of indices into the method's ``num_tasks`` tasks) says which tasks the
rows or losses belong to when a sampling strategy leaves some tasks out of a step; stateless
methods ignore it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


def task_index(losses: Tensor, task_ids: Tensor | None, num_tasks: int) -> Tensor:
    """Indices into the method's ``num_tasks`` tasks of the K given losses, checked.

    Without ``task_ids`` the K losses must be all ``num_tasks`` tasks, in order.
    """
    if task_ids is None:
        if losses.numel() != num_tasks:
            raise ValueError(
                f"got {losses.numel()} losses for {num_tasks} tasks; pass `task_ids` when a step holds a subset"
            )
        return torch.arange(num_tasks, device=losses.device)
    index = torch.as_tensor(task_ids, dtype=torch.long, device=losses.device).reshape(-1)
    if index.numel() != losses.numel():
        raise ValueError(f"`task_ids` has {index.numel()} entries for {losses.numel()} losses")
    if index.numel() and (index.min() < 0 or index.max() >= num_tasks):
        raise ValueError(f"`task_ids` must lie in [0, {num_tasks}), got {index.tolist()}")
    return index


class GradientMethod(nn.Module):
    """Base class of all gradient methods.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Needed by methods that keep per-task state; others ignore it.

    Class attributes:
        name (`str`): the registry name, set by ``@register_method``.
        requires_jacobian (`bool`): whether the engine must build per-task gradients of the shared
            parameters. ``False`` for loss-weighting methods (one backward of ``combine_losses``).
        requires_representation (`bool`): whether the method acts on gradients with respect to the
            shared representation instead of the shared parameters (MGDA-UB, GradDrop).
        needs_losses_after_step (`bool`): whether ``after_optimizer_step`` needs the losses
            recomputed on the same batch after the optimizer step (FAMO).
        is_random (`bool`): whether ``aggregate`` / ``combine_losses`` draw random numbers; they then
            take a ``generator``.
    """

    name: ClassVar[str] = ""
    requires_jacobian: ClassVar[bool] = True
    requires_representation: ClassVar[bool] = False
    needs_losses_after_step: ClassVar[bool] = False
    is_random: ClassVar[bool] = False

    def __init__(self, num_tasks: int | None = None) -> None:
        super().__init__()
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}")
        self.num_tasks = num_tasks
        #: The task weights of the last call, shape (K,), for logging as ``weight/<task>``; ``None``
        #: when the method has no meaningful per-task weights (e.g. GradDrop's per-coordinate masks).
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def transform_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> Tensor:
        """Maps the (K,) per-task losses before they are differentiated. Identity by default."""
        return losses

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The scalar whose backward gives the update (loss-weighting methods only)."""
        raise NotImplementedError(f"{type(self).__name__} combines gradients, not losses; call `aggregate`")

    def aggregate(
        self,
        jacobian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        representation: Tensor | None = None,
    ) -> Tensor:
        """Combines the rows of ``jacobian`` (shape (K, P)) into one update of shape (P,)."""
        raise NotImplementedError

    def after_optimizer_step(
        self, losses_before: Tensor, losses_after: Tensor, *, task_ids: Tensor | None = None
    ) -> None:
        """Learns from the change of the losses across the optimizer step (FAMO). No-op by default."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the trainer at the end of each epoch. No-op by default."""

    def observe_losses(self, losses: Tensor, *, task_ids: Tensor | None = None) -> None:
        """Called by the engine once per optimizer step with each present task's mean raw loss over the
        accumulation window and over all ranks (the same values on every rank). Methods that keep loss
        statistics (DWA's period averages) update them here, so that every rank holds the same state.
        No-op by default."""

    def bind_parameter_layout(self, blocks: list[tuple[str, int]]) -> None:
        """Receives the ``(name, numel)`` of each shared parameter tensor, in column order. No-op by default."""

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_jacobian(jacobian: Tensor) -> None:
        if not isinstance(jacobian, Tensor) or jacobian.dim() != 2:
            shape = tuple(jacobian.shape) if isinstance(jacobian, Tensor) else type(jacobian).__name__
            raise ValueError(f"`jacobian` must be a 2-D tensor of shape (num_tasks, num_params), got {shape}")
        if not jacobian.is_floating_point():
            raise ValueError(f"`jacobian` must be a floating-point tensor, got dtype {jacobian.dtype}")


class LossWeightingMethod(GradientMethod):
    """A method that only reweights losses: the update is ``∇ combine_losses(L)``, one backward.

    ``aggregate(J, losses=...)`` gives the same update on a plain matrix: by the chain rule the
    gradient of the combined loss with respect to θ_sh is ``Σ_i (∂C/∂L_i) g_i``, so the weights
    are the derivative of ``combine_losses`` at ``losses`` (ones when no losses are given).
    """

    requires_jacobian = False

    def loss_weights(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The weights ``∂C/∂L_i`` at ``losses`` (shape (K,)), without touching method state."""
        probe = losses.detach().to(torch.float32).clone().requires_grad_(True)
        with torch.enable_grad():
            combined = self.combine_losses(probe, task_ids=task_ids, generator=generator)
            (weights,) = torch.autograd.grad(combined, probe)
        return weights

    def aggregate(
        self,
        jacobian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        representation: Tensor | None = None,
    ) -> Tensor:
        self._check_jacobian(jacobian)
        if losses is None:
            losses = torch.ones(jacobian.shape[0], device=jacobian.device)
        weights = self.loss_weights(losses, task_ids=task_ids, generator=generator)
        self.last_weights = weights.detach()
        return (weights.to(torch.float32) @ jacobian.to(torch.float32)).to(jacobian.dtype)


class GramianMethod(GradientMethod):
    """A Jacobian method whose update is ``d = wᵀ J`` with weights computed from the K x K Gramian.

    Subclasses implement ``weights_from_gramian(G)``; the Gramian ``G = J Jᵀ`` is formed in float32
    (float16 / bfloat16 inputs included), so methods never see reduced-precision inner products.
    """

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def aggregate(
        self,
        jacobian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        representation: Tensor | None = None,
    ) -> Tensor:
        self._check_jacobian(jacobian)
        matrix = jacobian.to(torch.float32)
        gramian = matrix @ matrix.T
        weights = self.weights_from_gramian(gramian, losses=losses, task_ids=task_ids, generator=generator)
        weights = weights.to(device=matrix.device, dtype=torch.float32)
        self.last_weights = weights.detach()
        return (weights @ matrix).to(jacobian.dtype)

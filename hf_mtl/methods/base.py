"""The common base of every gradient method (docs/methods.md).

A method is mathematics: it maps the K x P Jacobian of the shared parameters (one row per task,
``g_i = ∇_θsh L_i``) to one update vector of shape (P,), or, for loss-weighting methods, maps the K
per-task losses to one scalar whose single backward gives the update. No model, device, optimizer
or Trainer appears here; the engine (`hf_mtl/engine/`) calls these hooks.

Hooks, all optional except the one that defines the method:

- ``aggregate(jacobian, ...) -> (P,)``: the combined update. Every method implements it, so
  ``get_method(name).aggregate(J)`` works on a plain matrix (the contract of `hf_mtl.methods`).
- ``combine_losses(losses, ...) -> scalar`` for loss-weighting methods (``requires_jacobian=False``):
  the engine backpropagates it once instead of building the Jacobian.
- ``transform_losses(losses, ...) -> (K,)``: an **elementwise** map of the per-task losses (each task's
  loss on its own: IMTL-L's ``e^s L - s``, DB-MTL's ``log L``). The engine differentiates the raw losses
  and applies the transform at the step's global mean losses ``L̄`` by the chain rule (row i times
  ``T_i'(L̄_i)``), so a task's backward never touches another task's graph; learnable parameters of the
  method receive the gradient of ``Σ_i T_i(L̄_i)`` through it.
- ``after_optimizer_step(losses_before, losses_after, ...)``: for methods that learn from the change
  of the losses across the optimizer step (FAMO); the engine runs the extra forward only when
  ``needs_losses_after_step`` is set.
- ``observe_losses(losses, task_ids=...)``: once per optimizer step, the global mean losses of the
  step (identical on every rank), for methods that keep loss statistics (DWA).
- ``on_epoch_end(epoch)``: for methods that keep epoch statistics (DWA).
- ``bind_parameter_layout(blocks)``: called once by the engine with the ``(name, numel)`` of each
  shared parameter tensor, in the order of the Jacobian's columns, for methods that act per layer
  or per matrix (GradVac). A plain matrix with no layout is one block.

When the engine calls them, and where state may change: per micro-step, on each rank's own losses,
``transform_losses`` and ``combine_losses`` (the latter also as a probe inside
``LossWeightingMethod.aggregate``, and again for SAM's ascent); once per optimizer step, on values
identical on every rank, ``observe_losses`` (the step's mean losses), then ``aggregate`` (the global
Jacobian), then ``after_optimizer_step``; ``on_epoch_end`` at each epoch's end. A method's state
(counters, moving averages, loss statistics) may only change in the once-per-step hooks, so that
every rank keeps the same state whatever the accumulation and the number of calls:
``transform_losses`` and ``combine_losses`` only read it (``combine_losses`` sets ``last_weights``,
nothing else), and so does ``aggregate`` of a representation method, which runs per micro-step.
Random methods draw from the ``generator`` they are given; the engine always passes one, seeded from
the run's seed, the step and the micro-step, so a method's private generator (``seed=``, the
`PrivateGenerator` mixin) only serves calls outside the engine that pass none.

Representation-level methods (``requires_representation = True``: MGDA-UB, GradDrop) receive as rows
the per-task gradients with respect to the shared representation ``z`` (the features the heads read,
flattened over the batch), ``representation=z`` flattened the same way, and return the gradient to
send back into ``z``; the engine then backpropagates it once through the encoders.

Methods are ``torch.nn.Module`` objects so that learnable state (UW's log-variances, IMTL-L's scales)
is made of parameters the Trainer's optimizer can own, and so that ``state_dict()`` /
``load_state_dict()`` carry all state into checkpoints. Tensor state is made of buffers; a buffer
whose size is only known at the first call (K x P gradient averages, per-task weights when
``num_tasks`` is left out) is registered empty with ``register_lazy_buffer`` and sized by
``lazy_buffer``, and ``load_state_dict`` gives it the saved shape, so a fresh instance loads a
checkpoint. Non-tensor state (step counters, generator states) goes through ``get_extra_state`` /
``set_extra_state``.

``task_ids`` (a ``LongTensor`` of indices into the method's ``num_tasks`` tasks) says which tasks the
rows or losses belong to when a sampling strategy leaves some tasks out of a step; stateless
methods ignore it.
"""

from __future__ import annotations

from typing import Any, ClassVar

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


class PrivateGenerator:
    """Mixin of the random methods (PCGrad, RLW, GradDrop, GradVac): the private generator of ``seed=``.

    The engine always passes a ``generator``; the private one serves the calls that pass none (calls
    outside the engine). Without a seed there is none, and such calls draw from the global RNG. Its
    state goes into the ``state_dict`` (``get_extra_state``), so a resumed run continues the sequence.
    Subclasses call `seed_generator` in ``__init__`` and draw from `generator_and_device`.
    """

    is_random: ClassVar[bool] = True
    _generator: torch.Generator | None

    def seed_generator(self, seed: int | None) -> None:
        """Checks ``seed`` and creates the private generator from it (none when ``seed`` is ``None``)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}")
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def generator_and_device(
        self, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Generator | None, torch.device]:
        """The generator to draw from (``generator``, else the private one) and the device to draw on
        (the generator's; ``device`` when drawing from the global RNG)."""
        generator = generator if generator is not None else self._generator
        return generator, generator.device if generator is not None else device

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator_state": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        generator_state = state.get("generator_state")
        if generator_state is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(generator_state)


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
        #: A scalar set by ``aggregate`` of a method that learns its own parameters from the rows (GradNorm's
        #: balance loss): the engine backpropagates it into the method's parameters; ``aggregate`` never
        #: writes a ``.grad`` itself.
        self.auxiliary_loss: Tensor | None = None
        #: Names of the buffers registered with `register_lazy_buffer`.
        self._lazy_buffers: set[str] = set()

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

    # ------------------------------------------------------------------ lazily sized state
    def register_lazy_buffer(self, name: str, dtype: torch.dtype = torch.float32) -> None:
        """Registers the buffer ``name`` empty (shape (0,)): `lazy_buffer` sizes it at the first call,
        ``load_state_dict`` to the saved shape. Its first dimension must be the task dimension."""
        self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self._lazy_buffers.add(name)

    def lazy_buffer(self, name: str, shape: tuple[int, ...], fill: float) -> Tensor:
        """The lazy buffer ``name``, created filled with ``fill`` (on the buffer's device, in its dtype)
        if it is still empty. Raises when it holds state of another shape (a loaded checkpoint of
        another run, or a Jacobian with another number of columns)."""
        current = getattr(self, name)
        if current.numel() == 0:
            setattr(self, name, torch.full(shape, fill, dtype=current.dtype, device=current.device))
        elif tuple(current.shape) != tuple(shape):
            raise ValueError(
                f"`jacobian` does not fit the state of `{self.name}`: `{name}` has shape {tuple(current.shape)}, "
                f"this call needs {tuple(shape)} "
                "(did `num_tasks`, the shared parameters or the method's settings change?)"
            )
        return getattr(self, name)

    def resolve_task_index(self, num_rows: int, task_ids: Tensor | None, device: torch.device) -> Tensor:
        """Indices into ``num_tasks`` of the ``num_rows`` rows of a call, fixing ``num_tasks`` to
        ``num_rows`` at the first call when it was left out (then ``task_ids`` cannot select a subset)."""
        if self.num_tasks is None:
            if task_ids is not None:
                raise ValueError(
                    f"`num_tasks` is required by `{self.name}` when `task_ids` selects a subset of the tasks, got None"
                )
            self.num_tasks = num_rows
        return task_index(torch.empty(num_rows, device=device), task_ids, self.num_tasks)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # give each lazy buffer the saved shape before the copy (an empty saved buffer empties it), and
        # fix `num_tasks` from the saved task dimension when it was left out
        for name in self._lazy_buffers:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if not isinstance(saved, Tensor):
                continue
            if saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
            if self.num_tasks is None and saved.numel() > 0:
                self.num_tasks = int(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    Class attributes:
        weights_depend_on_losses (`bool`): whether the weights ``∂C/∂L`` change with the losses (FAMO, GLS,
            SI, STCH). The engine then computes them from the step's global mean losses before the first
            backward (a forward without gradient of the other micro-batches, and one collective of K numbers);
            otherwise from the method's state alone.

    ``aggregate(J, losses=...)`` gives the same update on a plain matrix: by the chain rule the
    gradient of the combined loss with respect to θ_sh is ``Σ_i (∂C/∂L_i) g_i``, so the weights
    are the derivative of ``combine_losses`` at ``losses`` (ones when no losses are given).
    """

    requires_jacobian = False
    weights_depend_on_losses: ClassVar[bool] = False

    def loss_weights(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The weights ``∂C/∂L_i`` at ``losses`` (shape (K,)), without changing the method's state.

        It differentiates one probe call of ``combine_losses``, which only reads state (methods update
        their state in ``observe_losses``, ``aggregate``, ``after_optimizer_step`` or ``on_epoch_end``);
        ``last_weights``, which ``combine_losses`` sets, is restored. A random method draws from
        ``generator`` (RLW without one: from its private generator, or the global RNG).
        """
        probe = losses.detach().to(torch.float32).clone().requires_grad_(True)
        last_weights = self.last_weights
        try:
            with torch.enable_grad():
                combined = self.combine_losses(probe, task_ids=task_ids, generator=generator)
                (weights,) = torch.autograd.grad(combined, probe)
        finally:
            self.last_weights = last_weights
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
        dtype = torch.promote_types(jacobian.dtype, torch.float32)
        return (weights.to(device=jacobian.device, dtype=dtype) @ jacobian.to(dtype)).to(jacobian.dtype)


class GramianMethod(GradientMethod):
    """A Jacobian method whose update is ``d = wᵀ J`` with weights computed from the K x K Gramian.

    Subclasses implement ``weights_from_gramian(G)``. The Gramian ``G = J Jᵀ`` and the update are
    computed in ``torch.promote_types(J.dtype, float32)``: float32 for float16 / bfloat16 / float32
    input, so methods never see reduced-precision inner products, and float64 for float64 input.
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
        matrix = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
        gramian = matrix @ matrix.T
        weights = self.weights_from_gramian(gramian, losses=losses, task_ids=task_ids, generator=generator)
        weights = weights.to(device=matrix.device, dtype=matrix.dtype)
        self.last_weights = weights.detach()
        return (weights @ matrix).to(jacobian.dtype)

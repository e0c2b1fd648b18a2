"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020, https://arxiv.org/abs/2010.06808;
docs/methods.md, "GradDrop").

GradDrop acts on the gradients with respect to the shared representation ``z`` (the activations the
heads read): at every coordinate it keeps, at random, only the task gradients of one sign, with the
probability of keeping the positive ones equal to their "sign purity"::

    G_i = ∇_z L_i ⊙ sign(z)                        (summed over the batch when z has a batch dim)
    P   = ½ (1 + Σ_i G_i / Σ_i |G_i|)              (P = ½ where every G_i is 0)
    U   ~ Uniform(0, 1), one draw per coordinate of P
    M_i = [P > U] [G_i > 0] + [P < U] [G_i < 0]
    gradient sent back into z:   Σ_i (leak_i + (1 - leak_i) M_i) ⊙ ∇_z L_i          leak = 0

Rows and representation: ``requires_representation`` is set, so the engine passes as rows the
per-task gradients ``∇_z L_i`` flattened to (K, P) and ``representation=z``:

- ``z`` of shape (P,), already flattened with its batch (the base contract): each of the P
  coordinates is its own unit, with its own ``U`` draw. This is GradDrop per activation, without
  LibMTL's sum over the batch (the flattened rows no longer say where the batch is).
- ``z`` of any shape with ≥ 2 dimensions and P elements, e.g. (batch, features): the rows are read
  in that shape and ``G_i`` sums over the first (batch) dimension, so ``P`` and ``U`` are per
  feature coordinate and the mask is shared by the samples of the batch (LibMTL, the paper).

On a plain matrix without ``representation`` it is applied to the rows themselves, with
``sign(z) = 1`` (TorchJD's ``GradDrop`` on Jacobian rows; the CAGrad repository does the same with
parameter gradients).

Randomness: ``U`` is drawn from ``generator`` (or this method's ``seed``). There are no per-task
weights (``last_weights`` is ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import GradientMethod, PrivateGenerator, task_index
from .registry import register_method


@register_method("graddrop")
class GradDrop(PrivateGenerator, GradientMethod):
    """GradDrop on representation gradients (or on Jacobian rows).

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Needed for a per-task ``leak`` with ``task_ids``.
        leak (`float` or `list[float]`, *optional*, defaults to `0.0`):
            How much of each task's gradient passes unmasked, in [0, 1]: one value for all tasks or
            one per task. 0 is GradDrop; 1 is the plain sum.
        seed (`int`, *optional*):
            Seeds a private generator used when ``aggregate`` receives none; its state is saved in
            the ``state_dict``.
    """

    requires_representation = True

    def __init__(
        self, num_tasks: int | None = None, leak: float | Sequence[float] = 0.0, seed: int | None = None
    ) -> None:
        super().__init__(num_tasks)
        values = torch.as_tensor(leak, dtype=torch.float32).reshape(-1)
        if values.numel() == 0 or not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise ValueError(f"`leak` must be a float in [0, 1] or a list of them, one per task, got {leak!r}")
        if values.numel() > 1 and num_tasks is not None and values.numel() != num_tasks:
            raise ValueError(f"`leak` must have one entry per task ({num_tasks}), got {values.numel()}: {leak!r}")
        self.seed_generator(seed)
        # configuration, not learned state: out of the state_dict
        self.register_buffer("leak", values, persistent=False)

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
        num_rows, num_columns = jacobian.shape
        rows = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
        if representation is None:
            signed = rows
        else:
            if representation.numel() != num_columns:
                raise ValueError(
                    f"`representation` must have one element per column of `jacobian` ({num_columns}), "
                    f"got shape {tuple(representation.shape)}"
                )
            shape = (num_rows, *representation.shape) if representation.dim() >= 2 else (num_rows, num_columns)
            rows = rows.reshape(shape)
            signed = rows * torch.sign(representation.detach()).to(device=rows.device, dtype=rows.dtype)
            if representation.dim() >= 2:
                signed = signed.sum(dim=1)  # over the batch: one unit per feature coordinate

        total = signed.sum(dim=0)
        magnitude = signed.abs().sum(dim=0)
        nonzero = magnitude > 0
        purity = torch.where(nonzero, 0.5 * (1.0 + total / torch.where(nonzero, magnitude, 1.0)), 0.5)
        generator, device = self.generator_and_device(generator, purity.device)
        uniform = torch.rand(purity.shape, generator=generator, device=device, dtype=torch.float32).to(purity.device)
        keep = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))  # (K, *units)
        if representation is not None and representation.dim() >= 2:
            keep = keep.unsqueeze(1)  # the same mask for every sample of the batch

        leak = self._leak_of_rows(num_rows, task_ids).to(rows.device)
        leak = leak.reshape(num_rows, *([1] * (rows.dim() - 1)))
        update = ((leak + (1.0 - leak) * keep.to(rows.dtype)) * rows).sum(dim=0)
        self.last_weights = None
        return update.reshape(num_columns).to(jacobian.dtype)

    def _leak_of_rows(self, num_rows: int, task_ids: Tensor | None) -> Tensor:
        if self.leak.numel() == 1:
            return self.leak.expand(num_rows)
        if task_ids is None and num_rows != self.leak.numel():
            raise ValueError(
                f"`leak` has one entry per task ({self.leak.numel()}) but `jacobian` has {num_rows} rows; "
                "pass `task_ids` when a step holds a subset of the tasks"
            )
        return self.leak[task_index(torch.empty(num_rows), task_ids, self.leak.numel()).to(self.leak.device)]

"""GradVac: gradient vaccine (Wang et al., ICLR 2021, https://openreview.net/forum?id=F1vEjWK-lH_;
docs/methods.md, "GradVac").

PCGrad with a moving target: instead of removing conflicts (cosine < 0), GradVac raises the cosine of
each pair of task gradients to an exponential moving average φ̂ of the cosines seen so far, per pair
and per parameter group k::

    g_i^PC = g_i
    for j in shuffled(tasks ≠ i):
        φ = cos(g_i^PC, g_j)                                       (g_j: the ORIGINAL row)
        if φ < φ̂_ijk:
            g_i^PC += g_j · ||g_i^PC|| (φ̂ √(1-φ²) - φ √(1-φ̂²)) / (||g_j|| √(1-φ̂²))
        φ̂_ijk ← (1-β) φ̂_ijk + β φ                                 β = 0.5, φ̂ starts at 0
    d = Σ_i g_i^PC                                                  (a sum, like PCGrad)

each line acting on the columns of group k alone. The correction sets the cosine of g_i^PC and g_j to
exactly φ̂ (for φ̂ < 1). Groups (``group_type``, LibMTL's ``GradVac_group_type``): ``"whole"`` (one
group, the default), ``"layer"`` (the parameters of one module, i.e. the names sharing everything
before their last dot: a layer's weight and bias) or ``"matrix"`` (each parameter tensor). They come
from the ``(name, numel)`` blocks of ``bind_parameter_layout``; a plain matrix is one group.

As in PCGrad, every g_i^PC stays in the span of the rows, so the loop runs on the per-group Gramians
(K x K each, all groups at once) and the update is a per-group weight vector times the rows.

Deviations from the reference code, each on purpose:

- The EMA is updated after every pair, as in the paper's Algorithm 1 and TorchJD. LibMTL and
  ``SamsungLabs/MTL`` update it only when a correction was made, so there φ̂ can only decrease from
  its initial 0 and never tracks an agreeing pair.
- The cosine is exact: LibMTL adds 1e-8 to ``||g_i|| ||g_j||``, which biases the cosine of small
  gradients (norms below 1e-4, common in mixed precision) toward 0. A pair with a zero row has no
  cosine: it is neither corrected nor counted in the EMA.
- ``√(1-φ̂²)`` is floored at 1e-8 (LibMTL adds 1e-8 to the whole denominator instead).

Randomness: the order of the other tasks, per task i, is ``randperm`` from ``generator`` (or this
method's ``seed``); the same order serves every group, as in LibMTL. Tasks left out of a step by a
sampler keep their φ̂ entries untouched. ``last_weights`` are the weights of the original rows in
the update, averaged over the groups in proportion to their number of columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientMethod, PrivateGenerator
from .registry import register_method

_GROUP_TYPES = ("whole", "layer", "matrix")
_TINY = 1e-8


@register_method("gradvac")
class GradVac(PrivateGenerator, GradientMethod):
    """GradVac with per-group cosine targets.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K. Needed when ``task_ids`` select a subset; otherwise read from the
            first Jacobian.
        beta (`float`, *optional*, defaults to `0.5`):
            The EMA rate β in [0, 1] of the cosine targets (LibMTL and ``SamsungLabs/MTL``).
        group_type (`str`, *optional*, defaults to `"whole"`):
            How the shared parameters are grouped: ``"whole"``, ``"layer"`` or ``"matrix"``.
        seed (`int`, *optional*):
            Seeds a private generator used when ``aggregate`` receives none; its state is saved in
            the ``state_dict``.
    """

    def __init__(
        self, num_tasks: int | None = None, beta: float = 0.5, group_type: str = "whole", seed: int | None = None
    ) -> None:
        super().__init__(num_tasks)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"`beta` must be a float in [0, 1], got {beta!r}")
        if group_type not in _GROUP_TYPES:
            raise ValueError(f"`group_type` must be one of {list(_GROUP_TYPES)}, got {group_type!r}")
        self.beta = float(beta)
        self.group_type = group_type
        self.seed_generator(seed)
        #: column runs ``(start, end, group)`` of the bound layout; ``None``: one group.
        self._runs: list[tuple[int, int, int]] | None = None
        self._num_groups = 1
        #: φ̂, shape (num_tasks, num_tasks, num_groups); empty until the first call (or a loaded state).
        self.register_lazy_buffer("phi_hat")

    def bind_parameter_layout(self, blocks: list[tuple[str, int]]) -> None:
        """Groups the ``(name, numel)`` column blocks by ``group_type``."""
        keys: dict[str, int] = {}
        runs: list[tuple[int, int, int]] = []
        start = 0
        for position, block in enumerate(blocks):
            name, numel = block
            if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
                raise ValueError(f"`blocks` entries must be (name, numel >= 0), got {block!r} at {position}")
            if numel == 0:
                continue
            if self.group_type == "whole":
                key = ""
            elif self.group_type == "matrix":
                key = f"{position}"
            else:
                key = name.rpartition(".")[0] or name
            group = keys.setdefault(key, len(keys))
            if runs and runs[-1][2] == group and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + numel, group)
            else:
                runs.append((start, start + numel, group))
            start += numel
        self._runs = runs
        self._num_groups = max(len(keys), 1)

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
        runs = self._runs if self._runs is not None else [(0, num_columns, 0)]
        covered = runs[-1][1] if runs else 0
        if covered != num_columns:
            raise ValueError(f"`jacobian` has {num_columns} columns but the bound parameter layout has {covered}")
        index = self.resolve_task_index(num_rows, task_ids, torch.device("cpu"))
        phi_hat = self.lazy_buffer("phi_hat", (self.num_tasks, self.num_tasks, self._num_groups), 0.0)

        matrix = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
        gram = torch.zeros(self._num_groups, num_rows, num_rows, dtype=torch.float64)
        for start, end, group in runs:
            block = matrix[:, start:end]
            gram[group] += (block @ block.T).to(device="cpu", dtype=torch.float64)

        targets = phi_hat[index][:, index].to(device="cpu", dtype=torch.float64).permute(2, 0, 1)  # (groups, K, K)
        coefficients = self._vaccinate(gram, targets, generator)
        with torch.no_grad():
            rows, cols = torch.meshgrid(index.cpu(), index.cpu(), indexing="ij")
            phi_hat[rows, cols] = targets.permute(1, 2, 0).to(phi_hat.dtype).to(phi_hat.device)

        group_weights = coefficients.sum(dim=1).to(matrix.dtype)  # (groups, K)
        column_weights = torch.zeros(num_rows, dtype=torch.float32)
        update = torch.empty(num_columns, dtype=matrix.dtype, device=matrix.device)
        for start, end, group in runs:
            weights = group_weights[group]
            column_weights += weights.float() * (end - start)
            update[start:end] = weights.to(matrix.device) @ matrix[:, start:end]
        self.last_weights = column_weights / max(num_columns, 1)
        return update.to(jacobian.dtype)

    def _vaccinate(self, gram: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """The GradVac loop on per-group Gramians; updates ``targets`` in place, returns coefficients.

        ``coefficients[k, i]`` are the weights of g_i^PC over the original rows in group k.
        """
        num_groups, num_rows, _ = gram.shape
        coefficients = torch.eye(num_rows, dtype=torch.float64).repeat(num_groups, 1, 1)
        row_norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0.0).sqrt()  # (groups, K)
        generator, device = self.generator_and_device(generator, torch.device("cpu"))
        for i in range(num_rows):
            others = [j for j in range(num_rows) if j != i]
            order = torch.randperm(len(others), generator=generator, device=device).tolist()
            for position in order:
                j = others[position]
                c = coefficients[:, i]  # (groups, K)
                dot = (c * gram[:, :, j]).sum(dim=1)  # g_i^PC · g_j
                norm_i = torch.einsum("gk,gkl,gl->g", c, gram, c).clamp_min(0.0).sqrt()
                norm_j = row_norms[:, j]
                defined = (norm_i > 0) & (norm_j > 0)
                scale = torch.where(defined, norm_i * norm_j, 1.0)
                phi = torch.where(defined, dot / scale, 0.0).clamp(-1.0, 1.0)
                target = targets[:, i, j]
                sin_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
                sin_target = (1.0 - target * target).clamp_min(0.0).sqrt().clamp_min(_TINY)
                step = norm_i * (target * sin_phi - phi * sin_target) / (torch.where(defined, norm_j, 1.0) * sin_target)
                correct = defined & (phi < target)
                coefficients[:, i, j] += torch.where(correct, step, 0.0)
                targets[:, i, j] = torch.where(defined, (1.0 - self.beta) * target + self.beta * phi, target)
        return coefficients

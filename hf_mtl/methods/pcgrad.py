"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020; docs/methods.md, "PCGrad").

For each task i, in a random order over the tasks j::

    g_i^PC = g_i
    for j in shuffled(1..K):
        if g_i^PC · g_j < 0:
            g_i^PC -= (g_i^PC · g_j / ||g_j||²) g_j        # projection onto the ORIGINAL g_j
    d = Σ_i g_i^PC                                          # a sum, not a mean

Every g_i^PC stays in the span of the rows, so it is kept as a weight vector over the rows and the
whole procedure runs on the Gramian (TorchJD's form): with ``c`` the weights of g_i^PC,
``g_i^PC · g_j = (G c)_j`` and the projection is ``c_j -= (G c)_j / G_jj``. The order includes
``j = i``, as in the original code (a no-op unless earlier projections turned g_i^PC against g_i).
A zero row is never projected on (its inner products are 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod, PrivateGenerator
from .registry import register_method


@register_method("pcgrad")
class PCGrad(PrivateGenerator, GramianMethod):
    """PCGrad. Random: pass ``generator`` to ``aggregate`` (or ``seed`` here) for a reproducible order.

    Args:
        seed (`int`, *optional*):
            Seeds a private generator used when ``aggregate`` receives none. Its state is saved in
            the ``state_dict``, so a resumed run continues the same sequence of orders.
    """

    def __init__(self, num_tasks: int | None = None, seed: int | None = None) -> None:
        super().__init__(num_tasks)
        self.seed_generator(seed)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        generator, device = self.generator_and_device(generator, torch.device("cpu"))
        gram = gramian.detach().to(device="cpu", dtype=torch.float64)
        num_tasks = gram.shape[0]
        weights = torch.zeros(num_tasks, dtype=torch.float64)
        for i in range(num_tasks):
            coefficients = torch.zeros(num_tasks, dtype=torch.float64)
            coefficients[i] = 1.0
            for j in torch.randperm(num_tasks, generator=generator, device=device).tolist():
                inner = float(gram[j] @ coefficients)
                if inner < 0.0 and gram[j, j] > 0.0:
                    coefficients[j] -= inner / gram[j, j]
            weights += coefficients
        return weights.to(gramian.dtype)

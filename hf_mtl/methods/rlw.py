"""RLW: random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022,
https://arxiv.org/abs/2111.10603; docs/methods.md, "RLW").

A fresh draw at every call, over the K losses of the step::

    ε ~ N(0, I_K),      λ = softmax(ε),      L = Σ_i λ_i L_i

The weights lie on the simplex (LibMTL's ``RLW`` with ``dist='Normal'``; nash-mtl's ``rlw``).

Randomness and state: ``combine_losses`` runs per micro-step and only reads state, so the draw comes
from the ``generator`` it is given. The engine always passes one, built from the run's seed, the
step and the micro-step (the same on every rank, and restored for SAM's ascent so that ascent and
descent share the draw), so the method's own state never moves during training. The private
generator (``seed``) serves calls outside the engine that pass none: each ``combine_losses``,
``loss_weights`` or ``aggregate`` call is then one draw from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeightingMethod, PrivateGenerator
from .registry import register_method


@register_method("rlw")
class RandomLossWeighting(PrivateGenerator, LossWeightingMethod):
    """Random loss weighting. Pass ``generator`` to ``combine_losses`` (or ``seed`` here) to repeat a run.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K; not needed (one weight is drawn per given loss).
        seed (`int`, *optional*):
            Seeds a private generator used when ``combine_losses`` receives none. Its state is saved
            in the ``state_dict``, so a resumed run continues the same sequence. Without a seed and
            without a ``generator`` the global RNG is used.
    """

    def __init__(self, num_tasks: int | None = None, seed: int | None = None) -> None:
        super().__init__(num_tasks)
        self.seed_generator(seed)

    def combine_losses(
        self, losses: Tensor, *, task_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        generator, device = self.generator_and_device(generator, losses.device)
        noise = torch.randn(losses.numel(), generator=generator, device=device, dtype=torch.float32)
        weights = torch.softmax(noise, dim=0).to(losses.device)
        self.last_weights = weights
        return (weights * losses.to(torch.float32)).sum()

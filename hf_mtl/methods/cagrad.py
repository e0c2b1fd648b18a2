"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021; docs/methods.md, "CAGrad").

Paper: https://arxiv.org/abs/2110.14048; code: ``Cranial-XIX/CAGrad`` (``nyuv2/utils.py``,
``cagrad``); LibMTL ``CAGrad.py``; nash-mtl ``methods/weight_methods.py``.

CAGrad looks for the update that maximises the worst task's improvement while staying close to the
average gradient ``g₀ = (1/K) Σ_i g_i``::

    max_d min_i ⟨g_i, d⟩   subject to   ||d - g₀|| ≤ c ||g₀||

Its dual is a K-variable problem on the simplex, solved on the Gramian (``b = 1/K``)::

    w* = argmin_{w ∈ Δ} g_wᵀ g₀ + c ||g₀|| ||g_w||        g_w = Σ_i w_i g_i
    d₀ = g₀ + (c ||g₀|| / ||g_w*||) g_w*                   (the primal solution)
    d  = d₀ / (1 + c²)                                     (``rescale=1``)

so ``d = wᵀ J`` with ``w = (b + λ w*) / (1 + c²)``, ``λ = c ||g₀|| / ||g_w*||``. ``d₀`` lies on the
boundary of the ball (``||d₀ - g₀|| = c ||g₀||``) and has the same inner product with every task
that ``w*`` uses. ``c = 0`` gives the mean; K = 1 gives ``(1 + c) g / (1 + c²)``.

Defaults follow the NYUv2 / CityScapes experiments of the reference code: ``c = 0.4``
(``nyuv2/run.sh --alpha 0.4``; nash-mtl ``--c 0.4``) with ``rescale=1``, i.e. ``/(1 + c²)``
(``multi_task_mgd_trainer(..., rescale=1)``). LibMTL defaults to ``calpha = 0.5``; the toy uses
``c = 0.5`` with ``rescale=2`` (``/(1 + c)``); MT10 uses 0.9 and MT50 0.5. TorchJD applies no
rescale (``rescale=0``).

Solver: SciPy SLSQP from the uniform start, box [0, 1] and ``Σ w = 1``, as the reference, with these
deviations: the Gramian is divided by its trace, the objective's analytic gradient is given, and
``ftol = 1e-15`` instead of SciPy's default 1e-6. The reference's settings (absolute ``ftol``, absolute
offsets ``1e-8`` added to ``||g₀||²``, ``c ||g₀||``, ``||g_w||²`` and ``||g_w||``) make its accuracy depend
on the gradients' scale: on 100 random 2-5 task problems its ``d₀`` is within 5e-5 (relative to
``||g₀||``) of an independent primal solve when the entries of J are O(1), but off by 37 % (median)
when J is scaled by 1e-3 or by 1e2, where SLSQP stops near its start. hf_mtl's is within ~3e-6 at
every scale, and ``d(sJ) = s d(J)``. When ``g₀ = 0`` (the ball is a point) the update
is ``g₀``; when the dual optimum has ``g_w* = 0`` (0 lies in the rows' convex hull, so no ``d`` can
improve every task) ``λ`` is undefined and the update is ``g₀ / (1 + c²)`` rather than the
reference's ``c ||g₀|| / 1e-8`` times a rounding residual.

Scale: the reference training scripts (CAGrad's ``overwrite_grad``, nash-mtl's) multiply the update
by K "to match the sum loss"; LibMTL and hf_mtl do not (multiply the learning rate by K to match).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._solvers import cagrad_dual_weights, gramian_to_numpy, weights_to_tensor
from .base import GramianMethod
from .registry import register_method

_RESCALES = (0, 1, 2)
#: ``||g_w*||² / trace(G)`` below this counts as ``g_w* = 0`` (SLSQP's accuracy is ~1e-8 in ``w``).
_ZERO_DUAL_NORM = 1e-14


@register_method("cagrad")
class CAGrad(GramianMethod):
    """CAGrad.

    Args:
        num_tasks (`int`, *optional*):
            Number of tasks K (unused: CAGrad keeps no per-task state).
        c (`float`, *optional*, defaults to `0.4`):
            Radius of the ball around ``g₀``, relative to ``||g₀||``. Must be ≥ 0.
        rescale (`int`, *optional*, defaults to `1`):
            The reference's final scaling: ``0`` (none), ``1`` (divide by ``1 + c²``) or ``2``
            (divide by ``1 + c``).
        ftol (`float`, *optional*, defaults to `1e-15`):
            SLSQP's ``ftol`` on the dual (trace-normalised).
        max_iter (`int`, *optional*, defaults to `500`):
            SLSQP's iteration limit.
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        c: float = 0.4,
        rescale: int = 1,
        ftol: float = 1e-15,
        max_iter: int = 500,
    ) -> None:
        super().__init__(num_tasks)
        if not c >= 0:
            raise ValueError(f"`c` must be >= 0, got {c!r}")
        if rescale not in _RESCALES:
            raise ValueError(f"`rescale` must be one of {list(_RESCALES)}, got {rescale!r}")
        if not ftol > 0:
            raise ValueError(f"`ftol` must be > 0, got {ftol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}")
        self.c = float(c)
        self.rescale = rescale
        self.ftol = ftol
        self.max_iter = max_iter

    def dual_weights(self, gramian: Tensor) -> Tensor:
        """The dual solution ``w*`` (on the simplex) for the Gramian ``gramian``."""
        weights = cagrad_dual_weights(gramian_to_numpy(gramian), self.c, ftol=self.ftol, max_iter=self.max_iter)
        return weights_to_tensor(weights, gramian)

    def weights_from_gramian(
        self,
        gramian: Tensor,
        *,
        losses: Tensor | None = None,
        task_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gram = gramian_to_numpy(gramian)
        num_tasks = gram.shape[0]
        uniform = np.full(num_tasks, 1.0 / num_tasks)
        weights = uniform.copy()
        trace = np.trace(gram)
        if np.isfinite(gram).all() and trace > 0 and self.c > 0:
            dual = cagrad_dual_weights(gram, self.c, ftol=self.ftol, max_iter=self.max_iter)
            mean_sq_norm = max(uniform @ gram @ uniform, 0.0)
            dual_sq_norm = max(dual @ gram @ dual, 0.0)
            if dual_sq_norm > _ZERO_DUAL_NORM * trace:
                weights = uniform + self.c * np.sqrt(mean_sq_norm / dual_sq_norm) * dual
        if self.rescale == 1:
            weights = weights / (1.0 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1.0 + self.c)
        return weights_to_tensor(weights, gramian)

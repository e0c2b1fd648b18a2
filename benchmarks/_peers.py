"""The peer libraries, driven on hf_mtl's model: TorchJD's aggregators and LibMTL's weighting classes.

Each peer is keyed by the hf_mtl method it corresponds to, with the settings that make the two compute
the same thing where the definitions allow (see `AGREEMENT` in bench_step.py for the checks).

LibMTL (1.1.5, the PyPI release) needs three adaptations, all here:

1. ``import LibMTL`` runs ``LibMTL/__init__.py``, which imports its trainer and model zoo and with them
   ``torchvision.models.utils`` (removed from torchvision years ago). Only ``LibMTL.weighting`` is
   needed, so `libmtl_weighting` registers an empty ``LibMTL`` package object whose ``__path__`` is the
   installed folder and imports ``LibMTL.weighting`` alone: no torchvision, no LibMTL trainer.
2. A weighting class is a mixin that expects its model to provide ``get_share_params()``,
   ``zero_grad_share_params()``, ``task_num``, ``task_name``, ``device`` and ``rep_grad`` (LibMTL's
   ``AbsArchitecture`` does). `make_libmtl` subclasses the weighting with those members around the same
   encoder (shared) and heads (task-specific).
3. LibMTL's architecture zeroes the shared gradients with ``encoder.zero_grad()``, which set them to zero
   in the torch of 2021 but sets them to ``None`` since torch 2.0; ``_reset_grad`` then writes into
   ``param.grad.data`` and fails. The adapter zeroes them in place (``grad.zero_()``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------- TorchJD
#: hf_mtl method -> TorchJD aggregator factory (K -> aggregator).
TORCHJD_AGGREGATORS: dict[str, Any] = {
    "upgrad": lambda k: _tj().UPGrad(),
    "mgda": lambda k: _tj().MGDA(),
    "pcgrad": lambda k: _tj().PCGrad(),
    "cagrad": lambda k: _tj().CAGrad(c=0.4),
    "nash_mtl": lambda k: _tj().NashMTL(n_tasks=k),
    "imtl": lambda k: _tj().IMTLG(),
    "aligned_mtl": lambda k: _tj().AlignedMTL(),
    "dualproj": lambda k: _tj().DualProj(),
    "config": lambda k: _tj().ConFIG(),
    "gradvac": lambda k: _tj().GradVac(),
}


def _tj() -> Any:
    import torchjd.aggregation

    return torchjd.aggregation


def torchjd_available() -> str | None:
    """``None`` when TorchJD imports, else why not."""
    try:
        import torchjd.autojac  # noqa: F401
    except ImportError as error:
        return f"torchjd is not installed ({error}); pip install -r benchmarks/requirements.txt"
    return None


def torchjd_step_fn(model: nn.Module, task_names: Sequence[str], aggregator: Any) -> Any:
    """One TorchJD step's backward: ``mtl_backward`` (each task's gradient with respect to its head and
    to the shared features, then the Jacobian of the features with respect to the encoder, all rows at
    once through ``torch.vmap``) and ``jac_to_grad`` (the aggregator on the K x P Jacobian)."""
    from torchjd.autojac import jac_to_grad, mtl_backward

    shared = [p for p in model.encoders.parameters() if p.requires_grad]
    heads = [[p for p in model.heads[t].parameters() if p.requires_grad] for t in task_names]

    def backward(batch: Any) -> Tensor:
        outputs = model(batch, return_representations=True)
        losses = [outputs.losses[t] for t in task_names]
        features = list(outputs.representations.values())
        mtl_backward(losses, features=features, tasks_params=heads, shared_params=shared)
        jac_to_grad(shared, aggregator)
        return torch.stack([loss.detach() for loss in losses]).mean()

    return backward


# ---------------------------------------------------------------------------------------------- LibMTL
#: hf_mtl method -> (LibMTL weighting class, keyword arguments of its ``backward``).
LIBMTL_WEIGHTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ew": ("EW", {}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "imtl": ("IMTL", {}),
    "gradvac": ("GradVac", {"beta": 0.5}),
    "uw": ("UW", {}),
    "gls": ("GLS", {}),
}


def libmtl_weighting() -> Any:
    """``LibMTL.weighting`` without running ``LibMTL/__init__.py`` (adaptation 1 of this module's docstring)."""
    if "LibMTL.weighting" in sys.modules:
        return sys.modules["LibMTL.weighting"]
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LibMTL is not installed; pip install -r benchmarks/requirements.txt")
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    import LibMTL.weighting

    return LibMTL.weighting


def libmtl_available() -> str | None:
    try:
        libmtl_weighting()
    except ImportError as error:
        return str(error)
    return None


def make_libmtl(
    method: str, shared: Sequence[nn.Parameter], task_names: Sequence[str], device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """A LibMTL weighting object around ``shared`` parameters (adaptations 2 and 3), and its kwargs."""
    class_name, kwargs = LIBMTL_WEIGHTINGS[method]
    weighting_cls = getattr(libmtl_weighting(), class_name)
    shared = list(shared)

    class Adapter(weighting_cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = len(task_names)
            self.task_name = list(task_names)
            self.device = device
            self.rep_grad = False
            self._shared = shared

        def get_share_params(self) -> list[nn.Parameter]:
            return self._shared

        def zero_grad_share_params(self) -> None:
            for p in self._shared:
                if p.grad is not None:
                    p.grad.zero_()

    adapter = Adapter()
    adapter.init_param()
    return adapter, dict(kwargs)


def libmtl_step_fn(model: nn.Module, task_names: Sequence[str], adapter: nn.Module, kwargs: dict[str, Any]) -> Any:
    """One LibMTL step's backward: ``weighting.backward(losses)`` (one full backward per task, the rows
    copied into a K x P matrix, the method, the result written into the shared ``.grad``)."""

    def backward(batch: Any) -> Tensor:
        outputs = model(batch)
        losses = torch.stack([outputs.losses[t] for t in task_names])
        adapter.backward(losses, **kwargs)
        return losses.detach().mean()

    return backward


def libmtl_aggregate(method: str, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
    """LibMTL's update for a given Jacobian: the adapter's ``_compute_grad`` returns ``jacobian`` instead
    of backpropagating, and the update is read back from the one shared parameter's ``.grad``."""
    param = nn.Parameter(torch.zeros(jacobian.shape[1], dtype=jacobian.dtype))
    param.grad = torch.zeros_like(param)
    names = [f"t{i}" for i in range(jacobian.shape[0])]
    adapter, kwargs = make_libmtl(method, [param], names, jacobian.device)
    adapter._compute_grad = lambda losses, mode, rep_grad=False: jacobian.clone()  # noqa: ARG005
    if losses is None:
        losses = torch.ones(jacobian.shape[0], dtype=jacobian.dtype)
    adapter.backward(losses, **kwargs)
    return param.grad.detach().clone()

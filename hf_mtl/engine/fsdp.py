"""The engine under FSDP2 (``torch.distributed.fsdp.fully_shard``; Accelerate's FSDP plugin with ``fsdp_version=2``).

Under FSDP every trainable parameter is a `DTensor` sharded on dim 0 over the ranks, so rank ``s`` holds a column
shard ``J_s`` of every task's row (its slice of each parameter) and never the whole row.

**What works, and why it is exact.**

- *Gramian methods* (`GramianMethod` with the base ``aggregate``: pcgrad, mgda, cagrad, imtl, nash_mtl, upgrad,
  dualproj, aligned_mtl, fairgrad, modo, sdmgrad, krum, config, cr_mogm). Their update is ``d = wᵀ J`` with ``w``
  a function of the K x K Gramian only (Quinton & Rey, arXiv 2406.16232, §6). Since the shards split the columns,
  ``G = J Jᵀ = Σ_s J_s J_sᵀ``: each rank forms its shard's Gramian, one all-reduce of K x K numbers per block sums
  them, every rank gets the same ``G`` and so the same ``w``, and writes ``wᵀ J_s``, its shard of the update, into
  its parameters' ``.grad``. Nothing of size P crosses ranks beyond FSDP's own reduce-scatters.
- *Loss-weighting methods* (ew, ls, dwa, rlw, famo, gls, si, stch, group_dro): one backward of ``Σ_i w_i ℓ_i`` per
  micro-batch, reduce-scattered by FSDP like any loss.
- The per-task backwards run with FSDP's gradient sync on, so FSDP's post-backward hooks reduce-scatter each task's
  gradient as soon as it is formed: each rank receives its shard of the task's row already summed over the ranks.
  The engine normalises every task loss by its global item count (ranks must *sum*), so it sets FSDP's reduction
  to a plain sum (`FSDPModule.set_gradient_divide_factor(1)`, SUM-only collectives, which gloo also runs). The rows
  and plain gradients are *local* segments of the buffer (never all-reduced again), laid out by the shards' sizes;
  each backward's shard gradients (``p.grad.to_local()``) are added into them and ``p.grad`` is reset. The
  Trainer's ``no_sync`` on non-final micro-steps (`set_requires_gradient_sync(False)`) would leave unreduced
  gradients in FSDP's unsharded parameters and mix them into the next task's row, so every backward of the engine
  turns the sync on.
- At the sync step each ``.grad`` is a `DTensor` with the update as its local shard (the parameter's mesh and
  placements), so the optimizer, Accelerate's DTensor-aware gradient clipping and FSDP checkpoints see the usual
  FSDP gradients.
- Each backward is a collective, so every rank runs the same backwards in the same order: a task with a labelled
  item in a micro-batch on *any* rank is backpropagated on every rank, with its (zero, graph-connected) loss where
  the rank has none (`FSDPShards.require_loss`).
- Also under FSDP: ``mtl_blocks`` (per block or global), ``mtl_surgery_parameters``, bfloat16 rows, every task
  sampling strategy, gradient accumulation, loss transforms (the chain rule multiplies local rows), the step-wide
  item counts and the skip of non-finite steps (decided on all ranks together).

**What is refused at start, and why** (`fsdp_refusal`; use DDP, ``torchrun`` / ``accelerate launch`` without an
FSDP config, for these):

- methods that need whole rows (gradvac, db_mtl, moco, graddrop, gradnorm, trimmed_mean, excess_mtl, ...): their
  update is not ``wᵀ J`` with ``w`` from the Gramian (elementwise signs, per-layer cosines, running rows, norms
  of rows transformed before they are combined), so it would need each task's whole row on one rank, which FSDP
  is there to avoid;
- representation methods (mgda_ub, graddrop's feature mode) and ``mtl_jacobian_mode`` ``features`` / ``gramian``:
  they differentiate heads and modules with `torch.autograd.grad` and module hooks, which under FSDP see the
  unsharded working copies of the parameters, not the sharded parameters whose gradients FSDP reduces;
- SAM, ASAM and F-MTL: their perturbation needs the whole step's gradient norm and a restore of the sharded
  weights around re-sharding forwards; not implemented exactly under FSDP;
- methods with learnable parameters of their own (uw; imtl with its IMTL-L loss scales) when the optimizer is
  checkpointed: FSDP's optimizer checkpoint (`torch.distributed.checkpoint`) holds model parameters only and fails
  on any other at the first save. They train with ``save_only_model=True`` or ``save_strategy="no"`` (the trainer
  adds their parameter group after Accelerate's FSDP2 preparation, which maps every optimizer parameter to a
  sharded model parameter); imtl with ``{"loss_balancing": false}`` has none;
- FSDP1 (``fsdp_version=1``): it flattens parameters into flat buffers whose gradient views are not per-parameter
  shards; use ``fsdp_config={"fsdp_version": 2}``;
- a model with trainable parameters that FSDP does not shard, or sharded on another mesh than one dimension over
  every rank (HSDP, tensor parallelism): the Gramian would have to be summed over the shard group only and the
  unsharded gradients all-reduced on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .buffer import all_reduce_sum

if TYPE_CHECKING:
    from ..methods.base import GradientMethod
    from ..sharpness import Sharpness

#: The fix the refusals suggest for a configuration FSDP cannot run.
_USE_DDP = "use DDP (`torchrun` / `accelerate launch` without an FSDP config)"


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is a `DTensor` (a parameter that FSDP2 shards)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(param, dtensor)


def fsdp_refusal(
    method: GradientMethod,
    *,
    sharpness: Sharpness | None = None,
    jacobian_mode: str = "rows",
    fsdp_version: int = 2,
    saves_optimizer: bool = False,
) -> str | None:
    """Why a configuration cannot run under FSDP, with what to use instead; `None` when it can.

    Args:
        method (`GradientMethod`): the run's gradient method.
        sharpness (`Sharpness`, *optional*): the run's SAM variant.
        jacobian_mode (`str`, *optional*, defaults to `"rows"`): `mtl_jacobian_mode`.
        fsdp_version (`int`, *optional*, defaults to `2`): Accelerate's ``fsdp_version``.
        saves_optimizer (`bool`, *optional*, defaults to `False`): whether checkpoints hold the optimizer's state.
    """
    from ..methods.base import GramianMethod

    if fsdp_version != 2:
        return (
            f"hf_mtl runs FSDP2 only, got fsdp_version={fsdp_version}: FSDP1 flattens parameters into flat buffers, so "
            "no per-parameter shard of each task's gradient exists. Set `fsdp_config={'fsdp_version': 2}`"
        )
    if sharpness is not None:
        return (
            f"{type(sharpness).__name__} (`sam`) does not run under FSDP: its perturbation needs the whole step's "
            "gradient norm and a restore of the sharded weights, which hf_mtl does not do exactly under FSDP. Drop "
            f"`sam`, or {_USE_DDP}"
        )
    if jacobian_mode != "rows":
        return (
            f"`mtl_jacobian_mode`={jacobian_mode!r} does not run under FSDP: it differentiates modules and features "
            "with hooks and `autograd.grad`, which under FSDP see unsharded working copies of the parameters. Use "
            f"`mtl_jacobian_mode`='rows', or {_USE_DDP}"
        )
    name = method.name
    if method.requires_representation:
        return (
            f"`{name}` combines per-task gradients of the shared features, which under FSDP would be taken with "
            "respect to unsharded working copies of the heads. Use a Gramian method (pcgrad, mgda, cagrad, upgrad, "
            f"...) or a loss-weighting one, or {_USE_DDP}"
        )
    trainable = [p for p in method.parameters() if p.requires_grad]
    if trainable and saves_optimizer:
        hint = " (`mtl_method_kwargs={'loss_balancing': false}` turns IMTL-L's scales off)" if name == "imtl" else ""
        return (
            f"`{name}` trains {sum(p.numel() for p in trainable)} parameter(s) of its own, and FSDP's optimizer "
            "checkpoint holds model parameters only (it fails at the first save). Set `save_only_model=True` or "
            f"`save_strategy='no'`, use a method without learnable parameters{hint}, or {_USE_DDP}"
        )
    if method.requires_jacobian and not (
        isinstance(method, GramianMethod) and type(method).aggregate is GramianMethod.aggregate
    ):
        return (
            f"`{name}` needs each task's whole gradient row, but under FSDP each rank holds a shard of it; only "
            "methods whose update is wᵀJ with weights from the K x K Gramian (pcgrad, mgda, cagrad, imtl, nash_mtl, "
            "upgrad, dualproj, aligned_mtl, ...) and loss-weighting methods run sharded. Use one of those, or "
            f"{_USE_DDP}"
        )
    return None


def distribution_refusal(
    distributed_type: Any,
    *,
    method: GradientMethod,
    sharpness: Sharpness | None = None,
    jacobian_mode: str = "rows",
    fsdp_version: int | None = None,
    saves_optimizer: bool = False,
) -> str | None:
    """Why hf_mtl cannot run under Accelerate's ``distributed_type``, with what to use instead; `None` when it can.

    DeepSpeed is refused: it shards and reduces gradients inside its own engine, where no per-task row can be formed.
    FSDP runs the configurations of `fsdp_refusal`.
    """
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        return (
            "hf_mtl does not run under DeepSpeed: DeepSpeed reduces and shards gradients inside its own engine, so the "
            "per-task gradients that a multi-task method combines never exist. Use DDP (`torchrun` / `accelerate "
            "launch` without a DeepSpeed config), or FSDP2 with a Gramian or loss-weighting method"
        )
    if distributed_type == DistributedType.FSDP:
        return fsdp_refusal(
            method,
            sharpness=sharpness,
            jacobian_mode=jacobian_mode,
            fsdp_version=fsdp_version or 1,
            saves_optimizer=saves_optimizer,
        )
    return None


class FSDPShards:
    """The engine's view of a model whose trainable parameters FSDP2 shards (see the module docstring).

    Built by `MultiTaskEngine` when the model's trainable parameters are `DTensor` parameters; raises when the
    configuration or the sharding is one the engine cannot run exactly.

    Args:
        model (`nn.Module`): the model after ``fully_shard`` (its root and any submodules).
        params (`list[nn.Parameter]`): its trainable parameters (sharded ones, in ``named_parameters`` order).
        names (`dict[int, str]`): ``id(param)`` -> its name, for messages.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], names: dict[int, str]) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import Shard

        self.params = list(params)
        unsharded = [names[id(p)] for p in self.params if not is_sharded(p)]
        if unsharded:
            raise ValueError(
                f"under FSDP every trainable parameter must be sharded by `fully_shard`; {len(unsharded)} are not "
                f"(e.g. {unsharded[0]!r}): apply `fully_shard` to the root module (Accelerate's FSDP plugin does)"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        for p in self.params:
            mesh, placements = p.device_mesh, tuple(p.placements)
            if mesh.ndim != 1 or placements != (Shard(0),) or mesh.size() != world:
                raise ValueError(
                    f"parameter {names[id(p)]!r} is sharded as {placements} on a mesh of shape {tuple(mesh.shape)}; "
                    f"the engine runs FSDP2's one-dimensional sharding over all {world} ranks (Shard(0)) only, not "
                    "HSDP or tensor parallelism"
                )
        #: every FSDP unit of the model (each gets the plain-sum reduction)
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in self.modules:
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)

    @classmethod
    def from_model(cls, model: nn.Module, params: Sequence[nn.Parameter], names: dict[int, str]) -> FSDPShards | None:
        """`FSDPShards` when some trainable parameter of ``model`` is sharded, else `None`.

        The FSDP units are resharded first: after a forward without backward (evaluation) a unit that keeps its
        parameters unsharded (the root's default) has its unsharded working copies registered on the modules, and the
        engine must hold the sharded parameters, the optimizer's."""
        if not any(is_sharded(p) for p in params):
            return None
        return cls(model, params, names)

    @staticmethod
    def reshard(model: nn.Module) -> None:
        """Reshards every FSDP unit of ``model`` so that ``named_parameters()`` yields the sharded parameters."""
        if _dtensor_type() is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ------------------------------------------------------------------ backwards
    def backward(
        self, loss: Tensor, pairs: Sequence[tuple[nn.Parameter, Tensor]], *, retain_graph: bool = False
    ) -> None:
        """One backward with FSDP's reduce-scatter on; adds each pair's shard gradient (summed over the ranks) into its
        view and resets every ``.grad``.

        The backward takes no ``inputs``: autograd sees FSDP's unsharded working copies, not the sharded parameters,
        and FSDP's post-backward hooks move the reduced gradients onto the sharded ones. Every ``.grad`` is reset
        before as well: FSDP adds into an existing sharded gradient, and a ``zero_grad`` after a forward without
        backward (FAMO's losses after the step) only reaches the unsharded working copies of the root unit."""
        for module in self.modules:
            module.set_requires_gradient_sync(True, recurse=False)
        for p in self.params:
            p.grad = None
        torch.autograd.backward(loss, retain_graph=retain_graph)
        with torch.no_grad():
            present = [(view, p.grad.to_local()) for p, view in pairs if p.grad is not None]
            if present:
                torch._foreach_add_([v for v, _ in present], [g.to(v.dtype) for v, g in present])
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ combination
    @staticmethod
    def all_reduce_gramian(gramian: Tensor) -> Tensor:
        """``G = Σ_s J_s J_sᵀ``: sums the ranks' shard Gramians in place."""
        return all_reduce_sum(gramian)

    @staticmethod
    def all_finite(value: Tensor) -> bool:
        """Whether ``value`` (a sum over this rank's shards) is finite on every rank: one collective of one number, so
        that all ranks skip the same steps and run the same collectives."""
        total = value.detach().float().reshape(1).clone()
        return bool(torch.isfinite(all_reduce_sum(total)).all())

    @staticmethod
    def as_grad(param: nn.Parameter, local: Tensor) -> Any:
        """A `DTensor` gradient for ``param`` with ``local`` as this rank's shard (its mesh, placements and shape)."""
        from torch.distributed.tensor import DTensor

        local = local if local.dtype == param.dtype else local.to(param.dtype)
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    @staticmethod
    def window_presence(stacked: Tensor) -> Tensor:
        """Per micro-batch and task, the labelled items summed over the ranks (one collective of M x K numbers): a task
        with an item on any rank takes part in that micro-batch on every rank."""
        return all_reduce_sum(stacked.clone())

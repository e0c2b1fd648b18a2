"""`MultiTaskTrainingArguments`: the `TrainingArguments` of a multi-task run (TRL-style config)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .data.sampling import list_samplers
from .methods import list_methods
from .sharpness import list_sharpness

#: Values of `mtl_blocks`.
MTL_BLOCKS = ("per_block", "global")
#: Values of `mtl_jacobian_mode` (the engine's `JACOBIAN_MODES`).
JACOBIAN_MODES = ("rows", "features", "gramian")

#: Values of `sam` that turn sharpness-aware training off.
_SAM_OFF = (None, "", "none")


@dataclass
class MultiTaskTrainingArguments(TrainingArguments):
    r"""
    Configuration of [`MultiTaskTrainer`]: every field of [`~transformers.TrainingArguments`] plus the ones below.

    Using [`~transformers.HfArgumentParser`] (as `hf-mtl train` does), these arguments become command-line flags
    (`--mtl_method pcgrad`); dictionaries are given as JSON strings.

    Parameters:
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Allow `train()` to write into an `output_dir` that already holds files. Without it, a non-empty
            `output_dir` is refused unless the run resumes from a checkpoint, so nothing is overwritten silently.

        > Gradient method (docs/methods.md)

        mtl_method (`str`, *optional*, defaults to `"ew"`):
            How the per-task gradients are combined: one of `hf_mtl.methods.list_methods()`. Loss-weighting methods
            (`ew`, `ls`, `uw`, `dwa`, `rlw`, `famo`, ...) cost one backward of a weighted loss; the others build the
            K x P Jacobian of the shared parameters (one backward per task).
        mtl_method_kwargs (`dict` or `str`, *optional*):
            Keyword arguments of the method (e.g. `{"c": 0.5}` for `cagrad`), as a dict or a JSON string. `num_tasks`
            is filled in by the trainer.
        mtl_method_learning_rate (`float`, *optional*):
            Learning rate of the method's own learnable parameters (UW's log-variances, IMTL-L's scales, GradNorm's
            weights), which the trainer adds to the optimizer as their own parameter group without weight decay.
            Defaults to `learning_rate`.

        mtl_blocks (`str`, *optional*, defaults to `"per_block"`):
            `per_block`: the shared parameters are grouped by the set of tasks that reach them (one encoder and its
            modality's tasks, a trunk and every task), and the method solves one problem per block on that block's
            rows, so an unrelated encoder never changes another's step. `global`: one problem over every shared
            parameter and every task (the Jacobian of all shared parameters at once). The run logs which at start.
        mtl_jacobian_mode (`str`, *optional*, defaults to `"rows"`):
            `rows`: each task's exact gradient of the shared parameters (one row per task and block; on per-task
            batches the K backwards cost one). `features`: for methods that weight tasks from their Gramian, the
            Gramian of the per-task gradients with respect to the shared features, then one backward of
            Σ_i w_i L_i (MGDA-UB's trick for every Gramian method: about one plain step). `gramian`: each block's
            exact K x K Gramian on shared-input sub-batches without ever holding the K x P rows (module hooks, as
            TorchJD's autogram engine), then one weighted backward.
        mtl_surgery_parameters (`list[str]`, *optional*):
            Regular expressions (searched in the parameter name): surgery acts only on the shared parameters that
            match one (e.g. `["lora_"]`, `["encoder\\.layer\\.(10|11)\\."]`); the other shared parameters get the
            plain gradient of the summed objective Σ_i L_i. Each must match a shared parameter.
        mtl_rows_dtype (`str`, *optional*, defaults to `"float32"`):
            Storage of the Jacobian rows: `float32` or `bfloat16` (half the memory; Gramians and updates are formed
            in float32 from column chunks).
        mtl_skip_non_finite_steps (`bool`, *optional*, defaults to `True`):
            Without a GradScaler (fp32, bf16), a step whose loss or gradient is not finite is skipped (no parameter
            moves), logged and counted (`mtl/skipped_steps`), instead of writing NaN into the weights. Under fp16 the
            GradScaler decides, as for a plain Trainer.

        > Task sampling (which tasks appear in each step; docs/architecture.md step 1)

        task_sampling (`str`, *optional*, defaults to `"all"`):
            One of `hf_mtl.data.list_samplers()`: `all` (every task every step), `proportional`, `temperature`,
            `uniform`, `round_robin`, `annealed`.
        sampling_temperature (`float`, *optional*, defaults to `2.0`):
            T of `temperature` sampling, p_i ∝ n_i^(1/T).
        task_batch_sizes (`dict[str, int]` or `str`, *optional*):
            Per-task, per-device training batch sizes, e.g. `{"digit": 16, "coarse": 32}`; tasks not named use
            `per_device_train_batch_size`. Tasks that share one dataset must share one batch size.

        > Sharpness-aware training (Foret et al., ICLR 2021; Kwon et al., ICML 2021; Phan et al., arXiv 2211.13723)

        sam (`str`, *optional*):
            `sam` (Foret et al.), `asam` (Kwon et al.) or `fmtl` (task-based flat regions, Phan et al.); `None` or
            `"none"` for plain training.
        sam_rho (`float`, *optional*):
            Radius ρ of the perturbation. Defaults to the variant's: 0.05 for `sam` and `fmtl` (Foret et al.), 0.5
            for `asam` (Kwon et al., CIFAR-10); F-MTL's released runs use 2.0 with `sam_adaptive=True`.
        sam_adaptive (`bool`, *optional*, defaults to `False`):
            Scale the perturbation by the weights (ASAM's T_w = |w| + η). Implied by `sam="asam"`; with `fmtl` it gives
            the perturbation of F-MTL's released code.
        sam_eta (`float`, *optional*, defaults to `0.01`):
            η of ASAM's T_w = |w| + η.
        sam_scope (`str`, *optional*, defaults to `"step"`):
            `step`: the perturbation follows the gradient of the whole step (every micro-batch, every rank; the
            micro-batches are replayed at the perturbed weights), so gradient accumulation equals the large batch and
            two processes equal one ("exact SAM"). `micro_batch`: each micro-batch is perturbed along its own
            gradient on its own rank ("m-sharpness").

        > Single-task baselines and Δm

        mtl_baselines (`str`, *optional*):
            The single-task baselines of the run: the `baselines.json` that `hf-mtl baseline RECIPE` writes (or its
            folder, by default `<output_dir>-baselines`; `hf-mtl train` fills this in from there when it exists).
            `evaluate()` then reports `eval_delta_m`, Δm% against them (Maninis et al., 2019; lower is better,
            negative beats the baselines), and `metric_for_best_model="delta_m"` selects on it (`greater_is_better`
            then defaults to `False`).

        > Gradient-conflict diagnostics (Elich et al., "Examining Common Paradigms in Multi-Task Learning", §4.2)

        mtl_diagnostics_steps (`int`, *optional*, defaults to `0`):
            Measure inter-task and inter-sample gradient conflict on the shared parameters at step 0 and after every
            this many optimizer steps (`hf_mtl.callbacks.GradientDiagnosticsCallback`): cosine and magnitude
            similarity, the ratio of conflicting gradient parameters and the fraction of conflicting pairs, per block
            of shared parameters, logged as `diagnostics/<block>/...` to every `report_to` integration and written to
            `<output_dir>/mtl_diagnostics.jsonl`. `0` turns them off (nothing is registered). Elich et al. measure
            every 5 iterations.
        mtl_diagnostics_samples (`int`, *optional*, defaults to `8`):
            Probe rows per task group in each measurement, drawn at random from the training data (and the most
            tasks of one block measured; more are drawn at random), as Elich et al.'s "8 random samples or tasks".
            At least 2.
        mtl_diagnostics_per_sample (`str`, *optional*, defaults to `"vmap"`):
            How per-sample gradients are computed: `vmap` (one batched forward and a `torch.func.vmap`-ped backward)
            or `loop` (one forward and backward per sample); the same numbers.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into a non-empty `output_dir` (otherwise refused, unless resuming)."},
    )
    mtl_method: str = field(
        default="ew",
        metadata={"help": "How the per-task gradients are combined.", "choices": list_methods()},
    )
    mtl_method_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of the gradient method, as a JSON string (e.g. '{\"c\": 0.5}')."},
    )
    mtl_method_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the method's own parameters (defaults to `learning_rate`)."},
    )
    mtl_blocks: str = field(
        default="per_block",
        metadata={"help": "One method problem per shared block, or one global problem.", "choices": list(MTL_BLOCKS)},
    )
    mtl_jacobian_mode: str = field(
        default="rows",
        metadata={
            "help": "Per-task gradients as exact rows, feature-level Gramians, or exact Gramians without rows.",
            "choices": list(JACOBIAN_MODES),
        },
    )
    mtl_surgery_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions: surgery only on the shared parameters whose name matches one."},
    )
    mtl_rows_dtype: str = field(
        default="float32",
        metadata={"help": "Storage of the Jacobian rows.", "choices": ["float32", "bfloat16"]},
    )
    mtl_skip_non_finite_steps: bool = field(
        default=True,
        metadata={"help": "Skip (and count) a step whose gradients are not finite, without a GradScaler."},
    )
    task_sampling: str = field(
        default="all",
        metadata={"help": "Which tasks appear in each step.", "choices": list_samplers()},
    )
    sampling_temperature: float = field(
        default=2.0,
        metadata={"help": "Temperature T of `temperature` sampling: p_i proportional to n_i^(1/T)."},
    )
    task_batch_sizes: dict | str | None = field(
        default=None,
        metadata={"help": "Per-task per-device train batch sizes as JSON, e.g. '{\"digit\": 16}'."},
    )
    sam: str | None = field(
        default=None,
        metadata={"help": "Sharpness-aware training: sam, asam or fmtl.", "choices": ["none", *list_sharpness()]},
    )
    sam_rho: float | None = field(
        default=None,
        metadata={"help": "Radius rho of the perturbation (default: 0.05 for sam and fmtl, 0.5 for asam)."},
    )
    sam_adaptive: bool = field(
        default=False, metadata={"help": "Scale the perturbation by |w| + eta (ASAM); implied by sam=asam."}
    )
    sam_eta: float = field(default=0.01, metadata={"help": "eta of ASAM's T_w = |w| + eta."})
    sam_scope: str = field(
        default="step",
        metadata={
            "help": "Perturb along the whole step's gradient (exact), or each micro-batch's own (m-sharpness).",
            "choices": ["step", "micro_batch"],
        },
    )
    mtl_baselines: str | None = field(
        default=None,
        metadata={
            "help": "The single-task baselines (baselines.json of `hf-mtl baseline`, or its folder); evaluate() then "
            "reports eval_delta_m (lower is better)."
        },
    )
    mtl_diagnostics_steps: int = field(
        default=0,
        metadata={"help": "Measure gradient conflict every this many steps (0: off; Elich et al. use 5)."},
    )
    mtl_diagnostics_samples: int = field(
        default=8, metadata={"help": "Probe rows per task group (and most tasks per block) in each measurement."}
    )
    mtl_diagnostics_per_sample: str = field(
        default="vmap",
        metadata={"help": "How per-sample gradients are computed.", "choices": ["vmap", "loop"]},
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and not _has_accelerator():
            # On a machine without an accelerator, say so to Accelerate: `torchrun` / `accelerate launch` then run as
            # MULTI_CPU (gloo) instead of one independent process per rank, and `bf16` autocasts on the CPU.
            self.use_cpu = True
        self.mtl_method_kwargs = _as_dict("mtl_method_kwargs", self.mtl_method_kwargs)
        self.task_batch_sizes = _as_dict("task_batch_sizes", self.task_batch_sizes)
        greater_is_better_given = self.greater_is_better is not None
        super().__post_init__()
        methods = list_methods()
        if self.mtl_method not in methods:
            raise ValueError(f"`mtl_method` must be one of {', '.join(methods)}; got {self.mtl_method!r}")
        if "num_tasks" in self.mtl_method_kwargs:
            raise ValueError("`mtl_method_kwargs` must not set `num_tasks`: the trainer fills it in from the tasks")
        if self.mtl_method_learning_rate is not None and not self.mtl_method_learning_rate >= 0:
            raise ValueError(f"`mtl_method_learning_rate` must be >= 0, got {self.mtl_method_learning_rate}")
        for name, valid in (
            ("mtl_blocks", MTL_BLOCKS),
            ("mtl_jacobian_mode", JACOBIAN_MODES),
            ("mtl_rows_dtype", ("float32", "bfloat16")),
            ("sam_scope", ("step", "micro_batch")),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"`{name}` must be one of {', '.join(valid)}; got {getattr(self, name)!r}")
        if isinstance(self.mtl_surgery_parameters, str):
            self.mtl_surgery_parameters = [self.mtl_surgery_parameters]
        if self.mtl_surgery_parameters is not None:
            import re

            for pattern in self.mtl_surgery_parameters:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ValueError(
                        f"`mtl_surgery_parameters` must be regular expressions; {pattern!r} is not: {error}"
                    ) from error
        samplers = list_samplers()
        if self.task_sampling not in samplers:
            raise ValueError(f"`task_sampling` must be one of {', '.join(samplers)}; got {self.task_sampling!r}")
        if not (isinstance(self.sampling_temperature, (int, float)) and self.sampling_temperature > 0):
            raise ValueError(f"`sampling_temperature` must be > 0, got {self.sampling_temperature!r}")
        for task, size in self.task_batch_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"`task_batch_sizes` must map task names to positive integers; {task!r}: {size!r}")
        if self.sam in _SAM_OFF:
            self.sam = None
        elif self.sam not in list_sharpness():
            raise ValueError(f"`sam` must be one of none, {', '.join(list_sharpness())}; got {self.sam!r}")
        if self.sam_rho is None and self.sam is not None:
            self.sam_rho = _default_rho(self.sam)
        if self.sam_rho is not None and not (
            isinstance(self.sam_rho, (int, float)) and math.isfinite(self.sam_rho) and self.sam_rho > 0
        ):
            raise ValueError(f"`sam_rho` must be > 0, got {self.sam_rho!r}")
        if not (isinstance(self.sam_eta, (int, float)) and self.sam_eta >= 0):
            raise ValueError(f"`sam_eta` must be >= 0, got {self.sam_eta!r}")
        if self.sam == "asam":
            self.sam_adaptive = True
        if self.mtl_baselines is not None:
            from .baselines import load_baselines

            if not isinstance(self.mtl_baselines, str) or not self.mtl_baselines:
                raise ValueError(f"`mtl_baselines` must be the path of a baselines.json, got {self.mtl_baselines!r}")
            load_baselines(self.mtl_baselines, field="mtl_baselines")  # a clear error now, not at the first evaluation
        if self.metric_for_best_model in ("delta_m", "eval_delta_m"):
            if self.mtl_baselines is None:
                raise ValueError(
                    "`metric_for_best_model`='delta_m' needs `mtl_baselines`, the single-task baselines that Δm is "
                    "measured against: run `hf-mtl baseline RECIPE` first, or pass `mtl_baselines=<baselines.json>`"
                )
            # TrainingArguments takes every metric whose name does not end in "loss" as higher-is-better; Δm is lower
            if not greater_is_better_given:
                self.greater_is_better = False
            elif self.greater_is_better:
                raise ValueError(
                    "`metric_for_best_model`='delta_m' with `greater_is_better=True` would keep the worst checkpoint: "
                    "Δm is lower-is-better (negative beats the baselines); leave `greater_is_better` unset"
                )
        for name, minimum in (("mtl_diagnostics_steps", 0), ("mtl_diagnostics_samples", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        if self.mtl_diagnostics_per_sample not in ("vmap", "loop"):
            raise ValueError(
                f"`mtl_diagnostics_per_sample` must be one of vmap, loop; got {self.mtl_diagnostics_per_sample!r}"
            )


def _has_accelerator() -> bool:
    """Whether a CUDA, XPU or MPS device is there."""
    import torch

    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return torch.cuda.is_available() or has_xpu or has_mps


def _default_rho(variant: str) -> float:
    """The default ρ of a sharpness variant (its constructor's)."""
    import inspect

    from .sharpness import SHARPNESS

    return float(inspect.signature(SHARPNESS.get(variant).__init__).parameters["rho"].default)


def _as_dict(name: str, value: Any) -> dict[str, Any]:
    """A dict field given as a dict, a JSON string or `None` (-> `{}`)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a JSON object, got {value!r}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict (or a JSON object), got {type(value).__name__}: {value!r}")
    return dict(value)

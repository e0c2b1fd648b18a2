"""Hub-ready run folders: what a saved run holds, its model card, and the push.

The final save of a run (`MultiTaskTrainer.save_model`, which ``hf-mtl train`` calls) writes one folder that
is ready for the Hub as it is, and a push uploads exactly that folder:

| file | what |
| --- | --- |
| ``config.json``, ``model.safetensors`` | the `MultiTaskModel` (``AutoModel.from_pretrained`` loads it after ``import hf_mtl``) |
| ``processors/<encoder>/`` | each encoder's tokenizer / image processor / feature extractor, and ``collator_config.json``: the collator that turned rows into the encoder's inputs (``max_length``, ``max_length_seconds``, the sampling rate, ...), so that inference prepares inputs exactly as training did |
| ``recipe.yaml`` | the recipe with every override applied (runs built from a recipe) |
| ``eval_results.json`` | the last evaluation on the full eval sets (``eval_<task>_<metric>``, ``eval_delta_m``) |
| ``baselines.json`` | a copy of the single-task baselines (`hf_mtl.baselines`) when the run had any |
| ``README.md`` | the model card (`build_model_card`) |
| ``training_args.bin`` | the Trainer's arguments, as the Trainer saves them |

Order of a push (``push_to_hub=True``, or ``hf-mtl push RUN_DIR REPO_ID``): the model, processors and collator
configs are saved, then ``recipe.yaml``, ``eval_results.json`` and ``baselines.json``, then the model card is
written from those files, and only then is the folder uploaded (``HfApi.upload_folder``, with the Trainer's
ignore patterns: ``_*`` and ``checkpoint-*``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from transformers.utils import logging

logger = logging.get_logger(__name__)

PROCESSORS_DIR = "processors"
COLLATOR_CONFIG_NAME = "collator_config.json"
RECIPE_NAME = "recipe.yaml"
EVAL_RESULTS_NAME = "eval_results.json"
#: The run folder's copy of its single-task baselines (`hf_mtl.baselines.BASELINES_NAME`).
BASELINES_COPY = "baselines.json"
MODEL_CARD_NAME = "README.md"
PLOTS_DIR = "plots"
#: What the Trainer's pushes leave out of the uploaded folder (private files and checkpoints).
IGNORE_PATTERNS = ["_*", "checkpoint-*"]
#: The training arguments the model card reports (and keeps in its metadata, under ``hf_mtl``).
CARD_SETTINGS = (
    "mtl_method",
    "mtl_method_kwargs",
    "sam",
    "sam_rho",
    "sam_adaptive",
    "sam_eta",
    "task_sampling",
    "sampling_temperature",
    "task_batch_sizes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "seed",
    "bf16",
    "fp16",
    "world_size",
)
_TASK_TYPES = {"text": "text-classification", "vision": "image-classification", "speech": "audio-classification"}


# ---------------------------------------------------------------------------------------------- collators
def _processor_kind(processor: Any) -> str | None:
    """``tokenizer``, ``image_processor``, ``feature_extractor`` or ``processor`` (a multi-modal one)."""
    from transformers import PreTrainedTokenizerBase
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.processing_utils import ProcessorMixin

    for kind, cls in (
        ("processor", ProcessorMixin),
        ("tokenizer", PreTrainedTokenizerBase),
        ("image_processor", BaseImageProcessor),
        ("feature_extractor", FeatureExtractionMixin),
    ):
        if isinstance(processor, cls):
            return kind
    return None


_PROCESSOR_ARGUMENTS = ("tokenizer", "image_processor", "feature_extractor", "processor")


def collator_config(collator: Any) -> dict[str, Any] | None:
    """The constructor options of a built-in collator (`TextCollator`, `VisionCollator`, `SpeechCollator`),
    read back from the attributes it stores; `None` for any other collator (which inference must be given)."""
    from .data.collators import EncoderInputsCollator, SpeechCollator, TextCollator, VisionCollator

    if isinstance(collator, EncoderInputsCollator) and collator.fallback is not None:
        collator = collator.fallback  # raw inputs at inference go where the training rows without features went
    if not isinstance(collator, (TextCollator, VisionCollator, SpeechCollator)):
        return None
    options = {}
    for name in inspect.signature(type(collator).__init__).parameters:
        if name in ("self", *_PROCESSOR_ARGUMENTS) or not hasattr(collator, name):
            continue
        value = getattr(collator, name)
        try:
            json.dumps(value)
        except TypeError:
            return None
        options[name] = value
    return {"collator_class": type(collator).__name__, "options": options}


def collator_processor(collator: Any) -> Any | None:
    """The processor a built-in collator holds (its tokenizer, image processor or feature extractor)."""
    for name in _PROCESSOR_ARGUMENTS:
        value = getattr(collator, name, None)
        if value is not None and _processor_kind(value) is not None:
            return value
    return None


def save_encoder_files(
    output_dir: str | os.PathLike, key: str, collator: Any, processor: Any | None, sampling_rate: int | None = None
) -> None:
    """Writes ``processors/<key>/``: the encoder's processor (``save_pretrained``) and ``collator_config.json``.

    Args:
        output_dir: the saved model folder.
        key: the encoder key.
        collator: the collator the run used for that encoder.
        processor: the processor the run was given for that encoder (else the one the collator holds).
        sampling_rate: the rate of the training audio, recorded for a speech collator that did not fix one, so
            that inference resamples other rates instead of reading them at the wrong speed.
    """
    folder = os.path.join(str(output_dir), PROCESSORS_DIR, key)
    processor = processor if processor is not None else collator_processor(collator)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(folder)
    config = collator_config(collator)
    if config is None:
        logger.warning(
            f"encoder {key!r}: its collator {type(collator).__name__} is not a built-in one, so its options are not "
            "saved; pass it as `collators={...}` to the inference pipeline"
        )
        return
    if sampling_rate is not None and config["options"].get("sampling_rate", 0) is None:
        config["options"]["sampling_rate"] = int(sampling_rate)
    config["processor"] = _processor_kind(processor) if processor is not None else None
    config["processor_class"] = type(processor).__name__ if processor is not None else None
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, COLLATOR_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_encoder_collator(name_or_path: str, key: str, encoder: Any, **hub_kwargs: Any) -> tuple[Any, Any | None]:
    """The (collator, processor) of encoder ``key`` of a saved model: a local folder or a Hub repository (its cache
    works offline), read from ``processors/<key>/``. Without a ``collator_config.json``, the processor's default
    collator, or the trainer's default for an encoder that reads pixels or raw waveforms."""
    import transformers
    from transformers.utils import cached_file

    from .data.collators import SpeechCollator, TextCollator, VisionCollator, collator_for

    subfolder = f"{PROCESSORS_DIR}/{key}"
    path = cached_file(
        name_or_path,
        COLLATOR_CONFIG_NAME,
        subfolder=subfolder,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    config: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    kind = config.get("processor", "unknown")
    loaders = {
        "tokenizer": transformers.AutoTokenizer,
        "image_processor": transformers.AutoImageProcessor,
        "feature_extractor": transformers.AutoFeatureExtractor,
        "processor": transformers.AutoProcessor,
    }
    processor = None
    # the saved class itself when transformers has it; the Auto classes are given the encoder's config, which a
    # processors/<key>/ folder does not hold
    cls = getattr(transformers, str(config.get("processor_class")), None) if config.get("processor_class") else None
    auto = {"config": getattr(encoder, "config", None)}
    if cls is not None and hasattr(cls, "from_pretrained"):
        processor = cls.from_pretrained(name_or_path, subfolder=subfolder, **hub_kwargs)
    elif kind in loaders:
        processor = loaders[kind].from_pretrained(name_or_path, subfolder=subfolder, **auto, **hub_kwargs)
    elif kind == "unknown":  # a folder saved without collator configs: whatever processor is there
        for loader in (transformers.AutoTokenizer, transformers.AutoImageProcessor, transformers.AutoFeatureExtractor):
            try:
                processor = loader.from_pretrained(name_or_path, subfolder=subfolder, **auto, **hub_kwargs)
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
    options = dict(config.get("options", {}))
    classes = {cls.__name__: cls for cls in (TextCollator, VisionCollator, SpeechCollator)}
    if "collator_class" in config:
        cls = classes.get(config["collator_class"])
        if cls is None:
            raise ValueError(
                f"{name_or_path}: encoder {key!r} was saved with collator {config['collator_class']!r}, which is not "
                f"one of {', '.join(classes)}; pass it as `collators`"
            )
        if processor is not None:
            argument = {
                TextCollator: "tokenizer",
                VisionCollator: "image_processor",
                SpeechCollator: "feature_extractor",
            }
            part = collator_for(processor)  # the part of a multi-modal processor that the collator reads
            collator = cls(**{argument[cls]: collator_processor(part)}, **options)
        else:
            collator = cls(**options)
        return collator, processor
    if processor is not None:
        return collator_for(processor), processor
    from .trainer import _default_collator

    return _default_collator(key, encoder), None


def observed_sampling_rate(collator: Any, dataset: Any) -> int | None:
    """The sampling rate of the first row of a map-style data set, where a `SpeechCollator` reads it: the
    ``sampling_rate`` of an audio dict (``datasets.Audio``), else the row's `sampling_rate_column`."""
    from .data.collators import EncoderInputsCollator, SpeechCollator
    from .data.loader import fetch_rows, is_iterable_dataset

    if isinstance(collator, EncoderInputsCollator) and collator.fallback is not None:
        collator = collator.fallback
    if not isinstance(collator, SpeechCollator) or dataset is None or is_iterable_dataset(dataset):
        return None
    try:
        row = fetch_rows(dataset, [0])[0]
    except (KeyError, IndexError, ValueError, TypeError):
        return None
    audio = row.get(collator.audio_column)
    rate = audio.get("sampling_rate") if isinstance(audio, Mapping) else None
    rate = rate if rate is not None else row.get(collator.sampling_rate_column)
    return int(rate) if rate is not None else None


# ---------------------------------------------------------------------------------------------- model card
def training_settings(args: Any) -> dict[str, Any]:
    """The JSON-safe training arguments that the model card reports (`CARD_SETTINGS`)."""
    settings = {}
    for name in CARD_SETTINGS:
        value = getattr(args, name, None)
        if hasattr(value, "value"):  # enums (lr_scheduler_type, optim)
            value = value.value
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        settings[name] = value
    return settings


def _read_json(path: str) -> Any | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_hub_id(name: Any) -> bool:
    """Whether ``name`` reads as a Hub repository id (``org/name`` or ``name``) rather than a path."""
    return (
        isinstance(name, str)
        and not name.startswith(("pkg://", "/", ".", "~"))
        and not os.path.exists(name)
        and re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is not None
    )


def _encoder_modality(config: Any) -> str:
    """``text``, ``vision`` or ``speech``, from the input the encoder's class reads."""
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except KeyError:
        return "other"
    main_input = getattr(cls, "main_input_name", "input_ids")
    return {"pixel_values": "vision", "input_values": "speech", "input_features": "speech"}.get(main_input, "text")


def _results_by_task(results: Mapping[str, Any], task_names: list[str]) -> dict[str, dict[str, Any]]:
    """``eval_<task>_<metric>`` results split by task (the longest task name that prefixes a key wins, so
    ``fine`` and ``fine_grained`` stay apart), metrics sorted, the loss last."""
    split: dict[str, dict[str, Any]] = {}
    for key, value in results.items():
        owners = [name for name in task_names if key.startswith(f"eval_{name}_")]
        if owners:
            owner = max(owners, key=len)
            split.setdefault(owner, {})[key[len(f"eval_{owner}_") :]] = value
    return {
        task: dict(sorted(values.items(), key=lambda item: (item[0] == "loss", item[0])))
        for task, values in split.items()
    }


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def build_model_card(
    folder: str | os.PathLike,
    model_name: str | None = None,
    repo_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """The model card of a saved run folder, from its files alone (``config.json``, ``recipe.yaml``,
    ``eval_results.json``, ``baselines.json``, ``plots/*.png``), as a `huggingface_hub.ModelCard`.

    Metadata: ``library_name: hf_mtl``, tags (``hf_mtl``, ``multi-task-learning``, the method, the task types),
    ``base_model`` and ``datasets`` where the recipe names them by Hub id, a ``model-index`` with every task
    metric, and ``hf_mtl`` (the training settings, so that the card can be rebuilt from the folder). Body: the
    tasks and their data, the encoders, the method and SAM settings, per-task metrics (with the single-task
    baselines and Δm when there are any), the plots, the command that reproduces the run, and how to use it.

    Args:
        folder: the saved run.
        model_name: the card's title (default: the repository name, else the folder name).
        repo_id: the Hub repository, for the usage example (default: the folder).
        settings: `training_settings` of the run; default: those stored in an existing card of the folder.
        language, license, tags: further metadata, as `Trainer.create_model_card` takes them.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .modeling import MultiTaskConfig

    folder = str(folder)
    config = MultiTaskConfig.from_pretrained(folder)
    recipe = None
    if os.path.isfile(os.path.join(folder, RECIPE_NAME)):
        with open(os.path.join(folder, RECIPE_NAME), encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
    results = _read_json(os.path.join(folder, EVAL_RESULTS_NAME)) or {}
    baselines_data = _read_json(os.path.join(folder, BASELINES_COPY))
    baselines = (baselines_data or {}).get("tasks", {})
    if os.path.isfile(os.path.join(folder, MODEL_CARD_NAME)):  # a card rebuilt keeps what the earlier one recorded
        previous = ModelCard.load(os.path.join(folder, MODEL_CARD_NAME)).data.to_dict()
        settings = previous.get("hf_mtl") if settings is None else settings
        language = language if language is not None else previous.get("language")
        license = license if license is not None else previous.get("license")
        tags = list(tags or []) + [tag for tag in previous.get("tags") or [] if tag not in (tags or [])]
    settings = dict(settings or {})
    name = model_name or (repo_id.split("/")[-1] if repo_id else Path(folder).resolve().name)
    where = repo_id or folder

    tasks = config.tasks
    recipe_tasks = {entry.get("name"): entry for entry in (recipe or {}).get("tasks", [])}
    recipe_data = (recipe or {}).get("data", {}) or {}
    recipe_encoders = (recipe or {}).get("encoders", {}) or {}
    modality = {key: _encoder_modality(config.encoder_config(key)) for key in config.encoders}

    def data_of(task: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        key = recipe_tasks.get(task["name"], {}).get("data")
        return (key, recipe_data.get(key, {})) if key else ("", {})

    def data_id(spec: Mapping[str, Any], key: str) -> str:
        options = spec.get("options") or {}
        path = options.get("path") if spec.get("loader") == "load_dataset" else None
        return str(path or spec.get("loader") or key or "unknown")

    # ---- metadata
    base_models = sorted(
        {str(spec.get("pretrained")) for spec in recipe_encoders.values() if _is_hub_id(spec.get("pretrained"))}
    )
    hub_datasets = sorted(
        {
            data_id(spec, key)
            for key, spec in recipe_data.items()
            if spec.get("loader") == "load_dataset" and _is_hub_id((spec.get("options") or {}).get("path"))
        }
    )
    eval_results = []
    for task in tasks:
        key, spec = data_of(task)
        task_type = (
            "token-classification"
            if task["head"] == "token_classification"
            else _TASK_TYPES.get(modality.get(task["encoder"]), "other")
        )
        for metric in task.get("metrics") or []:
            value = results.get(f"eval_{task['name']}_{metric}")
            if isinstance(value, (int, float)):
                eval_results.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task["name"],
                        dataset_type=data_id(spec, key),
                        dataset_name=key or task["name"],
                        dataset_split=spec.get("eval_split", "test") if spec else None,
                        metric_type=metric,
                        metric_value=float(value),
                    )
                )
    card_tags = ["hf_mtl", "multi-task-learning"]
    if settings.get("mtl_method"):
        card_tags.append(str(settings["mtl_method"]))
    if settings.get("sam"):
        card_tags.append(str(settings["sam"]))
    card_tags += sorted({_TASK_TYPES[m] for m in modality.values() if m in _TASK_TYPES})
    for tag in tags or []:
        if tag not in card_tags:
            card_tags.append(tag)
    data = ModelCardData(
        library_name="hf_mtl",
        tags=card_tags,
        language=language,
        license=license,
        base_model=base_models or None,
        datasets=hub_datasets or None,
        model_name=name,
        eval_results=eval_results or None,
        hf_mtl=settings or None,
    )

    # ---- body
    lines = [f"# {name}", ""]
    if recipe and recipe.get("description"):
        lines += [str(recipe["description"]), ""]
    lines += [
        f"A multi-task model trained with hf_mtl: {len(tasks)} task(s) on {len(config.encoders)} encoder(s), one "
        "`MultiTaskModel` whose encoders run once per input and feed one head per task.",
        "",
        "## Tasks",
        "",
        "| task | encoder | head | labels | data | metrics |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task in tasks:
        key, spec = data_of(task)
        if spec:
            source = spec.get("data_dir") or (spec.get("options") or {}).get("path") or "sample shipped with hf_mtl"
            split = f"train: `{spec.get('train_split', 'train')}`, eval: `{spec.get('eval_split', 'test')}`"
            data_text = f"`{key}` ({spec.get('loader')}: {source}; {split}; column `{task.get('label_column')}`)"
        else:
            data_text = "not recorded (trained from Python)"
        names = task.get("label_names")
        labels = f"{task['num_labels']}" + (
            f" ({', '.join(map(str, names[:8]))}{', ...' if len(names) > 8 else ''})" if names else ""
        )
        lines.append(
            f"| {task['name']} | {task['encoder']} | {task['head']} | {labels} | {data_text} | "
            f"{', '.join(task.get('metrics') or [])} |"
        )
    lines += [
        "",
        "## Encoders",
        "",
        "| encoder | modality | model type | from | adapter |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in sorted(config.encoders):
        encoder = config.encoders[key]
        spec = recipe_encoders.get(key, {})
        if spec.get("pretrained"):
            source = f"`{spec['pretrained']}`"
        elif spec.get("config"):
            source = "built from a config (random initialisation)"
        else:
            source = f"`{encoder.get('_name_or_path')}`" if encoder.get("_name_or_path") else "not recorded"
        if spec.get("freeze"):
            source += f"; frozen: {', '.join(map(str, spec['freeze']))}"
        adapter = config.adapters.get(key, {}).get("peft_type", "") if config.adapters else ""
        lines.append(f"| {key} | {modality[key]} | {encoder.get('model_type')} | {source} | {adapter} |")
    if config.trunk:
        lines += ["", f"Shared trunk: {config.trunk}."]

    lines += ["", "## Training", ""]
    if settings:
        method = f"`{settings.get('mtl_method')}`"
        if settings.get("mtl_method_kwargs"):
            method += f" with {json.dumps(settings['mtl_method_kwargs'])}"
        sam = settings.get("sam")
        sharpness = (
            f"`{sam}` (ρ = {settings.get('sam_rho')}, adaptive: {settings.get('sam_adaptive')}, η = {settings.get('sam_eta')})"
            if sam
            else "none"
        )
        steps = (
            f"{settings.get('max_steps')} steps"
            if (settings.get("max_steps") or 0) > 0
            else f"{settings.get('num_train_epochs')} epochs"
        )
        sizes = settings.get("task_batch_sizes") or {}
        lines += [
            f"- gradient method: {method}",
            f"- sharpness-aware minimisation: {sharpness}",
            f"- task sampling: `{settings.get('task_sampling')}`"
            + (
                f" (T = {settings.get('sampling_temperature')})"
                if settings.get("task_sampling") == "temperature"
                else ""
            ),
            f"- budget: {steps}, {settings.get('per_device_train_batch_size')} examples per task per device"
            + (f" ({json.dumps(sizes)})" if sizes else "")
            + f", gradient accumulation {settings.get('gradient_accumulation_steps')}, {settings.get('world_size')} process(es)",
            f"- optimizer: `{settings.get('optim')}`, learning rate {settings.get('learning_rate')} "
            f"(`{settings.get('lr_scheduler_type')}`, {settings.get('warmup_steps')} warm-up steps), weight decay "
            f"{settings.get('weight_decay')}; bf16: {settings.get('bf16')}, fp16: {settings.get('fp16')}; seed "
            f"{settings.get('seed')}",
        ]
    else:
        lines.append("Training settings not recorded.")

    lines += ["", "## Results", ""]
    if results:
        show_baselines = bool(baselines)
        header = "| task | metric | value |" + (" single-task baseline |" if show_baselines else "")
        lines += [header, "| --- | --- | --- |" + (" --- |" if show_baselines else "")]
        by_task = _results_by_task(results, [task["name"] for task in tasks])
        for task in tasks:
            for metric, value in by_task.get(task["name"], {}).items():
                row = f"| {task['name']} | {metric} | {_format(value)} |"
                if show_baselines:
                    base = baselines.get(task["name"], {}).get(metric)
                    row += f" {_format(base) if base is not None else ''} |"
                lines.append(row)
        if "eval_delta_m" in results:
            lines += [
                "",
                f"**Δm = {results['eval_delta_m']:+.2f}%** against the single-task baselines (each task trained alone "
                "with the same encoder, data and budget, `hf-mtl baseline`): the mean relative change over every "
                "metric, signed so that lower is better and a negative value beats the baselines (Maninis et al., "
                "2019).",
            ]
        elif baselines:
            lines += ["", "Single-task baselines are recorded, but the evaluation reported no Δm."]
    else:
        lines.append("No evaluation recorded.")

    plots = sorted(Path(folder, PLOTS_DIR).glob("*.png")) if Path(folder, PLOTS_DIR).is_dir() else []
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({PLOTS_DIR}/{plot.name})", ""]

    lines += ["", "## Reproduce", ""]
    if recipe is not None:
        lines += [
            "```bash",
            "pip install hf-mtl",
            f"hf-mtl train {RECIPE_NAME} --output_dir {name}",
            "```",
            "",
            f"`{RECIPE_NAME}` (in this repository) is the recipe with every override applied.",
        ]
    else:
        lines.append("Trained from Python with `MultiTaskTrainer`; no recipe was recorded.")
    example = next(iter(tasks), {"name": "task"})
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import hf_mtl  # registers the model type with AutoConfig / AutoModel and the pipeline",
        "from transformers import AutoModel, pipeline",
        "",
        f'model = AutoModel.from_pretrained("{where}")',
        f'classify = pipeline("multi-task-classification", model="{where}")',
        f'classify(INPUT, task="{example["name"]}")  # text, an image or a waveform; no task: every task of its modality',
        "```",
        "",
        f"or `hf-mtl predict {where} --task {example['name']} INPUT`.",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content, ignore_metadata_errors=False)


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """Writes ``README.md`` of a saved run folder (`build_model_card`) and returns the card."""
    card = build_model_card(folder, **kwargs)
    card.save(os.path.join(str(folder), MODEL_CARD_NAME))
    return card


def write_run_files(
    output_dir: str | os.PathLike,
    *,
    recipe: Any | None = None,
    eval_results: Mapping[str, float] | None = None,
    baselines: str | None = None,
    settings: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> None:
    """Writes the files that make a saved model folder a Hub-ready run: ``recipe.yaml``, ``eval_results.json``,
    ``baselines.json`` (copied) and, last, the model card that reads them.

    One of these files that this run does not have (no recipe, no evaluation of the saved weights, no baselines)
    but that an earlier run left in the folder is removed, with a warning: it does not describe this model, and
    the card (or a later push) would present it as if it did."""
    output_dir = str(output_dir)
    for name, present in ((RECIPE_NAME, recipe), (EVAL_RESULTS_NAME, eval_results), (BASELINES_COPY, baselines)):
        stale = os.path.join(output_dir, name)
        if present is None and os.path.isfile(stale):
            logger.warning(f"removing {stale}: it was left by an earlier run and does not describe the saved model")
            os.remove(stale)
    if recipe is not None:
        with open(os.path.join(output_dir, RECIPE_NAME), "w", encoding="utf-8") as f:
            f.write(recipe.to_yaml())
    if eval_results is not None:
        with open(os.path.join(output_dir, EVAL_RESULTS_NAME), "w", encoding="utf-8") as f:
            json.dump(dict(eval_results), f, indent=2)
    if baselines is not None:
        from .baselines import baselines_file

        source, target = baselines_file(baselines), os.path.join(output_dir, BASELINES_COPY)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
    write_model_card(output_dir, settings=settings, repo_id=repo_id)


# ---------------------------------------------------------------------------------------------- push
def push_run(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_mtl run",
    create_pr: bool = False,
) -> Any:
    """Uploads a saved run folder to the Hub repository ``repo_id`` (created if missing).

    The model card is rebuilt first from the folder's files (so that plots written after training, by
    ``hf-mtl report``, are linked) and written into the folder: what is uploaded is exactly the folder on disk,
    less `IGNORE_PATTERNS`.

    Returns:
        `huggingface_hub.CommitInfo`.
    """
    from huggingface_hub import HfApi

    folder = str(folder)
    config = _read_json(os.path.join(folder, "config.json"))
    if not isinstance(config, Mapping) or config.get("model_type") != "hf_mtl":
        raise ValueError(f"{folder!r} is not a saved hf_mtl model (no config.json with model_type 'hf_mtl')")
    write_model_card(folder, repo_id=repo_id)
    api = HfApi(token=token, library_name="hf_mtl")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=IGNORE_PATTERNS,
    )

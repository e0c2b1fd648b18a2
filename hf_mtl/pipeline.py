"""Inference on raw inputs: `MultiTaskPipeline`, the ``"multi-task-classification"`` pipeline.

After ``import hf_mtl`` the task is registered with transformers' ``PIPELINE_REGISTRY``::

    from transformers import pipeline

    classify = pipeline("multi-task-classification", model="out/quickstart")   # a run folder or a Hub repo id
    classify("What is the capital of Peru ?", task="coarse")
    # {"coarse": {"label": "LOC", "score": 0.93}}
    classify(Image.open("digit.png"))                      # every task of the vision encoder(s)
    classify({"array": waveform, "sampling_rate": 8000})   # every task of the speech encoder(s)
    classify("clip.wav", task="digit", top_k=3)            # a file path: image or audio, by its task or suffix
    classify(texts, task="coarse", batch_size=64)          # lists are batched like the evaluation

Inputs: text (``str``, or a ``(text, text_pair)`` tuple for an encoder that reads pairs), images (PIL images,
arrays (H, W), (H, W, C) or (C, H, W), image files) and waveforms (1-D arrays, with ``sampling_rate=``
or as ``{"array" | "raw": ..., "sampling_rate": ...}``, or audio files read with ``soundfile``). A waveform
whose rate differs from the one the encoder was trained at is resampled (``scipy.signal.resample_poly``); a
1-D array without a rate is taken to be at the encoder's rate. Each encoder's inputs are prepared by the
collator the run used, rebuilt from ``processors/<encoder>/`` of the saved folder (its processor and
``collator_config.json``), so a prediction equals the model's output on the evaluation batch of the same rows.

Outputs: a dict task -> prediction for each input (a list of them for a list of inputs):

| head | prediction |
| --- | --- |
| ``classification`` | ``{"label", "score"}`` (softmax), or a list of the ``top_k`` best (all with ``top_k=None``) |
| ``multilabel`` | the list of ``{"label", "score"}`` whose sigmoid is above ``threshold``, most probable first |
| ``regression`` | the value (a list for several targets, ``{name: value}`` when the task names them) |
| ``token_classification`` | a list of ``{"index", "token", "label", "score"}``, one per real token |

Each head kind decodes its own logits (``TaskHead.decode``), so a head registered by a user decodes here too.

Label names are the tasks' ``label_names`` (saved in ``config.json``), else the class indices as strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The name under which the pipeline is registered with ``transformers.pipeline``.
PIPELINE_TASK = "multi-task-classification"

_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus")


def _image_suffixes() -> tuple[str, ...]:
    from PIL import Image

    return tuple(sorted(Image.registered_extensions()))


def _collator_modality(collator: Any) -> str:
    """``text``, ``vision`` or ``speech``: what a built-in collator reads (``other`` for any other collator)."""
    from .data.collators import SpeechCollator, TextCollator, VisionCollator

    kinds = {TextCollator: "text", VisionCollator: "vision", SpeechCollator: "speech"}
    return next((kind for cls, kind in kinds.items() if isinstance(collator, cls)), "other")


def _as_waveform(value: Any) -> np.ndarray:
    waveform = (
        value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float32)
    )
    if waveform.ndim == 2:  # (samples, channels) as soundfile reads them, or (channels, samples): mix down
        waveform = waveform.mean(axis=1 if waveform.shape[0] > waveform.shape[1] else 0)
    if waveform.ndim != 1:
        raise ValueError(f"a waveform must be a 1-D array (mono), got shape {tuple(waveform.shape)}")
    return waveform.astype(np.float32)


def _resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling by the reduced ratio ``target / rate`` (as `hf_mtl.data.load_fsdd` resamples)."""
    from math import gcd

    from scipy.signal import resample_poly

    factor = gcd(rate, target)
    return resample_poly(waveform, target // factor, rate // factor).astype(np.float32)


class MultiTaskPipeline(Pipeline):
    """The ``"multi-task-classification"`` pipeline of a `MultiTaskModel` (see the module docstring).

    Args:
        model (`MultiTaskModel`): the model; its processors and collators are read from ``processors/<encoder>/``
            of the folder or Hub repository it was loaded from (``model.name_or_path``).
        collators (`dict[str, Callable]`, *optional*): encoder key -> a collator, overriding the saved one (needed
            for a collator that is not one of hf_mtl's).
        device, batch_size, num_workers, ...: as for every `transformers.Pipeline`.

    Call arguments:
        task (`str`, *optional*): the task to predict; `tasks` (`list[str]`) for several. Default: every task of
            the input's modality.
        top_k (`int` or `None`, *optional*, defaults to 1): classification labels to return (`None`: all).
        threshold (`float`, *optional*, defaults to 0.5): multilabel decision threshold on the sigmoid.
        sampling_rate (`int`, *optional*): the rate of 1-D waveform arrays (default: the encoder's).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: Any, *args: Any, collators: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        from .hub import collator_processor, load_encoder_collator
        from .modeling import MultiTaskModel

        if not isinstance(model, MultiTaskModel):
            raise ValueError(f"`model` must be a MultiTaskModel, got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        given = dict(collators or {})
        unknown = sorted(set(given) - set(model.encoders))
        if unknown:
            raise ValueError(
                f"`collators` names unknown encoder(s) {unknown}; the encoders are: {', '.join(model.encoders)}"
            )
        self.collators: dict[str, Any] = {}
        self.processors: dict[str, Any] = {}
        for key, encoder in model.encoders.items():
            if key in given:
                self.collators[key] = given[key]
                if (processor := collator_processor(given[key])) is not None:
                    self.processors[key] = processor
                continue
            self.collators[key], processor = load_encoder_collator(model.name_or_path, key, encoder)
            if processor is not None:
                self.processors[key] = processor
        self.modalities = {key: _collator_modality(collator) for key, collator in self.collators.items()}
        model.eval()

    # ------------------------------------------------------------------ parameters
    def _sanitize_parameters(
        self,
        task: str | None = None,
        tasks: Sequence[str] | None = None,
        top_k: int | None | str = "unset",
        threshold: float | None = None,
        sampling_rate: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kwargs:
            raise ValueError(
                f"unknown argument(s) {sorted(kwargs)}; the pipeline takes task, tasks, top_k, threshold, sampling_rate"
            )
        preprocess: dict[str, Any] = {}
        if task is not None and tasks is not None:
            raise ValueError("pass `task` or `tasks`, not both")
        if task is not None or tasks is not None:
            names = [task] if task is not None else list(tasks)
            unknown = [name for name in names if name not in self.model.tasks]
            if unknown or not names:
                raise ValueError(
                    f"unknown task(s) {unknown or names}; the model's tasks are: {', '.join(self.model.tasks)}"
                )
            preprocess["tasks"] = names
        if sampling_rate is not None:
            if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
                raise ValueError(f"`sampling_rate` must be a positive integer, got {sampling_rate!r}")
            preprocess["sampling_rate"] = sampling_rate
        postprocess: dict[str, Any] = {}
        if top_k != "unset":
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}")
            postprocess["top_k"] = top_k
        if threshold is not None:
            postprocess["threshold"] = float(threshold)
        return preprocess, {}, postprocess

    # ------------------------------------------------------------------ inputs
    def _input_modality(self, value: Any) -> str:
        """``text``, ``vision`` or ``speech``: what a raw input is, when no task says it."""
        from PIL import Image

        if isinstance(value, Image.Image):
            return "vision"
        if isinstance(value, Mapping):
            return "speech"
        if isinstance(value, (str, os.PathLike)):
            path = str(value)
            if os.path.isfile(path):
                suffix = os.path.splitext(path)[1].lower()
                if suffix in _AUDIO_SUFFIXES:
                    return "speech"
                if suffix in _image_suffixes():
                    return "vision"
            return "text"
        if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return "text"
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if array.ndim == 1:
            return "speech"
        if array.ndim in (2, 3):
            return "vision"
        raise ValueError(
            f"cannot tell what an input of shape {tuple(array.shape)} is: pass text, an image or a waveform"
        )

    def _row(self, key: str, value: Any, sampling_rate: int | None) -> dict[str, Any]:
        """The dataset-like row that encoder ``key``'s collator reads for one raw input."""
        collator, modality = self.collators[key], self.modalities[key]
        if modality == "text":
            if isinstance(value, tuple):
                if not collator.text_pair_column:
                    raise ValueError(f"encoder {key!r} reads single texts, not (text, text_pair) tuples")
                return {collator.text_column: value[0], collator.text_pair_column: value[1]}
            if not isinstance(value, str):
                raise ValueError(f"encoder {key!r} reads text; got {type(value).__name__}")
            return {collator.text_column: value}
        if modality == "vision":
            from PIL import Image

            if isinstance(value, (str, os.PathLike)):
                if not os.path.isfile(value):
                    raise ValueError(f"encoder {key!r} reads images; {str(value)!r} is not an image file")
                with Image.open(value) as image:
                    value = image.copy()
            return {collator.image_column or "pixel_values": value}
        if modality == "speech":
            expected = collator.sampling_rate
            rate = sampling_rate
            if isinstance(value, (str, os.PathLike)):
                import soundfile

                if not os.path.isfile(value):
                    raise ValueError(f"encoder {key!r} reads audio; {str(value)!r} is not an audio file")
                try:
                    value, rate = soundfile.read(str(value), dtype="float32")
                except (RuntimeError, soundfile.LibsndfileError) as error:
                    raise ValueError(f"{str(value)!r} is not an audio file soundfile can read: {error}") from error
            elif isinstance(value, Mapping):
                if "sampling_rate" not in value or not ({"array", "raw"} & set(value)):
                    raise ValueError(
                        "an audio dict must hold `array` (or `raw`) and `sampling_rate`, got keys "
                        f"{', '.join(sorted(value))}"
                    )
                rate = int(value["sampling_rate"])
                value = value["array"] if "array" in value else value["raw"]
            waveform = _as_waveform(value)
            if rate is None:
                rate = expected  # a bare array is taken to be at the encoder's rate
            elif expected is not None and rate != expected:
                waveform = _resample(waveform, int(rate), int(expected))
                rate = expected
            row = {collator.audio_column: waveform}
            if rate is not None:
                row[collator.sampling_rate_column] = int(rate)
            return row
        raise ValueError(f"encoder {key!r} has a collator the pipeline cannot feed ({type(collator).__name__})")

    def preprocess(
        self, inputs: Any, tasks: Sequence[str] | None = None, sampling_rate: int | None = None
    ) -> dict[str, Any]:
        model = self.model
        if tasks is None:
            modality = self._input_modality(inputs)
            tasks = [name for name, task in model.tasks.items() if self.modalities[task.encoder] == modality]
            if not tasks:
                kinds = sorted(set(self.modalities.values()))
                raise ValueError(f"the input is {modality}, but the model's encoders read: {', '.join(kinds)}")
        by_encoder: dict[str, list[str]] = {}
        for name in tasks:
            by_encoder.setdefault(model.tasks[name].encoder, []).append(name)
        rows = {key: self._row(key, inputs, sampling_rate) for key in by_encoder}
        return {"items": [{"rows": rows, "tasks": by_encoder}]}

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):  # noqa: ANN001, ANN201
        """`Pipeline.get_iterator`, batching the prepared rows with the encoders' collators (in `_forward`)
        instead of the tokenizer-or-feature-extractor padding of the base class."""
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        dataset = (
            PipelineDataset(inputs, self.preprocess, preprocess_params)
            if isinstance(inputs, Sequence)
            else PipelineIterator(inputs, self.preprocess, preprocess_params)
        )
        loader = torch.utils.data.DataLoader(
            dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_merge_items
        )
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    # ------------------------------------------------------------------ model
    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        items = model_inputs["items"]
        outputs: list[dict[str, Any]] = [{} for _ in items]
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for index, item in enumerate(items):
            for key, names in item["tasks"].items():
                groups.setdefault((key, tuple(names)), []).append(index)
        for (key, names), members in groups.items():
            batch = self.collators[key]([items[i]["rows"][key] for i in members])
            batch = {
                name: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for name, value in batch.items()
            }
            result = self.model({"+".join(names): batch}, tasks=list(names))
            tokens = None
            if any(self.model.tasks[name].head == "token_classification" for name in names) and "input_ids" in batch:
                tokens = batch["input_ids"].cpu()
            mask = batch.get("attention_mask")
            for row, index in enumerate(members):
                for name in names:
                    entry: dict[str, Any] = {"logits": result.logits[name][row].detach().float().cpu()}
                    if self.model.tasks[name].head == "token_classification":
                        length = (
                            int(mask[row].sum())
                            if mask is not None and mask.shape[1] == entry["logits"].shape[0]
                            else entry["logits"].shape[0]
                        )
                        entry["logits"] = entry["logits"][:length]
                        if tokens is not None:
                            entry["input_ids"] = tokens[row][:length].tolist()
                    outputs[index][name] = entry
        return {"outputs": outputs}

    def postprocess(
        self, model_outputs: dict[str, Any], top_k: int | None = 1, threshold: float = 0.5
    ) -> dict[str, Any]:
        outputs = model_outputs["outputs"]
        if isinstance(outputs, list):  # unbatched: the one item of a batch of one
            outputs = outputs[0]
        predictions = {}
        for name, entry in outputs.items():
            task = self.model.tasks[name]
            tokens = None
            if "input_ids" in entry:
                tokenizer = self.processors.get(task.encoder)
                tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
                tokens = tokenizer.convert_ids_to_tokens(entry["input_ids"]) if tokenizer is not None else None
            head = self.model.heads[name]
            (prediction,) = head.decode(entry["logits"][None], task.label_names, top_k=top_k, threshold=threshold)
            if not head.sequence_level:  # per token: with its position and text; the added tokens ([CLS], [SEP]) go
                names = tokens if tokens is not None else [str(i) for i in range(len(prediction))]
                special = set(getattr(tokenizer, "all_special_tokens", [])) - {getattr(tokenizer, "unk_token", None)}
                prediction = [
                    {"index": i, "token": names[i], **entry_}
                    for i, entry_ in enumerate(prediction)
                    if tokens is None or names[i] not in special
                ]
            predictions[name] = prediction
        return predictions


def _merge_items(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """The pipeline's collate function: the prepared items of a batch, in one list."""
    return {"items": [item for prepared in batch for item in prepared["items"]]}


def register_pipeline() -> None:
    """Registers `MultiTaskPipeline` with ``transformers.pipeline`` as ``"multi-task-classification"``."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    if PIPELINE_TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            PIPELINE_TASK, pipeline_class=MultiTaskPipeline, pt_model=AutoModel, type="multimodal"
        )

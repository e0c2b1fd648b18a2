"""Per-modality collators: rows (a list of dicts) -> the encoder inputs of one sub-batch (docs/architecture.md, step 1).

| collator | reads | returns |
| --- | --- | --- |
| `TextCollator` | a text column (and optionally a second text column) | ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) |
| `VisionCollator` | an image column (arrays, tensors or PIL images) | ``pixel_values`` (B, C, H, W), or what the image processor returns |
| `SpeechCollator` | an audio column (waveforms) | ``input_values`` + ``attention_mask``, or the feature extractor's ``input_values`` / ``input_features`` + ``attention_mask`` |

| `EncoderInputsCollator` | rows that already hold the encoder's inputs (``dataset.map(tokenizer)``, pre-computed ``pixel_values`` / ``input_values``) | those inputs padded to the longest row and stacked, as `DataCollatorWithPadding` would, with no processor |

Labels are not the collators' business: `TaskGroup.collate` adds them per task with each head's
``collate_labels``. `collator_for` picks the right collator for a tokenizer, an image processor, a
feature extractor or a multi-modal processor; `default_collator` the one of an encoder that got
none. A collator may have ``check_columns(columns)``: the loader calls it with each data set's columns
before training and raises the problem it describes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

Rows = Sequence[Mapping[str, Any]]

__all__ = [
    "EncoderInputsCollator",
    "SpeechCollator",
    "TextCollator",
    "VisionCollator",
    "collator_for",
    "default_collator",
]

_IMAGE_COLUMNS = ("pixel_values", "image", "img")


def _column(rows: Rows, column: str, owner: str, argument: str) -> list[Any]:
    """The values of ``column`` in ``rows``; a clear error when it is missing."""
    if not rows:
        raise ValueError(f"{owner} got no rows to collate")
    missing = [i for i, row in enumerate(rows) if column not in row]
    if missing:
        present = ", ".join(sorted(rows[missing[0]])) or "none"
        raise ValueError(
            f"{owner}: column {column!r} is missing from row {missing[0]} of the batch (columns present: {present}); "
            f"set `{argument}` to the column that holds the inputs"
        )
    return [row[column] for row in rows]


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


class TextCollator:
    """Tokenizes a text column and pads it to the longest row of the batch.

    Args:
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            The tokenizer of the text encoder.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the text (a `str` per row).
        text_pair_column (`str`, *optional*, defaults to `None`):
            Column holding the second text of a pair (entailment, question answering); `None` for single texts.
        max_length (`int`, *optional*, defaults to `None`):
            Truncate to this many tokens. `None` truncates to the tokenizer's ``model_max_length`` when it
            has a real one, and does not truncate otherwise.
        padding (`bool` or `str`, *optional*, defaults to `"longest"`):
            Passed to the tokenizer: ``"longest"`` pads to the longest row, ``"max_length"`` to `max_length`.
        pad_to_multiple_of (`int`, *optional*, defaults to `None`):
            Pad the length to a multiple of this (e.g. 8 for tensor cores).
        return_token_type_ids (`bool`, *optional*, defaults to `None`):
            Whether to return ``token_type_ids``; `None` follows the tokenizer.

    Returns (of `__call__`):
        `dict[str, torch.Tensor]`: ``input_ids`` and ``attention_mask`` of shape (B, T) (1 on real tokens,
        0 on padding), and ``token_type_ids`` when the tokenizer makes them.

    Example:

    ```python
    >>> collate = TextCollator(tokenizer, text_column="text", max_length=64)
    >>> batch = collate([{"text": "How far is it from Denver to Aspen ?"}, {"text": "What is e-coli ?"}])
    >>> batch["input_ids"].shape
    torch.Size([2, 13])
    ```
    """

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        text_pair_column: str | None = None,
        max_length: int | None = None,
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        return_token_type_ids: bool | None = None,
    ) -> None:
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"`tokenizer` must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}"
            )
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"`max_length` must be a positive integer or None, got {max_length!r}")
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.max_length = max_length
        self.padding = padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_token_type_ids = return_token_type_ids

    def check_columns(self, columns: Sequence[str]) -> str | None:
        """The text column(s) this collator reads that ``columns`` lack, described, or ``None``."""
        for column, argument in ((self.text_column, "text_column"), (self.text_pair_column, "text_pair_column")):
            if column is not None and column not in columns:
                return (
                    f"TextCollator reads the text column {column!r}, which is missing (columns: {', '.join(columns)}); "
                    f"set `{argument}` (a recipe's `collator: {{{argument}: ...}}`) or rename the column "
                    "(a recipe's data `columns: {text: <column>}`)"
                )
        return None

    def _texts(self, rows: Rows, column: str, argument: str) -> list[str]:
        texts = _column(rows, column, type(self).__name__, argument)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(
                    f"{type(self).__name__}: column {column!r} must hold strings, got {type(text).__name__} in row {i}"
                )
        return texts

    def __call__(self, rows: Rows) -> dict[str, torch.Tensor]:
        texts = self._texts(rows, self.text_column, "text_column")
        pairs = self._texts(rows, self.text_pair_column, "text_pair_column") if self.text_pair_column else None
        max_length = self.max_length
        model_max_length = getattr(self.tokenizer, "model_max_length", None)
        if max_length is None and isinstance(model_max_length, int) and model_max_length < 1_000_000:
            max_length = model_max_length
        encoded = self.tokenizer(
            texts,
            pairs,
            padding=self.padding,
            truncation=max_length is not None,
            max_length=max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_token_type_ids=self.return_token_type_ids,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return dict(encoded)


# --------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with transformers' vision extras
        return False
    return isinstance(image, Image.Image)


def _channels_first(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) with C in 1, 3, 4 -> (C, H, W); (C, H, W) unchanged."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[0] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
        return np.moveaxis(array, -1, 0)
    if array.ndim == 3:
        return array
    raise ValueError(f"an image must have 2 (H, W) or 3 (C, H, W) dimensions, got shape {tuple(array.shape)}")


class VisionCollator:
    """Stacks images into ``pixel_values``, or runs an image processor on them.

    Without an image processor, images (nested lists, NumPy arrays, tensors or PIL images) become one
    float tensor of shape (B, C, H, W): grey 2-D images get a channel dimension, channels-last arrays are
    moved to channels-first, PIL images are scaled from 0-255 to [0, 1]. All images must then have one
    shape; use an image processor to resize them.

    With an image processor, its output is returned as tensors (``pixel_values``, and e.g.
    ``pixel_mask`` where it makes one). Grey images are given the number of channels the processor
    normalizes (the length of its ``image_mean``) unless `num_channels` says otherwise.

    Args:
        image_processor (`transformers.BaseImageProcessor`, *optional*, defaults to `None`):
            The image processor of the vision encoder.
        image_column (`str`, *optional*, defaults to `None`):
            Column holding the images; `None` takes the first of ``pixel_values``, ``image``, ``img`` present.
        num_channels (`int`, *optional*, defaults to `None`):
            Repeat grey (single-channel) images to this many channels (e.g. 3 for an RGB encoder).

    Returns (of `__call__`):
        `dict[str, torch.Tensor]`: ``pixel_values`` of shape (B, C, H, W), plus what the processor adds.
    """

    def __init__(
        self, image_processor: Any = None, image_column: str | None = None, num_channels: int | None = None
    ) -> None:
        if image_processor is not None:
            from transformers.image_processing_utils import BaseImageProcessor

            if not isinstance(image_processor, BaseImageProcessor):
                raise ValueError(
                    f"`image_processor` must be a transformers image processor (BaseImageProcessor) or None, "
                    f"got {type(image_processor).__name__}"
                )
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"`num_channels` must be a positive integer or None, got {num_channels!r}")
        self.image_processor = image_processor
        self.image_column = image_column
        if num_channels is None and image_processor is not None and getattr(image_processor, "do_normalize", False):
            mean = getattr(image_processor, "image_mean", None)
            if isinstance(mean, (list, tuple)):
                num_channels = len(mean)
        self.num_channels = num_channels

    def check_columns(self, columns: Sequence[str]) -> str | None:
        """The image column this collator reads, described when ``columns`` lack it, else ``None``."""
        wanted = [self.image_column] if self.image_column is not None else list(_IMAGE_COLUMNS)
        if not any(column in columns for column in wanted):
            return (
                f"VisionCollator reads the image column {' or '.join(map(repr, wanted))}, which is missing (columns: "
                f"{', '.join(columns)}); set `image_column` or rename the column (a recipe's data `columns: {{image: <column>}}`)"
            )
        return None

    def _images(self, rows: Rows) -> list[Any]:
        column = self.image_column
        if column is None:
            if not rows:
                raise ValueError("VisionCollator got no rows to collate")
            column = next((c for c in _IMAGE_COLUMNS if c in rows[0]), _IMAGE_COLUMNS[0])
        return _column(rows, column, "VisionCollator", "image_column")

    def _to_array(self, image: Any) -> Any:
        """An image as a channels-first float array with `num_channels` channels (PIL images converted)."""
        if _is_pil(image):
            if self.image_processor is not None:  # the processor rescales PIL images itself
                mode = {1: "L", 3: "RGB"}.get(self.num_channels or 0)
                return image.convert(mode) if mode and image.mode != mode else image
            array = (
                np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image, dtype=np.float32) / 255.0
            )
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)  # PIL is (H, W[, C])
        elif isinstance(image, torch.Tensor):
            array = image.detach().cpu().float().numpy()
        else:
            array = np.asarray(image, dtype=np.float32)
        array = _channels_first(array)
        if self.num_channels is not None and array.shape[0] != self.num_channels:
            if array.shape[0] != 1:
                raise ValueError(
                    f"VisionCollator: an image has {array.shape[0]} channels; only grey images can be repeated to "
                    f"`num_channels`={self.num_channels}"
                )
            array = np.repeat(array, self.num_channels, axis=0)
        return array

    def __call__(self, rows: Rows) -> dict[str, torch.Tensor]:
        images = [self._to_array(image) for image in self._images(rows)]
        if self.image_processor is not None:
            return dict(self.image_processor(images, return_tensors="pt"))
        shapes = sorted({tuple(image.shape) for image in images})
        if len(shapes) > 1:
            raise ValueError(
                f"VisionCollator: images of different shapes {shapes} in one batch; pass an `image_processor` to resize them"
            )
        return {"pixel_values": torch.from_numpy(np.stack(images)).float()}


# --------------------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------------------


def zero_mean_unit_var(waveform: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """``(x - mean(x)) / sqrt(var(x) + eps)``, as `Wav2Vec2FeatureExtractor` normalizes each clip."""
    return (waveform - waveform.mean()) / np.sqrt(waveform.var() + eps)


class SpeechCollator:
    """Pads raw waveforms with an attention mask, or runs a feature extractor on them.

    An audio value is a 1-D waveform (list, NumPy array or tensor), or a dict with ``array`` and
    ``sampling_rate`` (the decoded form of `datasets`' ``Audio`` feature). The rate of a clip is read
    from that dict or from the `sampling_rate_column` of its row (`load_fsdd` has one), and must equal
    the expected rate (`sampling_rate`, else the feature extractor's): a mismatch raises instead of
    silently feeding audio at the wrong speed. Resample at load time (``load_fsdd(sampling_rate=16000)``).

    Without a feature extractor, clips are cut to `max_length_seconds`, optionally normalized to zero
    mean and unit variance each (over their real samples, like `Wav2Vec2FeatureExtractor`), and padded
    with zeros to the longest clip. With a feature extractor, clips are cut to `max_length_seconds` and
    handed to it with ``return_attention_mask=True``; it decides the normalization.

    Args:
        feature_extractor (`transformers.SequenceFeatureExtractor`, *optional*, defaults to `None`):
            The feature extractor of the speech encoder (`Wav2Vec2FeatureExtractor` gives ``input_values``,
            `WhisperFeatureExtractor` gives ``input_features``).
        audio_column (`str`, *optional*, defaults to `"audio"`):
            Column holding the audio.
        sampling_rate (`int`, *optional*, defaults to `None`):
            Expected rate of every clip; `None` takes the feature extractor's, or (without one) accepts any
            rate as long as a batch has one.
        sampling_rate_column (`str`, *optional*, defaults to `"sampling_rate"`):
            Column holding each clip's rate, where the audio value does not carry it.
        max_length_seconds (`float`, *optional*, defaults to `None`):
            Keep at most this many seconds from the start of each clip.
        normalize (`bool`, *optional*, defaults to `True`):
            Zero-mean, unit-variance normalization of each raw clip (ignored with a feature extractor).
        pad_to_multiple_of (`int`, *optional*, defaults to `None`):
            Pad the number of samples to a multiple of this (raw clips only).
        padding (`bool` or `str`, *optional*, defaults to `None`):
            Padding passed to the feature extractor; `None` pads to the longest clip, except for extractors
            whose own default pads to a fixed length (Whisper's 30 s), which keep it.

    Returns (of `__call__`):
        `dict[str, torch.Tensor]`: ``input_values`` (B, T) float32 and ``attention_mask`` (B, T) long, 1
        exactly on the real samples; or the feature extractor's ``input_values`` / ``input_features`` and
        ``attention_mask``.
    """

    def __init__(
        self,
        feature_extractor: Any = None,
        audio_column: str = "audio",
        sampling_rate: int | None = None,
        sampling_rate_column: str = "sampling_rate",
        max_length_seconds: float | None = None,
        normalize: bool = True,
        pad_to_multiple_of: int | None = None,
        padding: bool | str | None = None,
    ) -> None:
        if feature_extractor is not None:
            from transformers.feature_extraction_utils import FeatureExtractionMixin

            if not isinstance(feature_extractor, FeatureExtractionMixin):
                raise ValueError(
                    f"`feature_extractor` must be a transformers feature extractor (SequenceFeatureExtractor) or None, "
                    f"got {type(feature_extractor).__name__}"
                )
        if sampling_rate is not None and (
            isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0
        ):
            raise ValueError(f"`sampling_rate` must be a positive integer or None, got {sampling_rate!r}")
        if max_length_seconds is not None and not max_length_seconds > 0:
            raise ValueError(f"`max_length_seconds` must be > 0 or None, got {max_length_seconds!r}")
        extractor_rate = getattr(feature_extractor, "sampling_rate", None)
        if sampling_rate is not None and extractor_rate is not None and sampling_rate != extractor_rate:
            raise ValueError(
                f"`sampling_rate`={sampling_rate} differs from the feature extractor's sampling_rate={extractor_rate}"
            )
        self.feature_extractor = feature_extractor
        self.audio_column = audio_column
        self.sampling_rate = sampling_rate if sampling_rate is not None else extractor_rate
        self.sampling_rate_column = sampling_rate_column
        self.max_length_seconds = max_length_seconds
        self.normalize = normalize
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding = padding

    def check_columns(self, columns: Sequence[str]) -> str | None:
        """The audio column this collator reads, described when ``columns`` lack it, else ``None``."""
        if self.audio_column not in columns:
            return (
                f"SpeechCollator reads the audio column {self.audio_column!r}, which is missing (columns: "
                f"{', '.join(columns)}); set `audio_column` or rename the column (a recipe's data `columns: {{audio: <column>}}`)"
            )
        return None

    def _clip(self, value: Any, row: Mapping[str, Any], index: int) -> tuple[np.ndarray, int | None]:
        rate = row.get(self.sampling_rate_column)
        if isinstance(value, Mapping):
            if "array" not in value:
                raise ValueError(
                    f"SpeechCollator: the audio dict in column {self.audio_column!r} has no 'array' "
                    f"(keys: {', '.join(sorted(value))})"
                )
            rate = value.get("sampling_rate", rate)
            value = value["array"]
        if isinstance(value, torch.Tensor):
            waveform = value.detach().cpu().float().numpy()
        else:
            waveform = np.asarray(value, dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(
                f"SpeechCollator: row {index} of column {self.audio_column!r} has shape {tuple(waveform.shape)}; "
                f"expected a mono 1-D waveform"
            )
        if waveform.size == 0:
            raise ValueError(f"SpeechCollator: row {index} of column {self.audio_column!r} is an empty waveform")
        return waveform, (int(rate) if rate is not None else None)

    def _clips(self, rows: Rows) -> tuple[list[np.ndarray], int | None]:
        values = _column(rows, self.audio_column, "SpeechCollator", "audio_column")
        clips, rates = zip(*(self._clip(value, row, i) for i, (value, row) in enumerate(zip(values, rows))))
        known = sorted({rate for rate in rates if rate is not None})
        if self.sampling_rate is not None:
            wrong = [rate for rate in known if rate != self.sampling_rate]
            if wrong:
                raise ValueError(
                    f"SpeechCollator: audio sampled at {wrong[0]} Hz, but the encoder expects {self.sampling_rate} Hz "
                    f"(`sampling_rate`); resample the data first, e.g. load_fsdd(sampling_rate={self.sampling_rate})"
                )
            rate = self.sampling_rate
        elif len(known) > 1:
            raise ValueError(f"SpeechCollator: one batch mixes sampling rates {known}; resample the data to one rate")
        else:
            rate = known[0] if known else None
        if self.max_length_seconds is not None:
            if rate is None:
                raise ValueError(
                    "SpeechCollator: `max_length_seconds` needs a sampling rate: set `sampling_rate` or give the "
                    f"rows a {self.sampling_rate_column!r} column"
                )
            limit = max(1, int(round(self.max_length_seconds * rate)))
            clips = tuple(clip[:limit] for clip in clips)
        return list(clips), rate

    def _extract(self, clips: list[np.ndarray], rate: int | None) -> dict[str, torch.Tensor]:
        extractor = self.feature_extractor
        kwargs: dict[str, Any] = {"return_tensors": "pt", "return_attention_mask": True}
        padding = self.padding
        if padding is None:
            default = inspect.signature(extractor.__call__).parameters.get("padding")
            padding = "longest" if default is None or default.default in (False, None, True, "longest") else None
        if padding is not None:
            kwargs["padding"] = padding
        if rate is not None:
            kwargs["sampling_rate"] = rate
        features = dict(extractor(clips, **kwargs))
        if "attention_mask" in features:
            features["attention_mask"] = features["attention_mask"].long()
        return features

    def __call__(self, rows: Rows) -> dict[str, torch.Tensor]:
        clips, rate = self._clips(rows)
        if self.feature_extractor is not None:
            return self._extract(clips, rate)
        length = max(len(clip) for clip in clips)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_values = np.zeros((len(clips), length), dtype=np.float32)
        attention_mask = np.zeros((len(clips), length), dtype=np.int64)
        for i, clip in enumerate(clips):
            input_values[i, : len(clip)] = zero_mean_unit_var(clip) if self.normalize else clip
            attention_mask[i, : len(clip)] = 1
        return {"input_values": torch.from_numpy(input_values), "attention_mask": torch.from_numpy(attention_mask)}


# --------------------------------------------------------------------------------------------------
# Rows that hold the encoder's inputs already
# --------------------------------------------------------------------------------------------------

#: Inputs padded with 0 (``input_ids`` take the pad token id; ``attention_mask`` is made where absent).
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "input_values")
#: The inputs `MultiTaskModel` hands to an encoder.
_ENCODER_INPUTS = (*_SEQUENCE_INPUTS, "pixel_values", "input_features")


class EncoderInputsCollator:
    """Pads and stacks the encoder inputs that the rows already hold, without a processor.

    For data prepared ahead of time: ``dataset.map(tokenizer)`` gives ``input_ids`` and ``attention_mask``,
    a feature extractor ``input_values`` or ``input_features``, an image processor ``pixel_values``.
    Sequences (``input_ids``, ``attention_mask``, ``token_type_ids``, ``input_values``) are padded on the
    right to the longest row of the batch, ``input_ids`` with `pad_token_id` and the others with 0, as
    `transformers.DataCollatorWithPadding` pads them; an ``attention_mask`` (1 on the real positions) is
    made when the rows have none. Fixed-shape inputs (``pixel_values``, ``input_features``) are stacked, as
    `transformers.default_data_collator` does.

    Args:
        main_input_name (`str`, *optional*, defaults to `"input_ids"`):
            The input the encoder reads (``encoder.main_input_name``); rows without it go to `fallback`.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding of ``input_ids`` (the encoder's ``config.pad_token_id``).
        fallback (`Callable`, *optional*, defaults to `None`):
            The collator of rows that do not hold `main_input_name` (e.g. a `SpeechCollator` for raw audio).

    Returns (of `__call__`):
        `dict[str, torch.Tensor]`: the encoder inputs found in the rows, padded or stacked.
    """

    def __init__(self, main_input_name: str = "input_ids", pad_token_id: int | None = 0, fallback: Any = None) -> None:
        self.main_input_name = main_input_name
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.fallback = fallback

    def _missing(self, columns: Sequence[str]) -> str:
        what = {"input_ids": "tokenize the data first (`dataset.map(tokenizer)`)"}
        return (
            f"the encoder reads `{self.main_input_name}`, which the data does not hold (columns: {', '.join(columns)}), "
            f"and it got no processor: pass its processor in `processing_class`, or a collator in `data_collator`, or "
            f"{what.get(self.main_input_name, 'prepare the inputs first')}"
        )

    def check_columns(self, columns: Sequence[str]) -> str | None:
        """Why rows with ``columns`` cannot be collated, or ``None``."""
        if self.main_input_name in columns:
            return None
        if self.fallback is not None:
            check = getattr(self.fallback, "check_columns", None)
            problem = check(columns) if check is not None else None
            return None if problem is None else f"{problem}; or give the data an `{self.main_input_name}` column"
        return self._missing(columns)

    def __call__(self, rows: Rows) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("EncoderInputsCollator got no rows to collate")
        if self.main_input_name not in rows[0]:
            if self.fallback is not None:
                return self.fallback(rows)
            raise ValueError(f"EncoderInputsCollator: {self._missing(sorted(rows[0]))}")
        names = [name for name in _ENCODER_INPUTS if name in rows[0]]
        batch: dict[str, torch.Tensor] = {}
        lengths = None
        for name in names:
            values = _column(rows, name, "EncoderInputsCollator", "main_input_name")
            if name in _SEQUENCE_INPUTS:
                sequences = [np.asarray(value) for value in values]
                if any(sequence.ndim != 1 for sequence in sequences):
                    raise ValueError(f"EncoderInputsCollator: column {name!r} must hold one 1-D sequence per row")
                length = max(len(sequence) for sequence in sequences)
                dtype = np.float32 if name == "input_values" else np.int64
                pad = self.pad_token_id if name == "input_ids" else 0
                out = np.full((len(sequences), length), pad, dtype=dtype)
                for i, sequence in enumerate(sequences):
                    out[i, : len(sequence)] = sequence
                batch[name] = torch.from_numpy(out)
                if name == self.main_input_name:
                    lengths = [len(sequence) for sequence in sequences]
            else:
                arrays = [np.asarray(value, dtype=np.float32) for value in values]
                shapes = sorted({array.shape for array in arrays})
                if len(shapes) > 1:
                    raise ValueError(
                        f"EncoderInputsCollator: column {name!r} holds arrays of different shapes {shapes} in one batch"
                    )
                batch[name] = torch.from_numpy(np.stack(arrays))
        if lengths is not None and "attention_mask" not in batch:
            mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
            for i, length in enumerate(lengths):
                mask[i, :length] = 1
            batch["attention_mask"] = mask
        return batch


def default_collator(encoder: Any, **options: Any) -> Any:
    """The collator of an encoder that got no processor, from the input it reads (``main_input_name``);
    ``options`` go to its `VisionCollator` / `SpeechCollator` (``image_column``, ``max_length_seconds``, ...).

    ========================  ==============================================================================
    the encoder reads         its collator
    ========================  ==============================================================================
    ``pixel_values``          `VisionCollator` (images, or pre-computed ``pixel_values``)
    ``input_values``          `EncoderInputsCollator` (pre-computed ``input_values``), else `SpeechCollator` (audio)
    anything else             `EncoderInputsCollator` (rows prepared ahead, e.g. by ``dataset.map(tokenizer)``)
    ========================  ==============================================================================
    """
    main_input = getattr(encoder, "main_input_name", None) or "input_ids"
    if main_input == "pixel_values":
        return VisionCollator(**options)
    if main_input == "input_values":
        return EncoderInputsCollator("input_values", fallback=SpeechCollator(**options))
    if options:
        raise TypeError(
            f"an encoder that reads `{main_input}` and has no processor takes no collator options, got {sorted(options)}"
        )
    pad_token_id = getattr(getattr(encoder, "config", None), "pad_token_id", None)
    return EncoderInputsCollator(main_input, pad_token_id=pad_token_id)


# --------------------------------------------------------------------------------------------------
# Choosing a collator
# --------------------------------------------------------------------------------------------------

_ACCEPTED = (
    "a tokenizer (PreTrainedTokenizerBase), an image processor (BaseImageProcessor), a feature extractor "
    "(SequenceFeatureExtractor / FeatureExtractionMixin), a processor (ProcessorMixin) holding one of them, "
    "or a TextCollator / VisionCollator / SpeechCollator"
)


def _modality(part: Any) -> str | None:
    from transformers import PreTrainedTokenizerBase
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_utils import BaseImageProcessor

    if isinstance(part, PreTrainedTokenizerBase):
        return "text"
    if isinstance(part, BaseImageProcessor):
        return "vision"
    if isinstance(part, FeatureExtractionMixin):
        return "speech"
    return None


def collator_for(
    processor: Any, modality: str | None = None, **kwargs: Any
) -> TextCollator | VisionCollator | SpeechCollator:
    """Builds the collator that fits a processor.

    ======================================================  ==================
    processor                                               collator
    ======================================================  ==================
    `PreTrainedTokenizerBase`                               `TextCollator`
    `BaseImageProcessor`                                    `VisionCollator`
    `SequenceFeatureExtractor` / `FeatureExtractionMixin`   `SpeechCollator`
    `ProcessorMixin`                                        by its parts (below)
    a `TextCollator` / `VisionCollator` / `SpeechCollator`  itself
    ======================================================  ==================

    A `ProcessorMixin` is taken apart: its feature extractor wins over its image processor, which
    wins over its tokenizer (``Wav2Vec2Processor`` -> speech, ``CLIPProcessor`` -> vision), unless
    `modality` names the part to use.

    Args:
        processor: the tokenizer, image processor, feature extractor or processor of one encoder.
        modality (`str`, *optional*, defaults to `None`):
            ``"text"``, ``"vision"`` or ``"speech"``: which part of a multi-modal processor to use.
        **kwargs: passed to the collator (``text_column``, ``max_length``, ``image_column``,
            ``audio_column``, ``sampling_rate``, ...).

    Returns:
        `TextCollator`, `VisionCollator` or `SpeechCollator`.

    Raises:
        `ValueError`: if `processor` is none of the accepted kinds, or `modality` is unknown or not a part
        of the processor.
    """
    if modality is not None and modality not in ("text", "vision", "speech"):
        raise ValueError(f"`modality` must be 'text', 'vision', 'speech' or None, got {modality!r}")
    if isinstance(processor, (TextCollator, VisionCollator, SpeechCollator)):
        if kwargs:
            raise ValueError(
                f"collator_for got a ready {type(processor).__name__} and extra arguments {sorted(kwargs)}"
            )
        return processor
    from transformers.processing_utils import ProcessorMixin

    if isinstance(processor, ProcessorMixin):
        parts = {}
        for attribute in ("feature_extractor", "image_processor", "tokenizer"):
            part = getattr(processor, attribute, None)
            kind = _modality(part) if part is not None else None
            if kind is not None and kind not in parts:
                parts[kind] = part
        if not parts:
            raise ValueError(
                f"`processing_class`: the processor {type(processor).__name__} holds no tokenizer, image processor "
                f"or feature extractor; expected {_ACCEPTED}"
            )
        if modality is None:
            modality = next(kind for kind in ("speech", "vision", "text") if kind in parts)
        elif modality not in parts:
            raise ValueError(
                f"`modality`={modality!r}: the processor {type(processor).__name__} has no {modality} part "
                f"(it has: {', '.join(parts)})"
            )
        processor = parts[modality]
    kind = _modality(processor)
    if kind is None:
        raise ValueError(
            f"`processing_class`: cannot build a collator from {type(processor).__name__}; expected {_ACCEPTED}"
        )
    if modality is not None and kind != modality:
        raise ValueError(f"`modality`={modality!r} but {type(processor).__name__} is a {kind} processor")
    if kind == "text":
        return TextCollator(processor, **kwargs)
    if kind == "vision":
        return VisionCollator(image_processor=processor, **kwargs)
    return SpeechCollator(feature_extractor=processor, **kwargs)

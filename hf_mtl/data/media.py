"""Audio and image files of a `datasets.Dataset`, decoded without `torchcodec`.

`datasets` decodes its ``Audio`` feature with `torchcodec`, which does not load everywhere (and its
``Image`` feature fails with a bare PIL traceback on a corrupt file). hf_mtl therefore casts those
columns to ``decode=False`` (rows then hold ``{"path", "bytes"}``) and decodes them itself, row by row
as they are read:

- audio with `soundfile` into ``{"array": float32 mono waveform, "sampling_rate": int, "path": str}``,
  the form `SpeechCollator` reads (what `datasets` gives when it decodes); several channels are averaged
  to one, and a clip is resampled (`scipy.signal.resample_poly`) to the feature's ``sampling_rate`` when
  it sets one (``Audio(sampling_rate=16000)``), as `datasets` would;
- images with PIL into ``PIL.Image.Image`` (converted to the feature's ``mode`` when it sets one), the
  form `VisionCollator` reads.

`check_media` decodes every file once before training: a file that does not decode raises a
`ValueError` naming the file, its row and the data set, or, with ``skip_undecodable=True``, is left out
with a warning that gives the count.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: How many undecodable files an error message lists.
_SHOWN = 5


def media_columns(dataset: Any, decoded_only: bool = True) -> dict[str, Any]:
    """Column -> its ``Audio`` or ``Image`` feature, for the top-level media columns of ``dataset``
    (only those `datasets` would decode itself unless ``decoded_only=False``)."""
    features = getattr(dataset, "features", None)
    if not features:
        return {}
    from datasets import Audio, Image

    return {
        column: feature
        for column, feature in features.items()
        if isinstance(feature, (Audio, Image)) and (feature.decode or not decoded_only)
    }


def _source(value: Any) -> tuple[str | None, bytes | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        return value.get("path"), value.get("bytes")
    raise ValueError(f"expected a file path or a {{'path', 'bytes'}} dict, got {type(value).__name__}")


def _describe(path: str | None, index: int | None) -> str:
    where = f"file {path!r}" if path else "an embedded file"
    return where + (f" (row {index})" if index is not None else "")


def decode_audio(value: Any, sampling_rate: int | None = None) -> dict[str, Any]:
    """One audio value (``{"path", "bytes"}`` or a path) as ``{"array", "sampling_rate", "path"}``, decoded
    with `soundfile`, averaged to mono, resampled to ``sampling_rate`` when given.

    Raises:
        `ValueError`: the file does not decode (the message holds soundfile's reason).
    """
    import soundfile as sf

    path, data = _source(value)
    if path is None and data is None:
        raise ValueError("the audio value has neither a 'path' nor 'bytes'")
    try:
        waveform, rate = sf.read(io.BytesIO(data) if data is not None else path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, TypeError, ValueError) as error:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"it does not decode as audio ({error})") from error
    waveform = waveform.mean(axis=1) if waveform.shape[1] > 1 else waveform[:, 0]
    if waveform.size == 0:
        raise ValueError("it decodes to an empty waveform")
    if sampling_rate is not None and sampling_rate != rate:
        from .datasets import _resample

        waveform, rate = _resample(waveform, int(rate), int(sampling_rate)), int(sampling_rate)
    return {"array": np.ascontiguousarray(waveform, dtype=np.float32), "sampling_rate": int(rate), "path": path}


def decode_image(value: Any, mode: str | None = None) -> Any:
    """One image value (``{"path", "bytes"}`` or a path) as a loaded ``PIL.Image.Image`` (in ``mode`` when given).

    Raises:
        `ValueError`: the file does not decode (the message holds PIL's reason).
    """
    from PIL import Image, UnidentifiedImageError

    path, data = _source(value)
    if path is None and data is None:
        raise ValueError("the image value has neither a 'path' nor 'bytes'")
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"it does not decode as an image ({error})") from error
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return image


def _decoder(feature: Any) -> Callable[[Any], Any]:
    from datasets import Audio

    if isinstance(feature, Audio):
        return lambda value: decode_audio(value, feature.sampling_rate)
    return lambda value: decode_image(value, getattr(feature, "mode", None))


class _DecodeMedia:
    """The `with_transform` function: decodes the media columns of each batch read from the data set."""

    def __init__(self, columns: dict[str, Any], name: str) -> None:
        self.decoders = {column: _decoder(feature) for column, feature in columns.items()}
        self.name = name

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for column, decode in self.decoders.items():
            if column not in batch:
                continue
            values = []
            for value in batch[column]:
                if value is None:
                    values.append(None)
                    continue
                try:
                    values.append(decode(value))
                except ValueError as error:
                    path, _ = _source(value)
                    raise ValueError(
                        f"{self.name}: {_describe(path, None)} in column {column!r}: {error}; fix or remove it (a recipe "
                        "leaves such files out with `skip_undecodable: true`)"
                    ) from error
            batch[column] = values
        return batch


def decode_media(dataset: Any, name: str = "the data set") -> Any:
    """``dataset`` with its ``Audio`` / ``Image`` columns decoded by hf_mtl (soundfile, PIL) as rows are read,
    instead of by `datasets` (torchcodec). A data set without such columns is returned as it is.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the data.
        name (`str`, *optional*): how errors name the data set (``"data.mine (train split)"``).
    """
    columns = media_columns(dataset)
    if not columns:
        return dataset
    from datasets import IterableDataset

    transform = _DecodeMedia(columns, name)
    dataset = _undecoded(dataset, columns)
    if isinstance(dataset, IterableDataset):
        return dataset.map(transform, batched=True, batch_size=1)
    return dataset.with_transform(transform)


def _undecoded(dataset: Any, columns: dict[str, Any]) -> Any:
    """``dataset`` with its media ``columns`` cast to ``decode=False``: rows hold ``{"path", "bytes"}``."""
    from datasets import Audio, Image

    for column, feature in columns.items():
        if isinstance(feature, Audio):
            undecoded = Audio(sampling_rate=feature.sampling_rate, decode=False)
        else:
            undecoded = Image(mode=feature.mode, decode=False)
        dataset = dataset.cast_column(column, undecoded)
    return dataset


def check_media(dataset: Any, name: str, skip_undecodable: bool = False) -> Any:
    """Decodes every audio and image file of ``dataset`` once, before training, and returns the data set
    decoded by `decode_media`.

    Args:
        dataset (`datasets.Dataset`): the data (a streaming data set is returned by `decode_media` unchecked).
        name (`str`): how messages name the data set (``"data.mine (train split)"``).
        skip_undecodable (`bool`, *optional*, defaults to `False`): leave the rows whose files do not decode out,
            with a warning that gives their count, instead of raising.

    Raises:
        `ValueError`: naming the files that do not decode (their path and row) and the data set, unless
        ``skip_undecodable``.
    """
    columns = media_columns(dataset)
    from datasets import Dataset

    if not columns or not isinstance(dataset, Dataset):
        return decode_media(dataset, name)
    decoders = {column: _decoder(feature) for column, feature in columns.items()}
    raw = _undecoded(dataset, columns).select_columns(list(columns))
    failures: list[tuple[int, str, str | None, str]] = []
    batch_size = 64
    for start in range(0, len(raw), batch_size):
        batch = raw[start : start + batch_size]
        for column, decode in decoders.items():
            for offset, value in enumerate(batch[column]):
                if value is None:
                    continue
                try:
                    decode(value)
                except ValueError as error:
                    failures.append((start + offset, column, _source(value)[0], str(error)))
    if not failures:
        return decode_media(dataset, name)
    shown = "; ".join(
        f"{_describe(path, index)} in column {column!r}: {reason}" for index, column, path, reason in failures[:_SHOWN]
    )
    more = f" (and {len(failures) - _SHOWN} more)" if len(failures) > _SHOWN else ""
    if not skip_undecodable:
        raise ValueError(
            f"{name}: {len(failures)} file(s) do not decode: {shown}{more}; fix or remove them, or set "
            "`skip_undecodable: true` to leave them out"
        )
    bad = {index for index, *_ in failures}
    logger.warning(f"{name}: skipped {len(bad)} row(s) whose files do not decode: {shown}{more}")
    kept = dataset.select([i for i in range(len(dataset)) if i not in bad])
    return decode_media(kept, name)

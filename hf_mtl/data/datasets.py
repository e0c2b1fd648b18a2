"""Loaders for the built-in real data sets, each returning a `datasets.DatasetDict` with its official splits.

| loader | modality | splits | label columns |
| --- | --- | --- | --- |
| `load_fsdd` | speech (8 kHz waveforms) | train 2,700 / test 300 | `digit` (10), `speaker` (6), `accent` (4) |
| `load_trec` | text (questions) | train / test (TREC 10) | `coarse` (6), `fine` (all `COARSE:fine` labels) |
| `load_digits` | vision (8x8 grey images) | seeded stratified train / test | `label` (10) |

`load_fsdd` and `load_trec` read the original files from `data_dir`; with `data_dir=None` they read the
small real sample shipped in ``hf_mtl/data/sample`` (see its README for source, license and how it was
cut). Audio is decoded with `soundfile` (the `datasets` `Audio` feature needs `torchcodec`, which is not
always loadable), so the `audio` column is a plain list of float32 samples.
"""

from __future__ import annotations

import csv
import os
import re
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers.utils import logging

logger = logging.get_logger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

FSDD_SAMPLING_RATE = 8000
FSDD_TEST_INDICES = range(0, 5)
FSDD_AUDIO_SUFFIXES = (".wav", ".flac")
_FSDD_NAME = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[A-Za-z]+)_(?P<index>[0-9]+)$")

TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_FILES = {"train": "train_5500.label", "test": "TREC_10.label"}


def _resolve_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    if data_dir is None:
        return SAMPLE_DIR / name
    return Path(data_dir).expanduser()


# --------------------------------------------------------------------------------------------------
# FSDD
# --------------------------------------------------------------------------------------------------


def _read_speakers(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row.get("speaker")]
    if not rows or "accent" not in rows[0]:
        raise ValueError(f"`data_dir`: {path} must be a CSV with the columns speaker and accent, got {rows[:1]}")
    return rows


def _resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    # Polyphase resampling (scipy.signal.resample_poly, Kaiser-windowed FIR low-pass) by the reduced
    # ratio target_sr / orig_sr; the output has ceil(len * target_sr / orig_sr) samples.
    from scipy.signal import resample_poly

    factor = gcd(orig_sr, target_sr)
    return resample_poly(waveform, target_sr // factor, orig_sr // factor).astype(np.float32)


def load_fsdd(
    data_dir: str | os.PathLike | None = None, sampling_rate: int | None = None, skip_undecodable: bool = False
) -> DatasetDict:
    """Loads the Free Spoken Digit Dataset (FSDD) with its official split.

    Each row is one recording of a spoken digit, labelled with three tasks on the same audio: the digit,
    the speaker and the speaker's accent. The official split puts recordings with index 0-4 in `test`
    (300 clips) and 5-49 in `train` (2,700 clips). Rows are sorted by (digit, speaker, index).

    Columns:
        - `audio` (`list[float32]`): the mono waveform in [-1, 1), decoded with `soundfile`.
        - `sampling_rate` (`int`): the rate of `audio` (8000, or `sampling_rate` when given).
        - `digit` (`ClassLabel`): 10 classes named ``"0"`` .. ``"9"``.
        - `speaker` (`ClassLabel`): the 6 speakers in the order of ``speakers.csv``.
        - `accent` (`ClassLabel`): the accents of ``speakers.csv`` (4), in order of first appearance.
        - `file` (`str`): the recording's file name, e.g. ``"7_jackson_32.wav"``.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Folder holding ``recordings/`` (``{digit}_{speaker}_{index}.wav`` or ``.flac``) and
            ``speakers.csv``, e.g. ``../shared/data/fsdd``. `None` loads the 600-clip sample shipped
            with hf_mtl (indices 0-1 for test, 5-12 for train, every speaker and digit).
        sampling_rate (`int`, *optional*, defaults to `None`):
            Resample every clip to this rate with `scipy.signal.resample_poly` (polyphase filtering by
            the reduced ratio ``sampling_rate / 8000``). `None` keeps the files' own rate.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Leave out the recordings that do not decode as audio (a corrupt or truncated file), with a
            warning that gives their count, instead of raising.

    Returns:
        `datasets.DatasetDict`: splits ``"train"`` and ``"test"``.

    Raises:
        `ValueError`: if `data_dir` does not hold the data set, a file name or speaker is not
        recognised, a recording does not decode (unless `skip_undecodable`), or `sampling_rate` is not a
        positive integer.
    """
    if sampling_rate is not None and (
        isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0
    ):
        raise ValueError(f"`sampling_rate` must be a positive integer or None, got {sampling_rate!r}")
    root = _resolve_dir(data_dir, "fsdd")
    recordings_dir, speakers_csv = root / "recordings", root / "speakers.csv"
    files = (
        sorted(p for p in recordings_dir.iterdir() if p.suffix.lower() in FSDD_AUDIO_SUFFIXES)
        if recordings_dir.is_dir()
        else []
    )
    if not files or not speakers_csv.is_file():
        raise ValueError(
            f"`data_dir` does not hold FSDD: {root} must contain recordings/*.wav (or *.flac) and speakers.csv"
        )

    speaker_rows = _read_speakers(speakers_csv)
    speakers = [row["speaker"] for row in speaker_rows]
    accent_of = {row["speaker"]: row["accent"] for row in speaker_rows}
    accents = list(dict.fromkeys(accent_of[s] for s in speakers))

    entries = []
    seen: dict[str, Path] = {}
    for path in files:
        match = _FSDD_NAME.match(path.stem)
        if match is None:
            raise ValueError(
                f"`data_dir`: {path.name} in {recordings_dir} is not named {{digit}}_{{speaker}}_{{index}}.wav"
            )
        if match["speaker"] not in accent_of:
            raise ValueError(
                f"`data_dir`: speaker {match['speaker']!r} of {path.name} is not in {speakers_csv}; "
                f"valid speakers are: {', '.join(speakers)}"
            )
        if path.stem in seen:
            raise ValueError(f"`data_dir`: {path.name} and {seen[path.stem].name} hold the same recording")
        seen[path.stem] = path
        entries.append((int(match["digit"]), match["speaker"], int(match["index"]), path))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))

    features = Features(
        {
            "audio": List(Value("float32")),
            "sampling_rate": Value("int32"),
            "digit": ClassLabel(names=[str(d) for d in range(10)]),
            "speaker": ClassLabel(names=speakers),
            "accent": ClassLabel(names=accents),
            "file": Value("string"),
        }
    )
    columns: dict[str, dict[str, list]] = {split: {name: [] for name in features} for split in ("train", "test")}
    undecodable: list[str] = []
    for digit, speaker, index, path in entries:
        try:
            waveform, rate = sf.read(path, dtype="float32", always_2d=False)
        except (RuntimeError, OSError) as error:  # soundfile.LibsndfileError is a RuntimeError
            if not skip_undecodable:
                raise ValueError(
                    f"`data_dir`: FSDD recording {path} does not decode as audio ({error}); fix or remove the file, or "
                    "pass `skip_undecodable=True` (a recipe's `skip_undecodable: true`) to leave such files out"
                ) from error
            undecodable.append(path.name)
            continue
        if waveform.ndim != 1:
            raise ValueError(f"`data_dir`: {path} has {waveform.shape[1]} channels, expected mono audio")
        if sampling_rate is not None and sampling_rate != rate:
            waveform, rate = _resample(waveform, rate, sampling_rate), sampling_rate
        split = "test" if index in FSDD_TEST_INDICES else "train"
        column = columns[split]
        column["audio"].append(waveform)
        column["sampling_rate"].append(rate)
        column["digit"].append(digit)
        column["speaker"].append(speakers.index(speaker))
        column["accent"].append(accents.index(accent_of[speaker]))
        column["file"].append(path.name)
    if undecodable:
        logger.warning(
            f"FSDD ({root}): skipped {len(undecodable)} recording(s) that do not decode as audio: "
            f"{', '.join(undecodable[:5])}{', ...' if len(undecodable) > 5 else ''}"
        )
    return DatasetDict({split: Dataset.from_dict(column, features=features) for split, column in columns.items()})


# --------------------------------------------------------------------------------------------------
# TREC
# --------------------------------------------------------------------------------------------------


def _decode_line(raw: bytes) -> str:
    # The files are ASCII with a few stray non-ASCII bytes. Lines that are valid UTF-8 (e.g. the
    # Devanagari digits in some public mirrors) are read as UTF-8; any other line falls back to
    # latin-1, which maps every byte to a character and never fails.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_trec_file(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = _decode_line(raw).strip()
        if not line:
            continue
        label, _, text = line.partition(" ")
        coarse, sep, fine = label.partition(":")
        if not sep or coarse not in TREC_COARSE or not fine or not text.strip():
            raise ValueError(
                f"`data_dir`: line {number} of {path} is not `COARSE:fine question` with COARSE one of "
                f"{', '.join(TREC_COARSE)}: {line[:80]!r}"
            )
        rows.append((text.strip(), label))
    return rows


def load_trec(data_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Loads the TREC question classification data (Li & Roth, 2002) with its official split.

    ``train`` is read from ``train_5500.label`` and ``test`` from ``TREC_10.label`` (the TREC 10
    questions), in file order. Lines are decoded as UTF-8 where they are valid UTF-8 and as latin-1
    otherwise (the files are ASCII with a few stray bytes).

    Columns:
        - `text` (`str`): the question, e.g. ``"How far is it from Denver to Aspen ?"``.
        - `coarse` (`ClassLabel`): 6 classes, ``ABBR, DESC, ENTY, HUM, LOC, NUM``.
        - `fine` (`ClassLabel`): the union of the fine labels of both files, sorted, written
          ``"COARSE:fine"`` (e.g. ``"NUM:date"``). A sample has fewer fine labels than the full data.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Folder holding ``train_5500.label`` and ``TREC_10.label``, e.g. ``../shared/data/trec``.
            `None` loads the sample shipped with hf_mtl (the first 1,500 training and 250 test lines).

    Returns:
        `datasets.DatasetDict`: splits ``"train"`` and ``"test"``.

    Raises:
        `ValueError`: if `data_dir` does not hold both files or a line is not ``COARSE:fine question``.
    """
    root = _resolve_dir(data_dir, "trec")
    paths = {split: root / name for split, name in TREC_FILES.items()}
    if not all(path.is_file() for path in paths.values()):
        raise ValueError(f"`data_dir` does not hold TREC: {root} must contain {' and '.join(TREC_FILES.values())}")
    rows = {split: _read_trec_file(path) for split, path in paths.items()}
    fine_names = sorted({label for split_rows in rows.values() for _, label in split_rows})
    fine_index = {name: i for i, name in enumerate(fine_names)}
    features = Features(
        {
            "text": Value("string"),
            "coarse": ClassLabel(names=list(TREC_COARSE)),
            "fine": ClassLabel(names=fine_names),
        }
    )
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "text": [text for text, _ in split_rows],
                    "coarse": [TREC_COARSE.index(label.split(":", 1)[0]) for _, label in split_rows],
                    "fine": [fine_index[label] for _, label in split_rows],
                },
                features=features,
            )
            for split, split_rows in rows.items()
        }
    )


# --------------------------------------------------------------------------------------------------
# UCI handwritten digits (scikit-learn)
# --------------------------------------------------------------------------------------------------


def load_digits(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """Loads scikit-learn's copy of the UCI handwritten digits (1,797 grey 8x8 images of the digits 0-9).

    The data set has no official split, so this makes one: a stratified split (every digit keeps its
    share in both splits) by `sklearn.model_selection.train_test_split` with ``random_state=seed``. The
    same `test_size` and `seed` always give the same split; rows keep the original order within a split.
    The defaults give 1,437 train and 360 test images.

    Columns:
        - `pixel_values` (`list[list[float32]]`, 8 x 8): the grey image, scaled from 0-16 to [0, 1].
        - `label` (`ClassLabel`): 10 classes named ``"0"`` .. ``"9"``.

    Args:
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of the images in the ``test`` split, strictly between 0 and 1.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the split.

    Returns:
        `datasets.DatasetDict`: splits ``"train"`` and ``"test"``.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0 < test_size < 1:
        raise ValueError(f"`test_size` must be a fraction strictly between 0 and 1, got {test_size!r}")
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels
    )
    features = Features(
        {
            "pixel_values": List(List(Value("float32"))),
            "label": ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"pixel_values": images[np.sort(idx)], "label": labels[np.sort(idx)]}, features=features
            )
            for split, idx in (("train", train_idx), ("test", test_idx))
        }
    )

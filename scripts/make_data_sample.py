"""Cuts the small real-data sample that ships inside the package (``hf_mtl/data/sample/``).

Usage (from the repository root)::

    python scripts/make_data_sample.py ../shared/data

What it writes:

- ``hf_mtl/data/sample/fsdd/recordings/{digit}_{speaker}_{index}.flac``: for every speaker and digit,
  the recordings with index 0-1 (official test split) and 5-12 (official train split), 600 clips,
  re-encoded losslessly from 16-bit PCM WAV to 16-bit FLAC (8 kHz mono, samples unchanged).
- ``hf_mtl/data/sample/fsdd/speakers.csv``: copied unchanged.
- ``hf_mtl/data/sample/trec/train_5500.label``: the first 1,500 lines of the training file, byte for byte.
- ``hf_mtl/data/sample/trec/TREC_10.label``: the first 250 lines of the test file, byte for byte.

The script checks that the FLAC files decode to exactly the original samples and that every coarse
TREC class appears in the sampled training lines. ``hf_mtl/data/sample/README.md`` (source, license,
attribution) is maintained by hand and left alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

FSDD_TEST_INDICES = range(0, 2)
FSDD_TRAIN_INDICES = range(5, 13)
TREC_TRAIN_LINES = 1500
TREC_TEST_LINES = 250
TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hf_mtl" / "data" / "sample"


def make_fsdd(src: Path, out: Path) -> int:
    recordings = src / "recordings"
    speakers_csv = src / "speakers.csv"
    if not recordings.is_dir() or not speakers_csv.is_file():
        raise SystemExit(f"{src} does not hold FSDD: expected recordings/*.wav and speakers.csv")
    speakers = [line.split(",")[0] for line in speakers_csv.read_text().splitlines()[1:] if line.strip()]
    (out / "recordings").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(speakers_csv, out / "speakers.csv")
    count = 0
    for speaker in speakers:
        for digit in range(10):
            for index in (*FSDD_TEST_INDICES, *FSDD_TRAIN_INDICES):
                wav = recordings / f"{digit}_{speaker}_{index}.wav"
                data, rate = sf.read(wav, dtype="int16")
                info = sf.info(wav)
                if info.subtype != "PCM_16" or info.channels != 1:
                    raise SystemExit(f"{wav}: expected 16-bit mono PCM, got {info.subtype} x{info.channels}")
                flac = out / "recordings" / f"{wav.stem}.flac"
                sf.write(flac, data, rate, format="FLAC", subtype="PCM_16")
                decoded, decoded_rate = sf.read(flac, dtype="int16")
                if decoded_rate != rate or not np.array_equal(decoded, data):
                    raise SystemExit(f"{flac}: FLAC round trip changed the samples")
                count += 1
    return count


def _first_lines(path: Path, n: int) -> bytes:
    lines = path.read_bytes().splitlines(keepends=True)
    return b"".join(lines[:n])


def make_trec(src: Path, out: Path) -> tuple[int, int]:
    train, test = src / "train_5500.label", src / "TREC_10.label"
    if not train.is_file() or not test.is_file():
        raise SystemExit(f"{src} does not hold TREC: expected train_5500.label and TREC_10.label")
    out.mkdir(parents=True, exist_ok=True)
    train_bytes = _first_lines(train, TREC_TRAIN_LINES)
    test_bytes = _first_lines(test, TREC_TEST_LINES)
    coarse = {line.split(b":", 1)[0].decode("ascii") for line in train_bytes.splitlines()}
    missing = sorted(set(TREC_COARSE) - coarse)
    if missing:
        raise SystemExit(f"the first {TREC_TRAIN_LINES} training lines miss coarse classes {missing}")
    (out / "train_5500.label").write_bytes(train_bytes)
    (out / "TREC_10.label").write_bytes(test_bytes)
    return len(train_bytes.splitlines()), len(test_bytes.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", type=Path, help="folder holding fsdd/ and trec/ (e.g. ../shared/data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"sample folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    clips = make_fsdd(args.data_root / "fsdd", args.out / "fsdd")
    n_train, n_test = make_trec(args.data_root / "trec", args.out / "trec")
    print(f"wrote {clips} FSDD clips and {n_train} + {n_test} TREC lines under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in data set loaders on the real data: split sizes, label spaces, resampling, bad input."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from hf_mtl.data import load_digits, load_fsdd, load_trec
from hf_mtl.data.datasets import SAMPLE_DIR, TREC_COARSE


def _check_fsdd_labels(dataset_dict, per_pair):
    for split, count in per_pair.items():
        ds = dataset_dict[split]
        assert ds.features["digit"].num_classes == 10
        assert ds.features["speaker"].num_classes == 6
        assert ds.features["accent"].num_classes == 4
        assert set(ds["digit"]) == set(range(10))
        assert set(ds["speaker"]) == set(range(6))
        assert set(ds["accent"]) == set(range(4))
        # every (digit, speaker) pair has the same number of clips in a split
        assert set(Counter(zip(ds["digit"], ds["speaker"])).values()) == {count}


def test_fsdd_full_official_split(fsdd_full):
    assert {split: len(ds) for split, ds in fsdd_full.items()} == {"train": 2700, "test": 300}
    _check_fsdd_labels(fsdd_full, {"train": 45, "test": 5})
    test_indices = {int(name.rsplit("_", 1)[1].split(".")[0]) for name in fsdd_full["test"]["file"]}
    train_indices = {int(name.rsplit("_", 1)[1].split(".")[0]) for name in fsdd_full["train"]["file"]}
    assert test_indices == set(range(5)) and train_indices == set(range(5, 50))
    assert set(fsdd_full["train"]["sampling_rate"]) == {8000}
    # an accent is a function of the speaker
    speaker_accent = set(zip(fsdd_full["train"]["speaker"], fsdd_full["train"]["accent"]))
    assert len(speaker_accent) == 6


def test_fsdd_sample_split(fsdd_sample):
    assert {split: len(ds) for split, ds in fsdd_sample.items()} == {"train": 480, "test": 120}
    _check_fsdd_labels(fsdd_sample, {"train": 8, "test": 2})
    clip = np.asarray(fsdd_sample["train"][0]["audio"], dtype=np.float32)
    assert clip.ndim == 1 and clip.size > 1000 and np.abs(clip).max() <= 1.0


def test_fsdd_resampled_to_16khz(fsdd_sample):
    resampled = load_fsdd(sampling_rate=16000)
    assert set(resampled["test"]["sampling_rate"]) == {16000}
    original = fsdd_sample["test"]
    for i in (0, 37, 119):
        before = np.asarray(original[i]["audio"], dtype=np.float32)
        after = np.asarray(resampled["test"][i]["audio"], dtype=np.float32)
        assert resampled["test"][i]["file"] == original[i]["file"]
        assert len(after) == 2 * len(before)  # ceil(n * 16000 / 8000)
        # the same signal: the even samples of a 2x upsampling stay close to the original ones
        assert np.corrcoef(after[::2], before)[0, 1] > 0.95


def test_fsdd_bad_sampling_rate():
    for bad in (0, -8000, 16000.0, True):
        with pytest.raises(ValueError, match="`sampling_rate`"):
            load_fsdd(sampling_rate=bad)


def test_fsdd_missing_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"`data_dir`.*recordings.*speakers\.csv"):
        load_fsdd(tmp_path)
    with pytest.raises(ValueError, match=r"`data_dir`.*recordings"):
        load_fsdd(tmp_path / "does-not-exist")


def test_fsdd_bad_file_name(tmp_path):
    (tmp_path / "recordings").mkdir()
    shutil.copy(SAMPLE_DIR / "fsdd" / "speakers.csv", tmp_path / "speakers.csv")
    shutil.copy(SAMPLE_DIR / "fsdd" / "recordings" / "0_george_0.flac", tmp_path / "recordings" / "0_george_0.flac")
    shutil.copy(SAMPLE_DIR / "fsdd" / "recordings" / "0_george_5.flac", tmp_path / "recordings" / "george-5.flac")
    with pytest.raises(ValueError, match=r"`data_dir`.*george-5\.flac"):
        load_fsdd(tmp_path)
    (tmp_path / "recordings" / "george-5.flac").rename(tmp_path / "recordings" / "0_alice_5.flac")
    with pytest.raises(ValueError, match=r"speaker 'alice'.*valid speakers"):
        load_fsdd(tmp_path)


def _label_lines(path):
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


def test_trec_full(trec_dir):
    root = trec_dir
    trec = load_trec(root)
    # one row per question line of each file (the official files have 5,452 and 500)
    assert len(trec["train"]) == _label_lines(root / "train_5500.label")
    assert len(trec["test"]) == _label_lines(root / "TREC_10.label")
    assert len(trec["train"]) > 5400 and 490 <= len(trec["test"]) <= 500
    assert trec["train"].features["coarse"].names == list(TREC_COARSE)
    for split in ("train", "test"):
        assert set(trec[split]["coarse"]) == set(range(6))
    fine_names = trec["train"].features["fine"].names
    assert len(fine_names) >= 40 and all(name.split(":")[0] in TREC_COARSE for name in fine_names)
    for row in trec["train"].select(range(0, len(trec["train"]), 97)):
        assert fine_names[row["fine"]].split(":")[0] == TREC_COARSE[row["coarse"]]
    assert trec["test"][0]["text"] == "How far is it from Denver to Aspen ?"


def test_trec_sample(trec_sample):
    assert {split: len(ds) for split, ds in trec_sample.items()} == {"train": 1500, "test": 250}
    assert set(trec_sample["train"]["coarse"]) == set(range(6))


def test_trec_missing_data_dir(tmp_path):
    (tmp_path / "train_5500.label").write_text("NUM:date When was it ?\n")
    with pytest.raises(ValueError, match=r"`data_dir`.*train_5500\.label and TREC_10\.label"):
        load_trec(tmp_path)


def test_trec_bad_line(tmp_path):
    (tmp_path / "train_5500.label").write_text("NUM:date When was it ?\nnot a labelled line\n")
    (tmp_path / "TREC_10.label").write_text("LOC:city Where is it ?\n")
    with pytest.raises(ValueError, match=r"line 2 .*COARSE:fine"):
        load_trec(tmp_path)


def test_digits_stratified_split():
    digits = load_digits()
    assert {split: len(ds) for split, ds in digits.items()} == {"train": 1437, "test": 360}
    train, test = Counter(digits["train"]["label"]), Counter(digits["test"]["label"])
    for label in range(10):
        total = train[label] + test[label]
        assert abs(test[label] - 0.2 * total) <= 1
    image = np.asarray(digits["train"][0]["pixel_values"], dtype=np.float32)
    assert image.shape == (8, 8) and 0.0 <= image.min() and image.max() <= 1.0
    again = load_digits()
    assert again["test"]["label"] == digits["test"]["label"]
    assert load_digits(seed=1)["test"]["label"] != digits["test"]["label"]


def test_digits_bad_test_size():
    for bad in (0, 1, 1.5, -0.1, "0.2"):
        with pytest.raises(ValueError, match="`test_size`"):
            load_digits(test_size=bad)

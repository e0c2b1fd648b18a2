"""Fixtures of the data tests: the real data sets (each loaded once per session), a tokenizer built
from a local vocabulary, and heads to collate and check labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_mtl.data import load_fsdd, load_trec

# The full data sets live next to the repository (../shared/data); HF_MTL_DATA points elsewhere.
DATA_ROOT = Path(os.environ.get("HF_MTL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "how", "far", "is", "it", "from", "denver", "to", "aspen", "?", "what", "e", "-", "coli",
    "who", "the", "a", "of", "in", "name", "city", "year", "did", "when", "where", "##s",
]  # fmt: skip


def data_dir(name: str) -> Path:
    path = DATA_ROOT / name
    if not path.is_dir():
        pytest.skip(f"the full {name} data set is not at {path} (set HF_MTL_DATA)")
    return path


@pytest.fixture(scope="session")
def trec_dir():
    """The folder of the full TREC files."""
    return data_dir("trec")


@pytest.fixture(scope="session")
def fsdd_full():
    """The full FSDD (3,000 clips), loaded once: it takes a few seconds."""
    return load_fsdd(data_dir("fsdd"))


@pytest.fixture(scope="session")
def fsdd_sample():
    """The 600-clip FSDD sample shipped with hf_mtl."""
    return load_fsdd()


@pytest.fixture(scope="session")
def trec_sample():
    return load_trec()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="session")
def make_heads():
    """A function: tasks -> {task: head}, as the model builds them (the tests use the heads'
    ``collate_labels`` and ``check_labels``)."""
    from hf_mtl.modeling.heads import HEADS

    def build(tasks):
        return {task.name: HEADS.build(task.head, hidden_size=4, num_labels=task.num_labels) for task in tasks}

    return build

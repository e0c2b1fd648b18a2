"""Fixtures of the data tests: the real data sets (each loaded once per session), a tokenizer built
from a local vocabulary, and heads to collate and check labels."""

from __future__ import annotations

import pytest

from hf_mtl.data import load_fsdd

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "how", "far", "is", "it", "from", "denver", "to", "aspen", "?", "what", "e", "-", "coli",
    "who", "the", "a", "of", "in", "name", "city", "year", "did", "when", "where", "##s",
]  # fmt: skip


@pytest.fixture(scope="session")
def trec_dir(shared_data_dir):
    """The folder of the full TREC files."""
    return shared_data_dir("trec")


@pytest.fixture(scope="session")
def fsdd_full(shared_data_dir):
    """The full FSDD (3,000 clips), loaded once: it takes a few seconds."""
    return load_fsdd(shared_data_dir("fsdd"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores `vocab_file=`


@pytest.fixture(scope="session")
def make_heads():
    """A function: tasks -> {task: head}, as the model builds them (the tests use the heads'
    ``collate_labels`` and ``check_labels``)."""
    from hf_mtl.modeling.heads import HEADS

    def build(tasks):
        return {task.name: HEADS.build(task.head, hidden_size=4, num_labels=task.num_labels) for task in tasks}

    return build

"""Fixtures shared by the test suite: the real data sets (each loaded once per session), a tokenizer
built offline from the TREC questions, and tiny Hugging Face encoders built from configs."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
import torch

from hf_mtl.data import load_digits, load_fsdd, load_trec

from .hub_cache import offline_hub  # noqa: F401 - the fixture of a real Hugging Face cache, offline

# The tests' models are tiny: one thread per process is as fast as two on an idle machine, and far faster on a
# busy one (OpenMP threads that wait for a core spin for milliseconds per operation).
torch.set_num_threads(1)

# The full data sets live next to the repository (../shared/data); HF_MTL_DATA points elsewhere.
DATA_ROOT = Path(os.environ.get("HF_MTL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def data_dir(name: str) -> Path:
    """The folder of a full data set; CI has ../shared beside the clone."""
    path = DATA_ROOT / name
    if not path.is_dir():
        pytest.fail(
            f"the full {name} data set is not at {path}: put ../shared beside the repository or set HF_MTL_DATA"
        )
    return path


@pytest.fixture(scope="session")
def shared_data_dir():
    """A function: data set name -> the folder of the full data set (``../shared/data/<name>``)."""
    return data_dir


@pytest.fixture(scope="session")
def fsdd_sample():
    """The 600-clip FSDD sample shipped with hf_mtl (480 train / 120 test)."""
    return load_fsdd()


@pytest.fixture(scope="session")
def trec_sample():
    """The TREC sample shipped with hf_mtl (1,500 train / 250 test questions)."""
    return load_trec()


@pytest.fixture(scope="session")
def uci_digits():
    """scikit-learn's UCI handwritten digits, stratified 1,437 / 360."""
    return load_digits()


@pytest.fixture(scope="session")
def trec_tokenizer(tmp_path_factory, trec_sample):
    """A BERT WordPiece tokenizer whose vocabulary is the frequent words of the TREC training questions."""
    from transformers import BertTokenizerFast

    counts = collections.Counter(
        word for text in trec_sample["train"]["text"] for word in re.findall(r"\w+|[^\w\s]", text.lower())
    )
    words = [word for word, count in counts.most_common() if count >= 2]
    vocab = tmp_path_factory.mktemp("trec_tokenizer") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores `vocab_file=`


def tiny_text_encoder(vocab_size: int, seed: int = 0, dropout: float = 0.1):
    """A one-layer BERT (hidden 32) with random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config, add_pooling_layer=False)


def tiny_vision_encoder(seed: int = 0, dropout: float = 0.0):
    """A one-layer ViT over 8x8 grey images in 2x2 patches, with random weights."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return ViTModel(config, add_pooling_layer=False)


def tiny_speech_encoder(seed: int = 0, dropout: float = 0.1):
    """A one-layer Wav2Vec2 with a three-layer convolutional front end (stride 128), random weights."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 32, 32),
        conv_kernel=(16, 8, 8),
        conv_stride=(8, 4, 4),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
        layerdrop=0.0,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        feat_proj_dropout=dropout,
        final_dropout=dropout,
    )
    return Wav2Vec2Model(config)


def no_dropout(model):
    """Sets every ``nn.Dropout`` of ``model`` to p = 0 (for exactness tests)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model

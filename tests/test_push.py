"""Pushing a run: the saved folder is Hub-ready (model, processors, recipe, results, model card) and what is
uploaded is exactly that folder, checked at the network boundary (`tests/fake_hub.py`: only the HTTP transport
of huggingface_hub is replaced)."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModel

from hf_mtl import MultiTaskModel, cli

from .fake_hub import folder_files, install_fake_hub, tiny_recipe, uninstall_fake_hub, write_vocab


@pytest.fixture()
def fake_hub(monkeypatch):
    hub = install_fake_hub(monkeypatch)
    yield hub
    uninstall_fake_hub()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from hf_mtl.data import load_trec

    return write_vocab(tmp_path_factory.mktemp("vocab"), load_trec()["train"]["text"])


def test_push_to_hub_uploads_the_complete_run_after_its_results(tmp_path, fake_hub, vocab):
    """`push_to_hub=True`: the final commit holds the model, processors, recipe.yaml, eval_results.json and the
    model card, byte for byte the saved folder; checkpoint pushes carry the processors too."""
    run = tmp_path / "run"
    recipe = tiny_recipe(
        tmp_path / "tiny.yaml",
        vocab,
        output_dir=str(run),
        mtl_method="pcgrad",
        sam="sam",
        push_to_hub=True,
        hub_model_id="me/tiny-mtl",
        save_strategy="steps",
        save_steps=2,
    )
    assert cli.main(["train", str(recipe)]) == 0

    assert fake_hub.repos == ["me/tiny-mtl"]
    summaries = [commit.summary for commit in fake_hub.commits]
    assert summaries == ["Training in progress, step 2", "Training in progress, step 4", "Model save"], summaries
    assert all(commit.repo_id == "me/tiny-mtl" for commit in fake_hub.commits)
    for commit in fake_hub.commits[:2]:  # pushes during training load too: the processors are there
        assert {"config.json", "model.safetensors", "processors/text/tokenizer.json", "recipe.yaml"} <= set(
            commit.files
        )

    final = fake_hub.commits[-1]
    saved = folder_files(run)
    assert final.files == saved  # what was uploaded is the saved folder, byte for byte
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "recipe.yaml",
        "eval_results.json",
        "training_args.bin",
        "processors/text/tokenizer_config.json",
        "processors/text/collator_config.json",
        "processors/speech/collator_config.json",
        "processors/vision/collator_config.json",
    } <= set(final.files)
    assert not any(path.startswith("checkpoint-") for path in final.files)

    results = json.loads(final.files["eval_results.json"])
    assert {f"eval_{task}_accuracy" for task in ("digit", "coarse", "handwritten")} <= set(results)
    stored_recipe = yaml.safe_load(final.files["recipe.yaml"])
    assert stored_recipe["training"]["hub_model_id"] == "me/tiny-mtl" and stored_recipe["training"]["sam"] == "sam"
    assert json.loads(final.files["processors/text/collator_config.json"])["options"]["max_length"] == 32
    assert json.loads(final.files["processors/speech/collator_config.json"])["options"] == {
        "audio_column": "audio",
        "max_length_seconds": 1.0,
        "normalize": True,
        "pad_to_multiple_of": None,
        "padding": None,
        "sampling_rate": 8000,  # recorded from the training audio
        "sampling_rate_column": "sampling_rate",
    }

    card = ModelCard(final.files["README.md"].decode())
    assert card.data.library_name == "hf_mtl"
    assert {"hf_mtl", "multi-task-learning", "pcgrad", "sam", "text-classification"} <= set(card.data.tags)
    reported = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    for task in ("digit", "coarse", "handwritten"):
        for metric in ("accuracy", "f1"):
            assert reported[(task, metric)] == pytest.approx(results[f"eval_{task}_{metric}"])
    assert card.data.to_dict()["hf_mtl"]["sam_rho"] == 0.05
    assert "`sam` (ρ = 0.05, adaptive: False, η = 0.01)" in card.text
    assert "gradient method: `pcgrad`" in card.text
    assert "hf-mtl train recipe.yaml" in card.text
    assert f"| coarse | accuracy | {results['eval_coarse_accuracy']:.4f} |" in card.text
    assert "`trec` (trec: sample shipped with hf_mtl" in card.text
    assert 'AutoModel.from_pretrained("me/tiny-mtl")' in card.text

    # the uploaded files alone make the model again
    copy = tmp_path / "downloaded"
    for path, content in final.files.items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(content)
    reloaded = AutoModel.from_pretrained(copy)
    original = MultiTaskModel.from_pretrained(run)
    assert isinstance(reloaded, MultiTaskModel)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), original.state_dict().values()))


def test_hf_mtl_push_uploads_the_run_folder_with_a_card_that_links_its_plots(tmp_path, fake_hub, vocab, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", vocab, tasks=("coarse",), output_dir=str(run), max_steps=2)
    assert cli.main(["train", str(recipe)]) == 0
    assert not fake_hub.requests  # nothing left the machine without push_to_hub
    saved_card = (run / "README.md").read_text()
    assert "## Plots" not in saved_card

    # `hf-mtl report` writes its plots after training; a push links them
    from PIL import Image

    (run / "plots").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, format="PNG")
    (run / "plots" / "losses.png").write_bytes(buffer.getvalue())

    assert cli.main(["push", str(run), "my-org/coarse-mtl", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert fake_hub.repos == ["my-org/coarse-mtl"]
    (commit,) = fake_hub.commits
    assert commit.summary == "Upload hf_mtl run"
    assert commit.files == folder_files(run)
    card = commit.files["README.md"].decode()
    assert "![losses](plots/losses.png)" in card and "plots/losses.png" in commit.files
    assert 'pipeline("multi-task-classification", model="my-org/coarse-mtl")' in card
    # the rebuilt card keeps the training settings that the saved one recorded
    assert ModelCard(card).data.to_dict()["hf_mtl"] == ModelCard(saved_card).data.to_dict()["hf_mtl"]
    assert ModelCard(card).data.to_dict()["hf_mtl"]["max_steps"] == 2


def test_hf_mtl_push_refuses_a_folder_that_is_not_a_run(tmp_path, fake_hub, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["push", str(tmp_path), "me/x"]) == 2
    assert "is not a saved hf_mtl model" in capsys.readouterr().err
    assert not fake_hub.requests

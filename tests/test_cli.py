"""The ``hf-mtl`` console script, run for real in a subprocess: the quickstart recipe (shortened with
``--set``) trains, evaluates and saves; ``--help`` documents every option; bad input exits with status 2
before any training, naming the field and the valid values; an existing output folder is kept."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from hf_mtl import MultiTaskModel, MultiTaskTrainingArguments, list_methods
from hf_mtl.data import load_digits, load_fsdd, load_trec

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TASKS = ("digit", "speaker", "coarse", "fine", "handwritten")
# the console script of the environment running the tests (pip install -e . puts it beside python)
HF_MTL = Path(shutil.which("hf-mtl", path=str(Path(sys.executable).parent)) or shutil.which("hf-mtl") or "hf-mtl")


def shortened(data_keys=("fsdd", "trec", "uci_digits")) -> list[str]:
    """The ``--set`` arguments that shorten the quickstart: a few steps on a few rows of each data set."""
    args = ["--set", "max_steps=3", "--set", "per_device_train_batch_size=8", "--set", "dataloader_pin_memory=false"]
    for key in data_keys:
        args += ["--set", f"data.{key}.max_train_samples=32", "--set", f"data.{key}.max_eval_samples=16"]
    return args


SHORT = shortened()

# Offline, and one thread per process like the in-process tests (conftest.py): the models are tiny.
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    OMP_NUM_THREADS="1",
)


def hf_mtl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs the installed console script; returns the finished process (stdout and stderr as text)."""
    return subprocess.run([str(HF_MTL), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_the_console_script_is_installed():
    assert HF_MTL.is_file(), f"{HF_MTL} is missing: pip install -e . installs the `hf-mtl` console script"


def test_shortened_quickstart_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "quickstart"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a non-empty output_dir is used only with overwrite_output_dir
    result = hf_mtl(
        "train",
        str(QUICKSTART),
        *SHORT,
        "--set",
        f"output_dir={out}",
        "--set",
        "overwrite_output_dir=true",
        "--logging_steps",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the per-task table: a header with the metrics, one row per task
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["task"])
    assert lines[header].split() == ["task", "accuracy", "f1", "loss", "majority"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2 : header + 2 + len(TASKS)]}
    assert list(rows) == list(TASKS)
    assert all(len(values) == 4 and all(re.fullmatch(r"\d+\.\d{4}", v) for v in values) for values in rows.values())
    # the majority baseline: the most frequent label's share of the first 16 rows of each eval split
    eval_labels = {
        "digit": load_fsdd()["test"]["digit"][:16],
        "speaker": load_fsdd()["test"]["speaker"][:16],
        "coarse": load_trec()["test"]["coarse"][:16],
        "fine": load_trec()["test"]["fine"][:16],
        "handwritten": load_digits()["test"]["label"][:16],
    }
    for task, labels in eval_labels.items():
        expected = max(Counter(labels).values()) / len(labels)
        assert float(rows[task][3]) == pytest.approx(expected, abs=5e-5), task

    metrics = json.loads((out / "eval_results.json").read_text())
    for task in TASKS:
        assert 0.0 <= metrics[f"eval_{task}_accuracy"] <= 1.0
        assert float(rows[task][0]) == pytest.approx(metrics[f"eval_{task}_accuracy"], abs=5e-5)
    assert (out / "notes.txt").read_text() == "mine"
    stored = yaml.safe_load((out / "recipe.yaml").read_text())
    assert stored["training"]["max_steps"] == 3 and stored["training"]["logging_steps"] == 1
    assert stored["data"]["fsdd"]["max_eval_samples"] == 16

    model, info = MultiTaskModel.from_pretrained(out, output_loading_info=True)
    assert model.task_names == list(TASKS) and not info["missing_keys"] and not info["unexpected_keys"]
    assert model.tasks["speaker"].num_labels == 6 and model.tasks["coarse"].label_names[0] == "ABBR"
    assert (out / "processors" / "text" / "tokenizer_config.json").is_file()


def _options(help_text: str) -> dict[str, str]:
    """Option -> its help text (whitespace collapsed), from an argparse help page."""
    options, current = {}, None
    for line in help_text.split("A recipe is a YAML file")[0].splitlines():  # the options, not the epilog
        match = re.match(r"^  (--\w+)(.*)$", line)
        if match:
            current = match.group(1)
            head = match.group(2)
            # the help starts after the metavars, at two or more spaces
            parts = re.split(r"\s{2,}", head.strip(), maxsplit=1)
            options[current] = parts[1] if len(parts) == 2 else ""
        elif current and line.startswith("    "):
            options[current] = f"{options[current]} {line.strip()}".strip()
        else:
            current = None
    return options


def test_train_help_documents_every_option(tmp_path):
    result = hf_mtl("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    options = _options(result.stdout)
    assert "override a recipe value by dotted path" in options["--set"]
    # each option with its field's help (and default, where it has one)
    assert options["--mtl_method"].startswith("How the per-task gradients are combined. (default: ew)")
    assert options["--sam_rho"].startswith("Radius rho of the")
    assert options["--learning_rate"].startswith("The initial learning rate for the optimizer. (default: 5e-05)")
    assert options["--task_sampling"].startswith("Which tasks appear in each step. (default: all)")
    assert "--overwrite_output_dir" in options and "pcgrad" in result.stdout and "round_robin" in result.stdout
    fields = [f.name for f in dataclasses.fields(MultiTaskTrainingArguments) if f.init]
    assert [name for name in fields if f"--{name}" not in options] == []
    assert "tasks are addressed by name" in result.stdout  # the recipe section of the page


def test_list_names_the_registered_units(tmp_path):
    result = hf_mtl("list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["methods"].split(", ") == list_methods()
    assert {"pcgrad", "cagrad", "mgda", "nash_mtl", "upgrad"} <= set(lines["methods"].split(", "))
    assert lines["task sampling"].split(", ") == [
        "all",
        "annealed",
        "proportional",
        "round_robin",
        "temperature",
        "uniform",
    ]
    assert lines["heads"] == "classification, multilabel, regression, token_classification"
    assert lines["data loaders"] == "digits, fsdd, load_dataset, trec"


def test_check_validates_without_training(tmp_path):
    out = tmp_path / "out"
    result = hf_mtl(
        "check", str(QUICKSTART), *SHORT, "--set", f"output_dir={out}", "--mtl_method", "cagrad", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 tasks (digit, speaker, coarse, fine, handwritten), method cagrad: OK" in result.stdout
    assert not out.exists()


def _run_together(*runs: tuple[str, ...], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Runs several ``hf-mtl`` commands at once (they spend their time importing the stack)."""
    processes = [
        subprocess.Popen(
            [str(HF_MTL), *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in runs
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_check_accepts_an_existing_output_dir_and_names_undecodable_audio(tmp_path):
    """`check` validates a run whose output_dir holds a previous run (and says that `train` would stop there), and
    a corrupt WAV in a data_dir is an error naming the file, or, with `skip_undecodable`, a warning with the count."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("last week's run")
    fsdd = tmp_path / "fsdd"
    shutil.copytree(REPO / "hf_mtl" / "data" / "sample" / "fsdd", fsdd)
    (fsdd / "recordings" / "3_jackson_40.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt not a real header")
    quick = [str(QUICKSTART), *SHORT, "--set", f"output_dir={out}"]
    existing, corrupt, skipped = _run_together(
        ("check", *quick),
        ("check", *quick, "--set", f"data.fsdd.data_dir={fsdd}"),
        ("check", *quick, "--set", f"data.fsdd.data_dir={fsdd}", "--set", "data.fsdd.skip_undecodable=true"),
        cwd=tmp_path,
    )
    assert existing.returncode == 0, existing.stderr[-3000:]
    assert "method pcgrad: OK" in existing.stdout and "`train` would stop here: `output_dir`" in existing.stdout
    assert os.listdir(out) == ["results.txt"] and (out / "results.txt").read_text() == "last week's run"

    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr, corrupt.stderr[-3000:]
    assert re.search(
        r"data\.fsdd \(loader 'fsdd'\): `data_dir`: FSDD recording .*3_jackson_40\.wav does not decode as audio "
        r"\(.*\); fix or remove the file, or pass `skip_undecodable=True`",
        corrupt.stderr,
    ), corrupt.stderr[-3000:]
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert re.search(r"skipped 1 recording\(s\) that do not decode as audio: 3_jackson_40\.wav", skipped.stderr)


# Each bad input: the extra arguments (after the shortened quickstart), and what the error must say. The
# runs are independent processes, started together (they spend their time importing the stack).
BAD_INPUTS = {
    "unknown-section": (
        ["--set", "trainng.max_steps=3"],
        r"unknown recipe section 'trainng'; valid sections are: name, description, encoders, trunk, head_dropout, data, tasks, training",
    ),
    "unknown-method": (
        ["--set", "mtl_method=pcgard"],
        r"`mtl_method` must be one of aligned_mtl, .*pcgrad.*; got 'pcgard'",
    ),
    "unknown-method-option": (
        ["--mtl_method", "pcgard"],
        r"argument --mtl_method/--mtl-method: invalid choice: 'pcgard' \(choose from .*pcgrad",
    ),
    "unknown-head": (
        ["--set", "tasks.digit.head=ranking"],
        r"task 'digit': unknown `head` 'ranking'; valid heads are: classification, multilabel, regression, token_classification",
    ),
    "unknown-sampling": (
        ["--set", "task_sampling=random"],
        r"`task_sampling` must be one of all, annealed, proportional, round_robin, temperature, uniform; got 'random'",
    ),
    "task-without-data": (
        ["--recipe-without-fsdd"],
        r"task 'digit': `data` 'fsdd' is not one of the data keys: trec, uci_digits",
    ),
    "labels-out-of-range": (
        ["--set", "tasks.digit.num_labels=5"],
        r"task 'digit': label \d is outside \[0, 4\] in column 'digit' of its `train_dataset` \(num_labels=5",
    ),
    "data-dir-without-data": (
        ["--set", "data.fsdd.data_dir={empty}"],
        r"data\.fsdd \(loader 'fsdd'\): `data_dir` does not hold FSDD: .*empty must contain recordings/\*\.wav "
        r"\(or \*\.flac\) and speakers\.csv",
    ),
    "non-empty-output-dir": (
        ["--output-dir-taken"],
        r"`output_dir` '.*out' already exists and is not empty; set `overwrite_output_dir=true`",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Case -> (the finished ``hf-mtl train`` process, its output_dir), for every case of `BAD_INPUTS`."""
    root = tmp_path_factory.mktemp("bad_inputs")
    empty = root / "empty"
    empty.mkdir()
    tree = yaml.safe_load(QUICKSTART.read_text())
    del tree["data"]["fsdd"]  # the digit and speaker tasks read `fsdd`
    no_fsdd = root / "no_fsdd.yaml"
    no_fsdd.write_text(yaml.safe_dump(tree, sort_keys=False))
    pending, runs = list(BAD_INPUTS.items()), {}
    running: list[tuple[str, subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < min(4, os.cpu_count() or 1):
            case, (extra, _) = pending.pop(0)
            folder = root / case
            folder.mkdir()
            out = folder / "out"
            recipe, short = QUICKSTART, SHORT
            if extra == ["--recipe-without-fsdd"]:
                recipe, short, extra = no_fsdd, shortened(("trec", "uci_digits")), []
            elif extra == ["--output-dir-taken"]:
                out.mkdir()
                (out / "results.txt").write_text("last week's run")
                extra = []
            args = [
                str(HF_MTL),
                "train",
                str(recipe),
                *short,
                "--set",
                f"output_dir={out}",
                *(arg.format(empty=empty) for arg in extra),
            ]
            process = subprocess.Popen(
                args, cwd=folder, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            running.append((case, process, out))
        case, process, out = running.pop(0)
        stdout, stderr = process.communicate(timeout=600)
        runs[case] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out)
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_status_2_before_training(bad_runs, case):
    result, out = bad_runs[case]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(BAD_INPUTS[case][1], result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "train_runtime" not in result.stdout + result.stderr
    if case == "non-empty-output-dir":  # nothing the user had is lost, nothing is added
        assert os.listdir(out) == ["results.txt"] and (out / "results.txt").read_text() == "last week's run"
    else:
        assert not out.exists()

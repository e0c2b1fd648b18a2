"""The project's documentation matches the code: every key of the recipe schema in ``docs/recipes.md`` is one the
code checks (and every key the code checks is documented), and the documents the README and the docs link to
exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from transformers import TrainingArguments

from hf_mtl.modeling.modeling import TRUNK_KEYS
from hf_mtl.recipes import DATA_KEYS, ENCODER_KEYS, RECIPE_KEYS, TASK_EXTRA_KEYS, list_data_loaders
from hf_mtl.tasks import Task
from hf_mtl.training_args import MultiTaskTrainingArguments

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def documented_keys(markdown: str) -> dict[str, list[str]]:
    """Heading (``## Sections``, ``## `encoders` ``) -> the backticked names in the first column of the first table
    under it."""
    tables: dict[str, list[str]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().strip("`")
            continue
        match = re.match(r"^\| `([A-Za-z_]+)` \|", line)
        if heading is not None and match:
            tables.setdefault(heading, []).append(match.group(1))
        elif heading in tables and not line.startswith("|"):
            heading = None  # the first table ended
    return tables


def test_the_recipe_schema_is_documented_key_for_key():
    tables = documented_keys((DOCS / "recipes.md").read_text(encoding="utf-8"))
    assert tables["Sections"] == list(RECIPE_KEYS)
    assert tables["encoders"] == list(ENCODER_KEYS)
    assert tables["trunk"] == list(TRUNK_KEYS)
    assert tables["data"] == list(DATA_KEYS)
    task_keys = [field.name for field in dataclasses.fields(Task)] + list(TASK_EXTRA_KEYS)
    assert sorted(tables["tasks"]) == sorted(task_keys)


def test_the_documented_loaders_peft_types_and_training_fields_exist():
    text = (DOCS / "recipes.md").read_text(encoding="utf-8")
    loader_row = next(line for line in text.splitlines() if line.startswith("| `loader` |"))
    assert sorted(re.findall(r"`(\w+)`", loader_row.split("|")[2].split(";")[0])) == sorted(list_data_loaders())
    from peft import PeftType

    peft_paragraph = text.split("### `encoders.<key>.peft`")[1].split("```")[0]
    named = re.findall(r"`([A-Z0-9_]+)`", peft_paragraph)
    assert named and all(name in PeftType.__members__ for name in named)
    own = {f.name for f in dataclasses.fields(MultiTaskTrainingArguments)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    training = text.split("## `training`")[1]
    assert own and all(f"`{name}`" in training for name in own), sorted(own)


def test_linked_documents_exist():
    for source in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", source.read_text(encoding="utf-8")):
            base = REPO if target.startswith("docs/") or source.parent == REPO else source.parent
            assert (base / target).is_file(), f"{source.name} links to {target}, which does not exist"

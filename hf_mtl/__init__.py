"""hf_mtl: multi-task learning for the Hugging Face ``Trainer``.

The public names are imported lazily, so ``import hf_mtl.methods`` (pure tensor code) does not pull
in ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Task": "hf_mtl.tasks",
    "MultiTaskConfig": "hf_mtl.modeling",
    "MultiTaskModel": "hf_mtl.modeling",
    "MultiTaskTrainer": "hf_mtl.trainer",
    "MultiTaskTrainingArguments": "hf_mtl.training_args",
    "get_method": "hf_mtl.methods",
    "list_methods": "hf_mtl.methods",
    "list_samplers": "hf_mtl.data",
    "list_heads": "hf_mtl.modeling",
    "load_fsdd": "hf_mtl.data",
    "load_trec": "hf_mtl.data",
    "load_digits": "hf_mtl.data",
    "TextCollator": "hf_mtl.data",
    "VisionCollator": "hf_mtl.data",
    "SpeechCollator": "hf_mtl.data",
    "delta_m": "hf_mtl.metrics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_mtl' has no attribute {name!r}")

"""hf_mtl: multi-task learning for the Hugging Face ``Trainer``.

The public names are imported lazily. Importing the package registers the model type with
``AutoConfig`` / ``AutoModel`` and the ``"multi-task-classification"`` pipeline with ``transformers.pipeline``
(so ``import hf_mtl`` then ``AutoModel.from_pretrained(run)`` works), which imports ``transformers``.
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
    "MultiTaskPipeline": "hf_mtl.pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_mtl' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """``AutoConfig`` / ``AutoModel`` (in `hf_mtl.modeling`) and ``PIPELINE_REGISTRY`` learn the model type."""
    from . import modeling  # noqa: F401  (registers the Auto classes on import)
    from .pipeline import register_pipeline

    register_pipeline()


_register_with_transformers()

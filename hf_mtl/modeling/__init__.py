"""The multi-task model: encoders, an optional shared trunk, task heads.

Importing this package registers the model type ``hf_mtl`` with ``AutoConfig`` and ``AutoModel``, so that
``AutoModel.from_pretrained(folder_or_repo)`` returns a `MultiTaskModel` (``import hf_mtl`` does it).
"""

from transformers import AutoConfig, AutoModel

from .configuration import MultiTaskConfig
from .heads import HEADS, TaskHead, list_heads
from .modeling import MultiTaskModel, MultiTaskOutput

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)

__all__ = ["HEADS", "MultiTaskConfig", "MultiTaskModel", "MultiTaskOutput", "TaskHead", "list_heads"]

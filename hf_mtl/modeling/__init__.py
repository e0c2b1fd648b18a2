"""The multi-task model: encoders, an optional shared trunk, task heads."""

from .configuration import MultiTaskConfig
from .heads import HEADS, TaskHead, list_heads
from .modeling import MultiTaskModel, MultiTaskOutput

__all__ = ["HEADS", "MultiTaskConfig", "MultiTaskModel", "MultiTaskOutput", "TaskHead", "list_heads"]

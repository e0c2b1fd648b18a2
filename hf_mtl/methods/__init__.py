"""Gradient methods: one small registered module per method (docs/methods.md).

``get_method(name, **kwargs)`` builds one; ``list_methods()`` names them all. Importing this package
imports every method module so that each registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import GradientMethod, GramianMethod, LossWeightingMethod
from .registry import METHODS, get_method, list_methods, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "registry"} and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "GradientMethod",
    "GramianMethod",
    "LossWeightingMethod",
    "METHODS",
    "get_method",
    "list_methods",
    "register_method",
]

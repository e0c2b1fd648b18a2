"""The registry of gradient methods: ``get_method(name, **kwargs)`` and ``list_methods()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..registry import Registry
from .base import GradientMethod

METHODS: Registry[type[GradientMethod]] = Registry("gradient method")

M = TypeVar("M", bound=type[GradientMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: registers a `GradientMethod` subclass under the lower-case paper name ``name``."""
    return METHODS.register(name)  # type: ignore[return-value]


def get_method(name: str, **kwargs: Any) -> GradientMethod:
    """Builds the gradient method registered as ``name`` (see `list_methods`) with ``kwargs``.

    Raises:
        `ValueError`: for an unknown name (the message lists the valid ones) or an unknown keyword.
    """
    cls = METHODS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"invalid `mtl_method_kwargs` for method {name!r}: {error}") from error


def list_methods() -> list[str]:
    """The names of all registered gradient methods, sorted."""
    return METHODS.names()

"""A tiny name -> class registry shared by methods, heads, samplers and sharpness variants.

Each pluggable unit registers itself with a decorator, PEFT-tuner style::

    METHODS = Registry("gradient method")

    @METHODS.register("pcgrad")
    class PCGrad(JacobianMethod): ...

Unknown names raise a ``ValueError`` that lists every valid name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to classes (or factories) of one kind.

    Args:
        kind (`str`): what is registered, used in error messages (e.g. ``"gradient method"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that registers the decorated class under ``name``."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            if isinstance(obj, type) and not getattr(obj, "name", None):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Returns the entry registered under ``name``; raises a ``ValueError`` naming the valid ones."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names are: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Instantiates the entry registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

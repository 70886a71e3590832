"""A name -> class registry with a decorator, as pruners and allocation methods use (peft's
``register_peft_method`` idea): a method is one class that registers itself; the engine, the pipeline,
the config and the CLI know it only through its registry. Imports no torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "pruner", "allocation": what an error calls the names
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` available as ``name`` (and set ``cls.name``)."""

        def deco(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """In registration order."""
        return list(self._classes)

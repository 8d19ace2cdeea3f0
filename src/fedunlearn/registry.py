"""One registry helper for every "name -> object" table of the project.

Methods (:func:`fedunlearn.strategies.register_method`), client actions
(:func:`fedunlearn.client.register_action`), perturbations
(:func:`fedunlearn.perturbations.register_perturbation`) and the harness's models
(:func:`fedunlearn.harness.models.register_model`) are each a :class:`Registry`, so they
share one name rule and one wording for their errors::

    PLUGINS = Registry("plugin")

    @PLUGINS.register("my_plugin")
    def my_plugin(...): ...

    PLUGINS.get("my_plugin")   # the function
    PLUGINS.get("nope")        # ValueError: unknown plugin name 'nope'; choose from [...]

The name rule (:data:`NAME_RULE`): a lower-case ASCII letter, then lower-case letters,
digits and ``_`` (``not``, ``l1_sparse``, ``resnet18``, ``vit_tiny``). Such a name is a
Python identifier (Flower routes message type ``train.<name>`` by it), needs no quoting
in a run-config or Hydra override, and has no ``.`` (``method-params`` reads
``<method>.<key>=<value>``) or ``-``.

Registering a second object under a taken name is refused, naming both; registering the
same object again under its own name is a no-op. Discovery (importing a package's
modules so that they register) stays with each registry's owner.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["NAME_RULE", "Registry", "check_name"]

T = TypeVar("T")
_O = TypeVar("_O")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
#: The rule every registered name follows, in words (quoted by the error).
NAME_RULE = "a lower-case letter, then lower-case letters, digits and '_'"


def check_name(kind: str, name: object) -> str:
    """``name`` if it follows :data:`NAME_RULE`; ``ValueError`` naming ``kind`` if not."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} is not allowed: use {NAME_RULE}")
    return name


def _describe(obj: object) -> str:
    """``module.qualname`` of a class or function; ``repr`` of anything else."""
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if isinstance(qualname, str) and isinstance(module, str):
        return f"{module}.{qualname}"
    return repr(obj)


class Registry(Generic[T]):
    """Objects of one ``kind`` (``"method"``, ``"model"``, ...) by name.

    ``entries``: the live ``dict`` of name -> object (read it, or ``pop`` a name to undo a
    registration, e.g. in a test); pass one to back the registry with an existing dict.
    """

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {} if entries is None else entries
        for name in self.entries:
            check_name(kind, name)

    def register(self, name: str) -> Callable[[_O], _O]:
        """Decorator: store the decorated object under ``name`` and return it unchanged.

        The name is checked at once (``ValueError`` if it breaks :data:`NAME_RULE`);
        a name taken by another object is refused when decorating, naming both."""
        check_name(self.kind, name)

        def decorator(obj: _O) -> _O:
            self.add(name, obj)  # type: ignore[arg-type]
            return obj

        return decorator

    def add(self, name: str, obj: T) -> T:
        """Store ``obj`` under ``name`` (the non-decorator form of :meth:`register`)."""
        check_name(self.kind, name)
        current = self.entries.get(name)
        if name in self.entries and current is not obj:
            raise ValueError(f"{self.kind} name {name!r} is already registered to "
                             f"{_describe(current)}; refusing to register {_describe(obj)} "
                             "under it")
        self.entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` listing the names if none."""
        try:
            return self.entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} name {name!r}; "
                             f"choose from {self.names()}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.entries)

    def copy(self) -> Registry[T]:
        """A registry of the same kind holding (a copy of) the same entries."""
        return Registry(self.kind, dict(self.entries))

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

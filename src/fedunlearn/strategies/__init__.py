"""Unlearning methods as Flower strategies, selected by name (run-config ``method``).

A registry maps a name to an :class:`UnlearningStrategy` subclass, so a run-config string
or a Hydra choice maps to a class in one place::

    from fedunlearn.strategies import create_method
    strategy = create_method("not", context)
"""

from __future__ import annotations

from .base import CostMeter, UnlearningContext, UnlearningStrategy

_METHODS: dict[str, type[UnlearningStrategy]] = {}


def register_method(name: str):
    """Class decorator: make a strategy selectable as ``method=<name>``."""

    def deco(cls: type[UnlearningStrategy]) -> type[UnlearningStrategy]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[UnlearningStrategy]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is unknown; choose from {list_methods()}") from None


def create_method(name: str, context: UnlearningContext) -> UnlearningStrategy:
    return get_method(name)(context)


# Built-in methods register themselves on import.
from . import finetune, negation_not, retrain  # noqa: E402,F401

__all__ = ["CostMeter", "UnlearningContext", "UnlearningStrategy", "create_method",
           "get_method", "list_methods", "register_method"]

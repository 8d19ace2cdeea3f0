"""Unlearning methods as Flower strategies, selected by name.

A registry maps a name to an :class:`UnlearningStrategy` subclass, so a name (a
run-config string, a Hydra choice) maps to a class in one place::

    from fedunlearn.strategies import get_method
    strategy = get_method("not")(Recovery(rounds=11), model_fn=Net)

Every module of this package is imported by :func:`discover` (``pkgutil``): dropping a
strategy file that uses :func:`register_method` into this folder is all it takes to add
a method. (Building a method from the experiment harness's run-config lives in
:mod:`fedunlearn.harness.methods`.)
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (CostMeter, Phase, Recovery, Training, UnlearningContext,
                   UnlearningFailed, UnlearningStrategy)
from .params import MethodParams

_METHODS: dict[str, type[UnlearningStrategy]] = {}
_INFRASTRUCTURE = {"aggregation", "base", "context", "costs", "params", "reply_checks", "roles",
                   "settings", "stopping", "validation"}


def register_method(name: str):
    """Class decorator: make a strategy selectable as ``method=<name>``."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"method name {name!r}: use lower-case letters, digits and '_'")

    def deco(cls: type[UnlearningStrategy]) -> type[UnlearningStrategy]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def discover() -> None:
    """Import every strategy module of this package (each registers its methods)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{module.name}")


def list_methods() -> list[str]:
    discover()
    return sorted(_METHODS)


def get_method(name: str) -> type[UnlearningStrategy]:
    discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is unknown; choose from {list_methods()}") from None


__all__ = ["CostMeter", "MethodParams", "Phase", "Recovery", "Training", "UnlearningContext",
           "UnlearningFailed", "UnlearningStrategy", "discover", "get_method", "list_methods",
           "register_method"]

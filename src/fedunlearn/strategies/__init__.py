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

from ..registry import Registry
from .base import (
    CostMeter,
    Phase,
    Recovery,
    Training,
    UnlearningContext,
    UnlearningFailed,
    UnlearningStrategy,
)
from .params import MethodParams

_METHODS: Registry[type[UnlearningStrategy]] = Registry("method")
_INFRASTRUCTURE = {"aggregation", "base", "context", "costs", "exclude_forgotten", "params",
                   "reply_checks", "roles", "round_records", "settings", "stopping", "validation"}


def register_method(name: str):
    """Class decorator: make a strategy selectable as ``method=<name>`` (``name``: a
    lower-case letter, then lower-case letters, digits and '_'; see
    :mod:`fedunlearn.registry`)."""
    register = _METHODS.register(name)

    def deco(cls: type[UnlearningStrategy]) -> type[UnlearningStrategy]:
        register(cls)
        cls.name = name
        return cls

    return deco


def discover() -> None:
    """Import every strategy module of this package (each registers its methods)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{module.name}")


def list_methods() -> list[str]:
    discover()
    return _METHODS.names()


def get_method(name: str) -> type[UnlearningStrategy]:
    discover()
    return _METHODS.get(name)


__all__ = ["CostMeter", "MethodParams", "Phase", "Recovery", "Training", "UnlearningContext",
           "UnlearningFailed", "UnlearningStrategy", "discover", "get_method", "list_methods",
           "register_method"]

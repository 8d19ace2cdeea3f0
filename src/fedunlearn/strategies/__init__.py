"""Unlearning methods as Flower strategies, selected by name (run-config ``method``).

A registry maps a name to an :class:`UnlearningStrategy` subclass, so a run-config string
or a Hydra choice maps to a class in one place::

    from fedunlearn.strategies import create_method
    strategy = create_method("not", context)

Every module of this package is imported by :func:`discover` (``pkgutil``): dropping a
strategy file that uses :func:`register_method` into this folder is all it takes to add
a method. Method names and method parameters are checked here (:func:`check_methods`),
before Flower starts.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..harness.config import ExperimentConfig
from ..history import HistorySpec
from .base import (CostMeter, Phase, Recovery, Training, UnlearningContext,
                   UnlearningFailed, UnlearningStrategy)
from .params import MethodParams

_METHODS: dict[str, type[UnlearningStrategy]] = {}
_INFRASTRUCTURE = {"base", "params", "stopping"}


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


def create_method(name: str, context: UnlearningContext) -> UnlearningStrategy:
    """The harness's strategy for ``name``, built from ``context.cfg`` and bound to it."""
    return get_method(name).from_config(context.cfg, context)


def check_methods(cfg: ExperimentConfig) -> dict[str, MethodParams]:
    """Check the job's method list and method parameters; return each method's params.

    Raises ``ValueError`` naming the bad method, key or value and what is allowed."""
    known = list_methods()
    if not cfg.methods:
        raise ValueError(f"method is empty; choose from {known}")
    for m in cfg.methods:
        if m not in known:
            raise ValueError(f"method={m!r} is unknown; choose from {known}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"method lists a method twice: {','.join(cfg.methods)}")
    for m in cfg.params_by_method():
        if m not in known:
            raise ValueError(f"method-params names method {m!r}, which is unknown; "
                             f"choose from {known}")
        if m not in cfg.methods:
            raise ValueError(f"method-params sets parameters of {m!r}, which this job does "
                             f"not run (method={','.join(cfg.methods)})")
    params = {m: get_method(m).params_from_config(cfg) for m in cfg.methods}
    for m, p in params.items():
        get_method(m).check_config(cfg, p)
    check_history_bound(cfg, params)
    return params


def history_spec(cfg: ExperimentConfig, params: dict[str, MethodParams] | None = None
                 ) -> tuple[HistorySpec, list[str]]:
    """What the job's methods need recorded during pretraining, and which need it."""
    params = params if params is not None else {
        m: get_method(m).params_from_config(cfg) for m in cfg.methods}
    spec, who = HistorySpec(), []
    for m in cfg.methods:
        need = get_method(m).history_needs(params[m])
        if need:
            spec, who = spec.union(need), who + [m]
    return spec, who


def check_history_bound(cfg: ExperimentConfig, params: dict[str, MethodParams] | None = None
                        ) -> dict[str, int] | None:
    """Refuse, before any data is loaded, a training history larger than
    ``history.max-mb`` (estimated from the model, the clients and the pretraining rounds);
    return the estimate (``None``: no method of the job needs a history)."""
    spec, who = history_spec(cfg, params)
    if not spec:
        return None
    import torch

    from ..harness.data import DATASET_SHAPES
    from ..history import check_bound, model_float_bytes
    from ..harness.models import create_model

    classes, channels, size = DATASET_SHAPES[cfg.dataset]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(cfg.model, num_classes=classes, in_channels=channels,
                             image_size=size)
    return check_bound(spec, model_float_bytes(model), cfg.num_clients, cfg.pretrain_rounds,
                       cfg.history_max_mb, who, model=f"{cfg.model} on {cfg.dataset}")


__all__ = ["CostMeter", "MethodParams", "Phase", "Recovery", "Training", "UnlearningContext",
           "UnlearningFailed", "UnlearningStrategy",
           "check_history_bound", "check_methods", "create_method", "discover", "get_method",
           "history_spec", "list_methods", "register_method"]

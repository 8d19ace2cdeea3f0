"""Typed, validated method parameters.

Each method declares its hyperparameters as a frozen dataclass subclassing
:class:`MethodParams` in its strategy file (the defaults there are mirrored by its
``conf/method/<name>.yaml``; a drift test keeps the two equal). Values reach a job as one
run-config string, ``method-params``, of ``<method>.<key>=<value>`` pairs::

    fedunlearn-run method=puf method-params="puf.alpha=3.0 puf.lr=0.02"

so a new method or parameter needs no new ``[tool.flwr.app.config]`` key. Every value
is parsed to the field's type; a bad value or an unknown key is rejected naming the
method, the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameters (a method without any uses it as is)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field; subclasses add their checks."""

    @classmethod
    def describe(cls) -> str:
        fields = [f"{f.name} ({_type_name(cls, f)}, default {f.default!r})"
                  for f in dataclasses.fields(cls)]
        return ", ".join(fields) if fields else "no parameters"

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, method: str, values: Mapping[str, Any]) -> MethodParams:
        """Build from ``{key: value}`` (strings or typed values), with full checks."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"method-params: {method}.{key}={raw!r}: {method!r} has no "
                                 f"parameter {key!r}; it takes {cls.describe()}")
            kwargs[name] = _convert(raw, _field_type(cls, fields[name]), method, key)
        params = cls(**kwargs)
        try:
            params.validate()
        except ValueError as err:
            raise ValueError(f"method-params: {method}: {err}") from None
        return params

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(cls, f) -> type:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def _type_name(cls, f) -> str:
    return getattr(_field_type(cls, f), "__name__", str(_field_type(cls, f)))


def _convert(raw: Any, kind: type, method: str, key: str):
    where = f"method-params: {method}.{key}={raw!r}"
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "false"):
            return text == "true"
        raise ValueError(f"{where}: expected true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise ValueError(f"{where}: expected an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{where}: expected an integer") from None
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError(f"{where}: expected a number")
        try:
            value = float(raw) if isinstance(raw, (int, float)) else float(str(raw).strip())
        except ValueError:
            raise ValueError(f"{where}: expected a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number")
        return value
    return str(raw)

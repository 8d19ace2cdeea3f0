"""The allowed values of numeric settings, declared once and shared.

A :class:`Range` checks a value and words the error. The library's settings classes
(:class:`~fedunlearn.Recovery`, :class:`~fedunlearn.Training`,
:class:`~fedunlearn.ServiceConfig`, ``Phase``) check their fields with the ranges
declared here (or in their ``RANGES``), and the experiment harness's run-config key
table refers to the very same objects, so a value the run-config accepts is one the
library accepts, and the other way round::

    LR.check("Recovery.lr", -1)
    # ValueError: Recovery.lr=-1 must be in (0, 100]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_ROUNDS = 100_000
MAX_LR = 100.0


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: ``lo``/``hi`` (``None``: unbounded), both ends
    included unless open; ``integer``: an ``int`` only (never a bool or a float)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    note: str = ""

    def describe(self) -> str:
        """``in [0, 1)``, ``>= 1``, ``> 0``, with the note in parentheses."""
        if self.lo is not None and self.hi is not None:
            text = (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = "any finite number"
        return f"{text} ({self.note})" if self.note else text

    def type_error(self, value: Any) -> str | None:
        """What is wrong with ``value``'s type (``None``: a number of the right kind)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected an integer" if self.integer else "expected a number"
        if self.integer and not isinstance(value, int):
            return "expected an integer"
        if isinstance(value, float) and not math.isfinite(value):
            return "expected a finite number"
        return None

    def within(self, value: float) -> bool:
        lo, hi = self.lo, self.hi
        return ((lo is None or (value > lo if self.lo_open else value >= lo))
                and (hi is None or (value < hi if self.hi_open else value <= hi)))

    def check(self, name: str, value: Any) -> Any:
        """``value`` unchanged, or ``ValueError`` naming ``name``, the value and what is
        allowed (``lr=-1 must be in (0, 100]``, ``rounds=2.5: expected an integer``)."""
        problem = self.type_error(value)
        if problem:
            raise ValueError(f"{name}={_brief(value)}: {problem}")
        if not self.within(value):
            raise ValueError(f"{name}={_brief(value)} must be {self.describe()}")
        return value

    def allows(self, value: Any) -> bool:
        return self.type_error(value) is None and self.within(value)


@dataclass(frozen=True)
class CountOrShare(Range):
    """A count (1, 2, ...) or a share in (0, 1): a number > 0 that is whole above 1."""

    def check(self, name: str, value: Any) -> Any:
        super().check(name, value)
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"{name}={_brief(value)}: expected a count (1, 2, ...) or a "
                             "share of the nodes asked, in (0, 1)")
        return value

    def allows(self, value: Any) -> bool:
        return super().allows(value) and (value <= 1 or float(value).is_integer())


def check_fields(obj: Any, ranges: Mapping[str, Range],
                 label: Callable[[str], str]) -> None:
    """Check each field of ``obj`` named in ``ranges``; errors name ``label(field)``."""
    for name, allowed in ranges.items():
        allowed.check(label(name), getattr(obj, name))


# -- shared by the library's settings and the run-config keys ------------------------------
ROUNDS = Range(0, MAX_ROUNDS, integer=True)
"""Rounds of a phase (pretraining, recovery)."""
EPOCHS = Range(1, MAX_ROUNDS, integer=True)
"""Local epochs per round."""
EVERY = Range(1, MAX_ROUNDS, integer=True)
"""Every k rounds; a count of validations (patience)."""
LR = Range(0, MAX_LR, lo_open=True)
"""A learning rate."""
CLIP_NORM = Range(0, 1e6, note="0: off")
"""Gradient-norm clipping."""
SERVER_MOMENTUM = Range(0, 1, hi_open=True, note="0: plain FedAvg")
"""Flower's FedAvgM server momentum."""
ACCURACY_POINTS = Range(0, 100, hi_open=True, note="accuracy points")
"""A difference of accuracies in percentage points."""
SEED = Range(0, MAX_SEED, integer=True)
"""A random seed."""
FRACTION_TRAIN = Range(0, 1, lo_open=True, note="share of the nodes that may train")
"""Flower's ``fraction_train``, for rounds that must train (0 would skip them)."""
MIN_NODES = Range(1, 1_000_000, integer=True)
"""Flower's ``min_train_nodes`` / ``min_available_nodes`` for rounds that must train."""

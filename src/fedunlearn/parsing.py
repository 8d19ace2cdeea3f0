"""Strict checks for values that arrive over the wire (requests, replies, inbox files).

Everything a node sends is untrusted: a value is accepted only with its exact type (no
``float -> int``, ``bool -> int`` or ``str -> list`` conversion), finite, within bounds,
without duplicates where it is a set of ids, and bounded in size. A rejected value
raises :class:`WireError`, whose message names the field, the value (shortened) and
what is allowed, e.g.::

    partition-id=inf (float): expected an integer in 0..9
    sample-ids=[12, 12, 12, ... (1000000 items)] (list): expected at most 100000 distinct ids

Nothing here converts silently; callers get plain Python values back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

MAX_SHOWN = 60
"""Characters of a rejected value shown in a message."""


class WireError(ValueError):
    """A field of a record that is not what the protocol allows.

    Attributes
    ----------
    field : str
        The field's name (``partition-id``, ``metrics.retain-total``, ...).
    value : object
        The offending value (as received).
    allowed : str
        What the field may hold.
    """

    def __init__(self, field: str, value: Any, allowed: str, prefix: str = "") -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(prefix + self.describe())

    def describe(self) -> str:
        return f"{self.field}={shorten(self.value)} ({type(self.value).__name__}): {self.allowed}"

    def with_prefix(self, prefix: str) -> WireError:
        """The same error, its message starting with ``prefix`` (e.g. the record kind)."""
        err = WireError.__new__(type(self))
        err.field, err.value, err.allowed = self.field, self.value, self.allowed
        ValueError.__init__(err, prefix + self.describe())
        return err


class MissingField(WireError):
    """A required field is absent."""

    def __init__(self, field: str, allowed: str, prefix: str = "") -> None:
        self.field, self.value, self.allowed = field, None, allowed
        ValueError.__init__(self, prefix + self.describe())

    def describe(self) -> str:
        return f"{self.field} is missing: {self.allowed}"


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters; long sequences show their
    first items and their length."""
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        shown: list[str] = []
        used = 0
        for item in value:
            text = shorten(item, limit)
            if used + len(text) > limit:
                break
            shown.append(text)
            used += len(text) + 2
        if len(shown) < len(value):
            shown.append(f"... ({len(value)} items)")
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        return open_ + ", ".join(shown) + close
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _range_text(lo: int | float | None, hi: int | float | None) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def exact_int(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An ``int`` (not a bool, not a float, not a string) within ``lo..hi``."""
    allowed = "expected an integer" + _range_text(lo, hi)
    if not _is_int(value):
        raise WireError(field, value, allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise WireError(field, value, allowed)
    return int(value)


def finite_number(field: str, value: Any, lo: float | None = None,
                  hi: float | None = None) -> float:
    """A finite ``int`` or ``float`` (not a bool, NaN or infinity) within ``lo..hi``."""
    allowed = "expected a finite number" + _range_text(lo, hi)
    if not _is_number(value):
        raise WireError(field, value, allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise WireError(field, value, allowed)
    return float(value)


def text(field: str, value: Any, max_len: int, choices: Sequence[str] | None = None,
         pattern: str | None = None) -> str:
    """A ``str`` of at most ``max_len`` characters, one of ``choices`` or matching
    ``pattern`` when given."""
    if choices is not None:
        allowed = "expected one of " + ", ".join(choices)
    elif pattern is not None:
        allowed = f"expected a string matching {pattern} (at most {max_len} characters)"
    else:
        allowed = f"expected a string of at most {max_len} characters"
    if not isinstance(value, str) or len(value) > max_len:
        raise WireError(field, value, allowed)
    if choices is not None and value not in choices:
        raise WireError(field, value, allowed)
    if pattern is not None and not re.fullmatch(pattern, value):
        raise WireError(field, value, allowed)
    return value


def int_list(field: str, value: Any, max_len: int, lo: int | None = None,
             hi: int | None = None, allow_scalar: bool = True,
             show_range: bool = True) -> tuple[int, ...]:
    """A list of distinct ints within ``lo..hi``, at most ``max_len`` long.

    A single int stands for a list of one when ``allow_scalar`` (a Flower ConfigRecord
    holds ``3`` for a node-config ``forget-classes=3``). A string is never split into
    characters, and neither floats nor bools count as ints."""
    what = "integers" + (_range_text(lo, hi) if show_range else "")
    allowed = f"expected a list of at most {max_len} distinct {what}"
    if allow_scalar and _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise WireError(field, value, allowed)
    if len(value) > max_len:
        raise WireError(field, value, allowed)
    out: list[int] = []
    for item in value:
        if not _is_int(item):
            raise WireError(field, value, f"{allowed}; {shorten(item)} "
                                          f"({type(item).__name__}) is not an integer")
        if (lo is not None and item < lo) or (hi is not None and item > hi):
            raise WireError(field, value, f"{allowed}; {item} is out of range")
        out.append(int(item))
    if len(set(out)) != len(out):
        seen: set[int] = set()
        dup = next(i for i in out if i in seen or seen.add(i))
        raise WireError(field, value, f"{allowed}; {dup} is repeated")
    return tuple(out)


def str_list(field: str, value: Any, max_len: int, max_chars: int,
             pattern: str) -> tuple[str, ...]:
    """A list of distinct strings matching ``pattern``, at most ``max_len`` long."""
    allowed = (f"expected a list of at most {max_len} distinct strings matching {pattern} "
               f"(each at most {max_chars} characters)")
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise WireError(field, value, allowed)
    out = []
    for item in value:
        if (not isinstance(item, str) or len(item) > max_chars
                or not re.fullmatch(pattern, item)):
            raise WireError(field, value, f"{allowed}; {shorten(item)} is not")
        out.append(item)
    if len(set(out)) != len(out):
        raise WireError(field, value, f"{allowed}; an entry is repeated")
    return tuple(out)


def number_list(field: str, value: Any, max_len: int) -> list[float]:
    """A list of finite numbers (no NaN, no infinity, no bools), at most ``max_len``."""
    allowed = f"expected a list of at most {max_len} finite numbers"
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise WireError(field, value, allowed)
    for item in value:
        if not _is_number(item):
            raise WireError(field, value, f"{allowed}; {shorten(item)} is not")
    return [float(v) for v in value]


def only_fields(record: Mapping, allowed: Sequence[str], what: str) -> None:
    """Reject a record that has a field outside ``allowed``."""
    unknown = sorted(str(k) for k in record if k not in allowed)
    if unknown:
        raise WireError(f"{what}.{unknown[0]}", record[unknown[0]],
                        f"unknown field; {what} allows {', '.join(allowed)}")


def require(record: Mapping, field: str, allowed: str) -> Any:
    """``record[field]``, or :class:`MissingField` naming what it should hold."""
    if field not in record:
        raise MissingField(field, allowed)
    return record[field]


def parse_int_list(value: Any, key: str) -> tuple[int, ...]:
    """Parse ``"0,3, 5"`` (or an int) into a tuple of ints; ``""`` gives ``()``."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected comma-separated integers")
    if isinstance(value, int):
        return (value,)
    text = str(value).strip()
    if not text:
        return ()
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(
                f"{key}={value!r}: {part!r} is not an integer; expected comma-separated "
                "integers such as '0,3'"
            ) from None
    return tuple(out)


def loads_json(data: str | bytes):
    """``json.loads`` whose every failure is a ``ValueError`` naming it: a document nested
    too deeply for the parser (a few KB of ``[[[[...]]]]``) included, which Python's
    parser reports as ``RecursionError``."""
    import json

    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None

"""The server's own evaluation of a model: the ``evaluate_fn`` a user gives
:func:`fedunlearn.serve` and :class:`fedunlearn.UnlearningService`.

Two forms are accepted, told apart by the number of required positional arguments:

* **Flower's** ``evaluate_fn(server_round, arrays) -> MetricRecord | None``: the very
  function given to ``FedAvg.start(evaluate_fn=...)``. The test accuracy is the record's
  ``test_metric`` entry (default ``"accuracy"``), a **fraction** in [0, 1] as Flower's
  quickstart returns it (``correct / total``); it is reported in % (x 100). Its other
  entries (``loss``, ...) are not reported.
* **fedunlearn's** ``evaluate_fn(arrays) -> dict | float``, accuracy already in %: a
  number is the test accuracy; a dict's numeric entries are reported as they are
  (``{"test": 97.2}``).

``server_round``: :func:`~fedunlearn.serve` passes the rounds the method ran (its
unlearning step and recovery: ``MethodOutcome.rounds``), service mode the round at which
it publishes the version.

The test accuracy is then **not measured**, and the reason kept, when the function
raises, returns ``None``, has no ``test_metric`` entry, or returns a value that is not a
number (or, for Flower's form, not a fraction): the unlearned model is still written and
its requests still get their verdict.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ArrayRecord
from .logs import log

FLOWER_FORM = "evaluate_fn(server_round, arrays) -> MetricRecord | None"
PERCENT_FORM = "evaluate_fn(arrays) -> dict | float (accuracy in %)"
DEFAULT_TEST_METRIC = "accuracy"
TEST = "test"


def _required_positional(fn: Callable) -> tuple[int, inspect.Signature]:
    """How many positional arguments ``fn`` requires, and its signature (``TypeError``
    when the signature cannot be read or it requires keyword-only arguments)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate_fn={fn!r}: its signature cannot be read; wrap it in a "
                        f"def taking (server_round, arrays) or (arrays)") from None
    params = list(sig.parameters.values())
    keyword_only = [p.name for p in params
                    if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise TypeError(f"evaluate_fn{sig} requires keyword-only argument(s) {keyword_only}; "
                        f"expected Flower's {FLOWER_FORM} or {PERCENT_FORM}")
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is p.empty), sig


@dataclass(frozen=True)
class ServerEvaluation:
    """A checked ``evaluate_fn`` (see the module docstring): :meth:`of` builds it,
    :meth:`measure` runs it."""

    fn: Callable
    flower: bool
    test_metric: str = DEFAULT_TEST_METRIC

    @classmethod
    def of(cls, evaluate_fn: Callable | None,
           test_metric: str | None = None) -> ServerEvaluation | None:
        """``evaluate_fn`` checked (``None``: no server-side evaluation). ``test_metric``
        names the accuracy entry of Flower's ``MetricRecord`` (default ``"accuracy"``)."""
        if test_metric is not None and (not isinstance(test_metric, str) or not test_metric):
            raise ValueError(f"test_metric={test_metric!r}: expected the name of the "
                             "MetricRecord entry holding the test accuracy, e.g. 'accuracy'")
        if evaluate_fn is None:
            if test_metric is not None:
                raise ValueError(f"test_metric={test_metric!r} without an evaluate_fn: it "
                                 "names an entry of what evaluate_fn returns")
            return None
        if not callable(evaluate_fn):
            raise TypeError(f"evaluate_fn={evaluate_fn!r} is not callable; expected Flower's "
                            f"{FLOWER_FORM} or {PERCENT_FORM}")
        required, sig = _required_positional(evaluate_fn)
        if required not in (1, 2):
            raise TypeError(
                f"evaluate_fn{sig} requires {required} positional argument(s); expected "
                f"Flower's {FLOWER_FORM} (the function given to FedAvg.start) or "
                f"{PERCENT_FORM}")
        if required == 1 and test_metric is not None:
            raise ValueError(
                f"test_metric={test_metric!r} names an entry of the MetricRecord that "
                f"Flower's {FLOWER_FORM} returns; this evaluate_fn{sig} has the form "
                f"{PERCENT_FORM}, whose dict entries are reported as they are")
        return cls(evaluate_fn, required == 2, test_metric or DEFAULT_TEST_METRIC)

    def measure(self, server_round: int, arrays: ArrayRecord) -> tuple[dict, str]:
        """``(metrics, problem)``: the metrics in % (``{"test": ...}`` for Flower's form)
        and ``""``, or ``({}, why the test accuracy was not measured)``. Never raises
        for what the user's function does."""
        try:
            value = self.fn(int(server_round), arrays) if self.flower else self.fn(arrays)
        except Exception as err:  # the user's code: reported, the run goes on
            log(WARNING, "evaluate_fn raised; the test accuracy is not measured",
                exc_info=True)
            return {}, f"evaluate_fn raised {type(err).__name__}: {str(err)[:300]}"
        metrics, problem = (self._flower(value) if self.flower else self._percent(value))
        if problem:
            log(WARNING, "the test accuracy is not measured: %s", problem)
        return metrics, problem

    def _flower(self, value) -> tuple[dict, str]:
        if value is None:
            return {}, "evaluate_fn returned None"
        if not isinstance(value, Mapping):
            return {}, (f"evaluate_fn returned {type(value).__name__}; Flower's form returns "
                        "a MetricRecord or None")
        if self.test_metric not in value:
            return {}, (f"evaluate_fn's MetricRecord has no {self.test_metric!r} entry (it "
                        f"has {sorted(value)}): name the accuracy entry with "
                        "test_metric=...")
        fraction = value[self.test_metric]
        if not _number(fraction) or not 0.0 <= fraction <= 1.0:
            return {}, (f"evaluate_fn's {self.test_metric}={fraction!r} is not a fraction "
                        "in [0, 1] (Flower's convention: correct / total); it is reported "
                        "in % once, as 100 x the fraction")
        return {TEST: 100.0 * float(fraction)}, ""

    @staticmethod
    def _percent(value) -> tuple[dict, str]:
        if _number(value):
            return {TEST: float(value)}, ""
        if isinstance(value, Mapping):
            bad = sorted(str(k) for k, v in value.items() if not _number(v))
            if not bad:
                return {str(k): float(v) for k, v in value.items()}, ""
            return {}, f"evaluate_fn's entries {bad} are not finite numbers"
        return {}, (f"evaluate_fn returned {type(value).__name__}; the form "
                    f"{PERCENT_FORM} returns a number or a dict of numbers")


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


__all__ = ["DEFAULT_TEST_METRIC", "FLOWER_FORM", "PERCENT_FORM", "ServerEvaluation"]

"""When :func:`fedunlearn.serve` must say that something went wrong.

``serve()`` never lets a failure read as success:

* **no node answered** the unlearning query (every reply an error, a timeout or a
  malformed report): :class:`ServeError` names each node and its reason
  (:func:`query_failures`), so "0 rejected" never reads as "nobody asked";
* **no method honoured** the accepted requests (each refused, failed or degraded):
  :class:`ServeError` names each method, its status and reason (:func:`no_method_error`),
  after every record (``failed.json``, the audit log, the receipts) was written;
* a **target that could not measure** the unlearned model: the method is honoured, and
  the outcome, ``results.json``, the audit records and the receipts say what was not
  measured (``unmeasured``: ``{"forget": "node 12: <reason>", ...}``);
* a **recovery that diverged** (:class:`DivergenceCheck`): the unlearned model holds
  non-finite values, or its test accuracy (``evaluate_fn``) or the targets' retained
  accuracy fell more than ``max_drop`` points (default :data:`MAX_ACCURACY_DROP`) below
  the input model's *to the level of guessing* (at most twice chance, ``200 /
  num_classes`` %): the method is ``degraded``, its model is saved for inspection but
  never handed on as ``ServeOutcome.arrays``, and its requests stay pending (a ``failed``
  receipt saying so) unless another method honours them. A model that fell as far but
  is still well above chance (a recovery that is learning, with too few rounds) stays
  honoured, with a warning in the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord

from .arrays import to_numpy
from .parsing import WireError
from .replies import parse_node_report

MAX_ACCURACY_DROP = 20.0
"""Default of ``serve(max_accuracy_drop=)``: how many accuracy points (%) the unlearned
model's test accuracy (or a target's retained accuracy) may fall below the input
model's, to the level of guessing, before the method counts as degraded. Forgetting a
whole class everywhere lowers test accuracy by up to ``100 / num_classes`` points by
design: with two or three classes, raise it (or pass ``None`` to keep only the NaN/inf
check)."""


class ServeError(RuntimeError):
    """:func:`fedunlearn.serve` could not unlearn: no node answered its query, or no
    method honoured the accepted requests. Everything was recorded before it was raised
    (``failed.json``, the audit log, the receipts); ``outcome`` is the
    :class:`~fedunlearn.ServeOutcome` so far (``outcome.arrays`` is the input model,
    ``outcome.methods`` each method's outcome, ``outcome.report`` the requests and the
    nodes that did not answer). Raised out of ``@app.main()``, it ends the ServerApp
    with an error (Flower's exit code 201, run status ``finished:failed``)."""

    def __init__(self, message: str, outcome) -> None:
        super().__init__(message)
        self.outcome = outcome

    @property
    def report(self) -> dict:
        return self.outcome.report


def query_failures(replies, reports: Mapping[int, dict]) -> dict[int, str]:
    """node id -> why its ``query.unlearn`` reply says nothing usable (an error reply,
    e.g. its handler raised or no reply within the timeout, or a report that does not
    parse); nodes in ``reports`` answered."""
    out: dict[int, str] = {}
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if node in reports:
            continue
        if msg.has_error():
            out[node] = msg.error.reason or f"error code {msg.error.code}"
            continue
        try:
            parse_node_report(msg.content)
        except WireError as err:
            out[node] = f"malformed node report: {err}"
    return out


def no_answer_error(asked: list[int], failures: Mapping[int, str]) -> str:
    """The message of the :class:`ServeError` raised when no node answered."""
    reasons = "; ".join(f"node {n}: {failures.get(n, 'no reply')}" for n in sorted(asked))
    return (f"serve(): none of the {len(asked)} node(s) could answer the unlearning "
            f"query, so no request could be collected ({reasons})")


def no_request_line(answered: int, rejected: int, failures: Mapping[int, str]) -> str:
    """The log line of a job without a valid request, saying whether anybody filed
    one and who did not answer."""
    line = (f"{answered} node(s) answered, none filed a request" if not rejected else
            f"{answered} node(s) answered; {rejected} request(s) rejected, none accepted")
    if failures:
        line += (f"; {len(failures)} node(s) did not answer: "
                 + "; ".join(f"node {n}: {r}" for n, r in sorted(failures.items())))
    return f"fedunlearn.serve: no valid unlearning request ({line}); the model is unchanged"


def no_method_error(outcomes: Mapping) -> str | None:
    """The message of the :class:`ServeError` raised when accepted requests were
    honoured by no method (``None``: one honoured them)."""
    if any(o.status == "honoured" for o in outcomes.values()):
        return None
    each = "; ".join(f"{name} {o.status}: {o.reason}" for name, o in outcomes.items())
    return (f"serve(): no method honoured the accepted request(s); the model is "
            f"unchanged and the requests stay pending ({each})")


def unmeasured_note(unmeasured: Mapping[str, str]) -> str:
    """``unmeasured`` as one line (the receipts' ``unmeasured`` field)."""
    return "; ".join(f"{part} accuracy not measured ({why})"
                     for part, why in sorted(unmeasured.items()))


@dataclass
class DivergenceCheck:
    """Whether an unlearned model is degraded, against the input model's accuracy.

    ``baseline``: the input model's ``test`` (the server's ``evaluate_fn``) and
    ``retain`` (the targets' retained data) accuracy in %, each where measured;
    ``max_drop``: the points either may fall (``None``: only non-finite values count);
    ``num_classes``: the label set's size the nodes report (chance is ``100 /
    num_classes`` %; unknown: any fall of more than ``max_drop`` counts).
    """

    baseline: dict = field(default_factory=dict)
    max_drop: float | None = MAX_ACCURACY_DROP
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or not isinstance(
                self.max_drop, (int, float)) or not 0 <= self.max_drop <= 100):
            raise ValueError(f"max_accuracy_drop={self.max_drop!r}: expected accuracy "
                             "points in [0, 100], or None to turn the check off")

    @property
    def guessing(self) -> float:
        """The accuracy (%) at or below which a model is no better than guessing: twice
        chance (100 % when the label set is unknown or has two classes)."""
        return min(100.0, 200.0 / self.num_classes) if self.num_classes else 100.0

    def degradation(self, arrays: ArrayRecord, metrics: Mapping[str, float]) -> str | None:
        """Why ``arrays`` (with ``metrics``, accuracy in %) is degraded; ``None`` if not."""
        bad = [k for k, a in arrays.items() if not _finite(to_numpy(a, writable=False))]
        if bad:
            return (f"the unlearned model holds non-finite values (NaN/inf) in {bad[:3]}: "
                    "the recovery diverged; lower Recovery(lr=...)")
        chance = f" (chance {100.0 / self.num_classes:.0f}%)" if self.num_classes else ""
        for _, what, now, before in self.drops(metrics):
            if now <= self.guessing:
                return (f"{what} {now:.2f}% is more than {self.max_drop:g} points below the "
                        f"input model's {before:.2f}%, down to guessing{chance}: the "
                        "recovery diverged or never took hold; lower Recovery(lr=...) or "
                        "give it more rounds")
        return None

    def shortfall(self, metrics: Mapping[str, float]) -> str | None:
        """A warning for a model that fell more than ``max_drop`` points but is still
        above guessing (not degraded); ``None`` if none fell that far."""
        drops = self.drops(metrics)
        if not drops:
            return None
        return "; ".join(f"{what} {now:.2f}% is more than {self.max_drop:g} points below the "
                         f"input model's {before:.2f}%" for _, what, now, before in drops) + (
            ": the recovery may need more rounds (not degraded: above guessing)")

    def drops(self, metrics: Mapping[str, float]) -> list[tuple[str, str, float, float]]:
        """``(key, what, now, before)`` for each accuracy more than ``max_drop`` points
        below the input model's (degraded or not)."""
        if self.max_drop is None:
            return []
        out = []
        for key, what in (("test", "test accuracy"), ("retain", "the targets' retained "
                                                               "accuracy")):
            now, before = metrics.get(key), self.baseline.get(key)
            if _number(now) and _number(before) and now < before - self.max_drop:
                out.append((key, what, float(now), float(before)))
        return out


def _finite(values) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

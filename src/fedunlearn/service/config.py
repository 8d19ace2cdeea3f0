"""Service mode's settings (:class:`ServiceConfig`) and its error."""

from __future__ import annotations

import math
from dataclasses import dataclass

DAY_S = 86_400.0


class ServiceError(RuntimeError):
    """The service cannot go on (too few nodes, a checkpoint of another federation)."""


@dataclass(frozen=True)
class ServiceConfig:
    """How the service trains and serves.

    Parameters
    ----------
    rounds : int
        Round budget: training rounds of the federation, counted across restarts (a
        resumed service goes on to the same total). 0: no round budget (then
        ``wall_s`` or ``stop`` must end it).
    wall_s : float
        Wall-clock budget of this process in seconds (0: none).
    query_every : int
        Ask the nodes for pending requests every N rounds (and before the first).
    lr, local_epochs, server_momentum : float, int, float
        The continued training: each node's local SGD, and FedAvgM's server momentum
        (0: plain FedAvg). The momentum is part of the checkpoint.
    min_replies : float
        A round counts when at least this many nodes reply usably (>= 1: a count;
        between 0 and 1: a share of the nodes asked, rounded up); else it is retried.
    round_retries : int
        How often a round without enough replies is retried before the service stops
        (its checkpoint stays at the last round that counted).
    validate_every : int
        Federated validation accuracy on the retained data every N rounds (0: never).
    deadline_rounds : int
        Rounds from acceptance within which a request must be honoured (0: none;
        useful in simulation).
    deadline_days : float
        Days from acceptance within which a request must be honoured (0: none).
    warn_at : float
        Share of a deadline after which a still pending request is warned about, in
        the log and the audit log (``request.deadline_near``).
    method_retries : int
        How often an unlearning step that failed (e.g. its target cannot be reached) is
        tried again before its requests fail, with the reason in the audit log and on
        the receipts.
    retry_after : int
        Training rounds between two tries of a failed unlearning step.
    publish_every : int
        Also publish the trained model as a version every N rounds (0: only at the
        start, after each unlearning step and at the end).
    seed : int
        Seeds the nodes' shuffles (per round).
    """

    rounds: int = 100
    wall_s: float = 0.0
    query_every: int = 1
    lr: float = 0.05
    local_epochs: int = 1
    server_momentum: float = 0.0
    min_replies: float = 1
    round_retries: int = 2
    validate_every: int = 0
    deadline_rounds: int = 0
    deadline_days: float = 30.0
    warn_at: float = 0.8
    method_retries: int = 2
    retry_after: int = 1
    publish_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "round_retries", "validate_every", "deadline_rounds",
                     "method_retries", "publish_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{_key(name)}={value!r}: expected an integer >= 0")
        for name in ("query_every", "local_epochs", "retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_key(name)}={value!r}: expected an integer >= 1")
        for name, lo, hi in (("wall_s", 0.0, None), ("server_momentum", 0.0, 1.0),
                             ("deadline_days", 0.0, None), ("warn_at", 0.0, 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < lo or (hi is not None and value > hi)):
                allowed = f"a number in [{lo}, {hi}]" if hi is not None else f"a number >= {lo}"
                raise ValueError(f"{_key(name)}={value!r}: expected {allowed}")
        for name in ("lr", "min_replies"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{_key(name)}={value!r}: expected a number > 0" + (
                    " (a count of replies, 1, 2, ..., or a share of the nodes asked, "
                    "in (0, 1))" if name == "min_replies" else ""))
        if self.min_replies > 1 and self.min_replies != int(self.min_replies):
            raise ValueError(f"{_key('min_replies')}={self.min_replies!r}: expected a count "
                             "(1, 2, ...) or a share of the nodes asked, in (0, 1)")

    def required(self, asked: int) -> int:
        """How many usable replies a round of ``asked`` nodes needs to count."""
        if self.min_replies < 1:
            return max(1, math.ceil(self.min_replies * asked)) if asked else 0
        return min(int(self.min_replies), asked) if asked else 0



def _key(name: str) -> str:
    """A ServiceConfig field as the error names it: the field and its run-config key."""
    return f"ServiceConfig {name} (run-config service.{name.replace('_', '-')})"

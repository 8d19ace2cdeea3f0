"""Service mode's settings (:class:`ServiceConfig`) and its error."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..ranges import (
    EPOCHS,
    LR,
    SEED,
    SERVER_MOMENTUM,
    CountOrShare,
    Range,
    check_fields,
)

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

    #: Each field's allowed values; the fields set from run-config keys share them
    #: with those keys (``service.*``, ``pretrain.lr``, ``federation.local-epochs``, ``seed``).
    RANGES: ClassVar[dict[str, Range]] = {
        "rounds": Range(0, integer=True, note="0: no round budget"),
        "wall_s": Range(0, note="0: none"),
        "query_every": Range(1, integer=True),
        "lr": LR,
        "local_epochs": EPOCHS,
        "server_momentum": SERVER_MOMENTUM,
        "min_replies": CountOrShare(0, lo_open=True, note="a count of replies, 1, 2, ..., "
                                    "or a share of the nodes asked, in (0, 1)"),
        "round_retries": Range(0, integer=True),
        "validate_every": Range(0, integer=True, note="0: never"),
        "deadline_rounds": Range(0, integer=True, note="0: none"),
        "deadline_days": Range(0, note="0: none"),
        "warn_at": Range(0, 1),
        "method_retries": Range(0, integer=True),
        "retry_after": Range(1, integer=True),
        "publish_every": Range(0, integer=True),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        check_fields(self, self.RANGES, field_label)

    def required(self, asked: int) -> int:
        """How many usable replies a round of ``asked`` nodes needs to count."""
        if self.min_replies < 1:
            return max(1, math.ceil(self.min_replies * asked)) if asked else 0
        return min(int(self.min_replies), asked) if asked else 0



#: The run-config key of each ServiceConfig field that has one (the experiment harness's
#: key table refers to the same ranges; tests/test_keys.py checks that the two agree).
RUN_CONFIG_KEYS = {
    **{name: f"service.{name.replace('_', '-')}" for name in (
        "rounds", "wall_s", "query_every", "min_replies", "round_retries", "validate_every",
        "deadline_rounds", "deadline_days", "method_retries", "retry_after")},
    "lr": "pretrain.lr", "local_epochs": "federation.local-epochs", "seed": "seed",
}


def field_label(name: str) -> str:
    """A ServiceConfig field as an error names it: the field and its run-config key."""
    key = RUN_CONFIG_KEYS.get(name)
    return f"ServiceConfig {name}" + (f" (run-config {key})" if key else "")

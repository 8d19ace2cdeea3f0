"""What the server knows when unlearning starts (:class:`UnlearningContext`), and the
error of a method that could not finish."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, MetricRecord

from ..requests import UnlearningRequest


class UnlearningFailed(RuntimeError):
    """A method could not finish: no model is returned, and the reason says why (which
    node, which key, which round)."""


@dataclass
class UnlearningContext:
    """What the server knows when unlearning starts.

    ``requests`` maps node id -> accepted request; ``node_partitions`` is the verified
    node id -> partition map; ``model_factory()`` builds a fresh, randomly initialised
    model; ``progress(phase, round, arrays, num_rounds)`` logs test accuracy and returns
    a ``MetricRecord`` (or ``None``).
    """

    requests: dict[int, UnlearningRequest] = field(default_factory=dict)
    fully_forgotten: set[int] = field(default_factory=set)
    node_partitions: dict[int, int] = field(default_factory=dict)
    model_factory: Callable | None = None
    example_input: object = None
    flops_per_sample: int = 0
    forward_flops_per_sample: int = 0
    progress: Callable[[str, int, ArrayRecord, int], MetricRecord | None] | None = None
    #: ``on_round(phase, round, num_rounds)`` after every training round that
    #: ``progress`` did not measure (e.g. to drive a progress display).
    on_round: Callable[[str, int, int], None] | None = None
    #: Call ``progress`` on the model a phase starts from (round 0) and after every round,
    #: not only every ``eval_every`` rounds (per-round trajectories).
    trajectory: bool = False
    original_arrays: ArrayRecord | None = None
    info: dict = field(default_factory=dict)
    #: The training history recorded during pretraining (:mod:`fedunlearn.history`), when
    #: a method of the job needs one.
    history: object = None
    #: The federation's data as the server holds it (``server_indices``: its own share).
    data: object = None
    #: Requests honoured earlier in the same federation (service mode): they still shape
    #: who trains on what (a client-wise one excludes its node, a class- or instance-wise
    #: one keeps its node on its retained data), but their nodes are not this step's
    #: targets.
    served: dict[int, UnlearningRequest] = field(default_factory=dict)
    #: Nodes whose served requests cover all of their training data.
    served_fully: set[int] = field(default_factory=set)

    #: Whether the run that built this context supplies what methods need by itself
    #: (the experiment harness records the training history while it pretrains and
    #: reserves the server's data): methods then leave those checks to it.
    managed: bool = False


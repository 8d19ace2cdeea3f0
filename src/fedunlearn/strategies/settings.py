"""The settings of an unlearning method's rounds: :class:`Recovery` (after the
unlearning step), :class:`Training` (how the original model was trained) and
:class:`Phase` (one stretch of rounds with its own settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flwr.app import ConfigRecord

from .. import protocol as P
from ..protocol import DEFAULT_ACTION
from ..ranges import (ACCURACY_POINTS, CLIP_NORM, EPOCHS, EVERY, FRACTION_TRAIN, LR,
                      MIN_NODES, ROUNDS, SERVER_MOMENTUM, Range, check_fields)
from ..parsing import exact_int

ROLES = ("retained", "targets", "all")
STOP_RULES = ("fixed", "validation")


@dataclass(frozen=True)
class NodeSelection:
    """Which of the nodes that may train in a round train: Flower ``FedAvg``'s
    ``fraction_train``, ``min_train_nodes`` and ``min_available_nodes``, counted over the
    nodes the method lets train (see :class:`Recovery`). The default takes them all."""

    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1

    @property
    def everyone(self) -> bool:
        """Whether every node that may train does (the default)."""
        return self == NodeSelection()


@dataclass(frozen=True)
class Recovery:
    """How every method but Retrain recovers after its unlearning step: FedAvgM rounds
    on the retained data.

    Parameters
    ----------
    rounds : int
        Recovery rounds (the maximum when ``stop="validation"``).
    lr, local_epochs, clip_norm : float, int, float
        The nodes' local training (``clip_norm`` 0: no gradient clipping).
    server_momentum : float
        Flower's ``FedAvgM`` server momentum (0: plain FedAvg), server learning rate 1.
    stop : str
        ``"fixed"``: always ``rounds`` rounds; ``"validation"``: stop once the retained
        nodes' validation accuracy is within ``target_gap`` points of the original
        model's, or after ``patience`` validations without a ``min_delta`` improvement.
    validate_every : int
        Validate every k rounds (``stop="validation"``).
    fraction_train, min_train_nodes, min_available_nodes : float, int, int
        Flower ``FedAvg``'s node selection, over the nodes that may train in a recovery
        round (client-wise targets never may): ``max(int(n * fraction_train),
        min_train_nodes)`` of the ``n`` nodes are drawn each round, uniformly without
        replacement, from the method's seed and the round number (a run repeats); fewer
        than ``max(min_available_nodes, that count)`` nodes that may train fail the
        method by name. Defaults 1.0, 1, 1: every node trains (FedAvg's minimum of 2
        would refuse a recovery that one node is left to run). With ``aggregation=`` (a
        Flower strategy of your own), that strategy selects the nodes: give these to it.
    """

    rounds: int = 11
    lr: float = 0.01
    local_epochs: int = 1
    clip_norm: float = 0.0
    server_momentum: float = 0.5
    stop: str = "fixed"
    validate_every: int = 1
    target_gap: float = 1.0
    patience: int = 3
    min_delta: float = 0.1
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1

    #: Each numeric field's allowed values (shared with the run-config's ``unlearn.*``).
    RANGES: ClassVar[dict[str, Range]] = {
        "rounds": ROUNDS, "lr": LR, "local_epochs": EPOCHS, "clip_norm": CLIP_NORM,
        "server_momentum": SERVER_MOMENTUM, "validate_every": EVERY,
        "target_gap": ACCURACY_POINTS, "patience": EVERY, "min_delta": ACCURACY_POINTS}
    #: Flower's node selection: a plugin setting, with no run-config key (the harness's
    #: simulations train every node that may).
    SELECTION_RANGES: ClassVar[dict[str, Range]] = {
        "fraction_train": FRACTION_TRAIN, "min_train_nodes": MIN_NODES,
        "min_available_nodes": MIN_NODES}

    def __post_init__(self) -> None:
        check_fields(self, self.RANGES | self.SELECTION_RANGES, lambda name: f"Recovery.{name}")
        if self.stop not in STOP_RULES:
            raise ValueError(f"Recovery.stop={self.stop!r}; allowed: {', '.join(STOP_RULES)}")

    @property
    def selection(self) -> NodeSelection:
        """The recovery rounds' node selection."""
        return NodeSelection(self.fraction_train, self.min_train_nodes,
                             self.min_available_nodes)


@dataclass(frozen=True)
class Training:
    """How the original model was trained: Retrain repeats it on the retained data,
    FedEraser calibrates and MoDE degrades with its local settings."""

    rounds: int = 30
    lr: float = 0.01
    local_epochs: int = 1

    #: Each field's allowed values (shared with the run-config's ``pretrain.*`` and
    #: ``federation.local-epochs``).
    RANGES: ClassVar[dict[str, Range]] = {"rounds": ROUNDS, "lr": LR, "local_epochs": EPOCHS}

    def __post_init__(self) -> None:
        check_fields(self, self.RANGES, lambda name: f"Training.{name}")


def _check_int(name: str, value, lo: int) -> None:
    exact_int(name, value, lo=lo)


@dataclass(frozen=True)
class Phase:
    """A stretch of rounds with its own settings.

    ``name`` keys the cost breakdown; ``action`` is the client action nodes run
    (``default``: local training); ``role`` says which nodes take part (:data:`ROLES`).
    """

    name: str
    rounds: int
    lr: float
    local_epochs: int
    clip_norm: float = 0.0
    weight_decay: float = 0.0
    action: str = DEFAULT_ACTION
    role: str = "retained"
    server_momentum: float = 0.0
    stop_early: bool = False
    selection: NodeSelection = NodeSelection()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"phase role {self.role!r}; allowed: {ROLES}")
        SERVER_MOMENTUM.check("phase server_momentum", self.server_momentum)

    def config(self) -> ConfigRecord:
        return ConfigRecord({P.LR: float(self.lr), P.LOCAL_EPOCHS: int(self.local_epochs),
                             P.CLIP_NORM: float(self.clip_norm),
                             P.WEIGHT_DECAY: float(self.weight_decay), P.PHASE: self.name})


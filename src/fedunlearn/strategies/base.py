"""The base of every fedunlearn method: FedAvg that knows about unlearning requests.

:class:`UnlearningStrategy` extends Flower's message-based ``FedAvg`` with

* per-node training configs: a node with an accepted class- or instance-wise request
  gets its request echoed back and trains on its retained data only; a node whose
  whole data is to be forgotten (client-wise) is not sampled at all;
* cost accounting (:class:`CostMeter`): rounds, the real size of every ArrayRecord sent
  to and returned by clients, FLOPs of the local training reported by the clients;
* phase hooks a method overrides: :meth:`initial_arrays` (where unlearning starts,
  e.g. negated weights), :meth:`num_rounds`, :meth:`learning_rate`, and
  :meth:`unlearn`, which runs the whole procedure and returns the unlearned model.

Adding a method means one subclass overriding the hooks it changes, registered with
:func:`fedunlearn.strategies.register_method`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..client import request_to_config
from ..config import ExperimentConfig
from ..metrics import arrayrecord_nbytes
from ..requests import UnlearningRequest


@dataclass
class CostMeter:
    """What a phase cost: rounds, bytes both ways, FLOPs, wall time, extra storage."""

    rounds: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    samples_processed: int = 0
    flops_per_sample: int = 0
    storage_bytes: int = 0
    wall_s: float = 0.0
    extra_flops: int = 0

    @property
    def comm_bytes(self) -> int:
        return self.bytes_down + self.bytes_up

    @property
    def flops(self) -> int:
        return self.samples_processed * self.flops_per_sample + self.extra_flops

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "comm_bytes": self.comm_bytes,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "flops": self.flops, "wall_s": round(self.wall_s, 3),
                "storage_bytes": self.storage_bytes}


@dataclass
class UnlearningContext:
    """What the server knows when unlearning starts.

    ``requests`` maps node id -> accepted request; ``model_factory()`` builds a fresh,
    randomly initialised model; ``progress(phase, round, arrays)`` returns a
    ``MetricRecord`` for the progress log (or ``None``).
    """

    cfg: ExperimentConfig
    requests: dict[int, UnlearningRequest] = field(default_factory=dict)
    fully_forgotten: set[int] = field(default_factory=set)
    node_partitions: dict[int, int] = field(default_factory=dict)
    model_factory: Callable | None = None
    example_input: object = None
    flops_per_sample: int = 0
    progress: Callable[[str, int, ArrayRecord], MetricRecord | None] | None = None
    info: dict = field(default_factory=dict)


class UnlearningStrategy(FedAvg):
    """FedAvg over the nodes that may train, with per-node forget filters and costs.

    Parameters
    ----------
    context : UnlearningContext
        Configuration, accepted requests and helpers.
    phase : str
        Name shown in progress logs (``pretrain``, or the method name).
    """

    name = "fedavg"
    uses_requests = True

    def __init__(self, context: UnlearningContext, phase: str | None = None) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        self.context = context
        self.cfg = context.cfg
        self.phase = phase or self.name
        self.cost = CostMeter(flops_per_sample=context.flops_per_sample)
        self.notes: dict = {}

    # -- hooks a method overrides ---------------------------------------------------
    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        """Where training starts (FT: the pretrained model itself)."""
        return pretrained

    def num_rounds(self) -> int:
        return self.cfg.unlearn_rounds

    def learning_rate(self) -> float:
        return self.cfg.unlearn_lr

    def local_epochs(self) -> int:
        return self.cfg.unlearn_local_epochs

    def clip_norm(self) -> float:
        return self.cfg.unlearn_clip_norm

    def unlearn(self, grid: Grid, pretrained: ArrayRecord) -> ArrayRecord:
        """Run the whole unlearning procedure; return the unlearned model."""
        start = time.perf_counter()
        arrays = self.initial_arrays(pretrained)
        arrays = self.train_rounds(grid, arrays, self.num_rounds())
        self.cost.wall_s = time.perf_counter() - start
        return arrays

    # -- machinery --------------------------------------------------------------------
    def train_rounds(self, grid: Grid, arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """``num_rounds`` FedAvg rounds from ``arrays`` (0 rounds returns ``arrays``)."""
        if num_rounds == 0:
            return arrays
        config = ConfigRecord({"lr": float(self.learning_rate()),
                               "local-epochs": int(self.local_epochs()),
                               "clip-norm": float(self.clip_norm()),
                               "phase": self.phase})
        progress = self.context.progress
        evaluate_fn = None
        if progress is not None:
            def evaluate_fn(server_round: int, current: ArrayRecord):
                if server_round == 0:
                    return None
                if server_round % self.cfg.eval_every and server_round != num_rounds:
                    return None
                return progress(self.phase, server_round, current, num_rounds)
        result = self.start(grid, arrays, num_rounds=num_rounds, train_config=config,
                            evaluate_fn=evaluate_fn)
        return result.arrays if result.arrays is not None else arrays

    def excluded_nodes(self) -> set[int]:
        """Nodes that take no part: client-wise targets, and any node whose request
        covers all of its training data (nothing retained to train on)."""
        if not self.uses_requests:
            return set()
        client_wise = {n for n, r in self.context.requests.items() if r.scope == "client"}
        return client_wise | set(self.context.fully_forgotten)

    def training_nodes(self, grid: Grid) -> list[int]:
        excluded = self.excluded_nodes()
        return sorted(n for n in grid.get_node_ids() if n not in excluded)

    def node_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config for one node: the shared config plus its accepted request."""
        out = ConfigRecord(dict(config))
        request = self.context.requests.get(node_id) if self.uses_requests else None
        if request is not None:
            out.update(request_to_config(request))
        return out

    def summary(self) -> None:
        log(INFO, "\t├──> Method: %s (%d rounds, lr %s)", self.phase, self.num_rounds(),
            self.learning_rate())
        log(INFO, "\t└──> Excluded nodes (client-wise targets): %s",
            sorted(self.excluded_nodes()) or "none")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self.training_nodes(grid)
        config["server-round"] = server_round
        config["seed"] = self.cfg.seed * 100_000 + server_round
        nbytes = arrayrecord_nbytes(arrays)
        messages = []
        for node_id in node_ids:
            content = RecordDict({self.arrayrecord_key: arrays,
                                  self.configrecord_key: self.node_config(node_id, config)})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
        self.cost.bytes_down += nbytes * len(messages)
        self.cost.rounds += 1
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No per-round federated evaluation: the experiment measures the original and
        the unlearned model itself (retain/forget/test/MIA), and progress is central."""
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            self.cost.bytes_up += arrayrecord_nbytes(msg.content[self.arrayrecord_key])
            metrics = msg.content["metrics"]
            self.cost.samples_processed += int(metrics.get("samples-processed", 0))
        return super().aggregate_train(server_round, replies)


class PretrainingProtocol:
    """Mixin: train with the pretraining settings (``pretrain.rounds``, ``pretrain.lr``,
    ``federation.local-epochs``, no clipping). Used by pretraining and by Retrain."""

    cfg: ExperimentConfig

    def num_rounds(self) -> int:
        return self.cfg.pretrain_rounds

    def learning_rate(self) -> float:
        return self.cfg.pretrain_lr

    def local_epochs(self) -> int:
        return self.cfg.local_epochs

    def clip_norm(self) -> float:
        return 0.0

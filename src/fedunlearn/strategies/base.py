"""The base of every fedunlearn method: FedAvg that knows about unlearning requests.

:class:`UnlearningStrategy` extends Flower's message-based ``FedAvg`` with

* **roles**: :meth:`participants` says which nodes take part in a round as ``retained``
  (every node with data left to train on: client-wise targets drop out, class- and
  instance-wise targets filter locally), ``targets`` (nodes with an accepted request) or
  ``all``;
* **per-node messages**: :meth:`message_type` (which client action a node runs,
  ``train.<action>``), :meth:`node_config` (its accepted request echoed back) and
  :meth:`node_content` (the models it gets; more than one is allowed);
* **phases**: :meth:`unlearning_step` (a no-op for FT, negation for NoT, a round at the
  targets for PUF and MoDE) and then :meth:`recovery_phase`, FedAvg rounds with their
  own :class:`Phase` settings;
* **costs** (:class:`CostMeter`, one per phase): the bytes of every ArrayRecord of every
  message and reply, whatever path it takes (Flower's ``start()`` rounds or a direct
  :meth:`exchange`), FLOPs of trained (forward + backward) and forward-only samples,
  server-side extra FLOPs, and storage a method keeps between rounds.

Adding a method means one subclass overriding the hooks it changes, in its own module of
this package (registered with :func:`fedunlearn.strategies.register_method`, found by
discovery), plus its client action if it has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from ..client.actions import DEFAULT_ACTION, METRIC_KEYS, MODEL_KEY
from ..client.actions import message_type as action_message_type
from ..config import ExperimentConfig
from ..metrics import arrayrecord_nbytes
from ..requests import SCOPES, UnlearningRequest, request_to_config
from .params import MethodParams

ROLES = ("retained", "targets", "all")
REPLY_TIMEOUT_S = 3600.0


@dataclass
class CostMeter:
    """What a phase cost: rounds, bytes both ways, FLOPs, wall time, extra storage.

    FLOPs = trained samples x FLOPs of one forward + backward pass + forward-only samples
    x FLOPs of one forward pass + server-side extra FLOPs."""

    rounds: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    samples_processed: int = 0
    forward_samples: int = 0
    flops_per_sample: int = 0
    forward_flops_per_sample: int = 0
    storage_bytes: int = 0
    wall_s: float = 0.0
    extra_flops: int = 0
    messages_down: int = 0
    messages_up: int = 0

    @property
    def comm_bytes(self) -> int:
        return self.bytes_down + self.bytes_up

    @property
    def flops(self) -> int:
        return (self.samples_processed * self.flops_per_sample
                + self.forward_samples * self.forward_flops_per_sample + self.extra_flops)

    def add(self, other: CostMeter) -> None:
        """Add ``other``'s counts (storage: the larger of the two; both are peaks)."""
        for f in ("rounds", "bytes_down", "bytes_up", "samples_processed", "forward_samples",
                  "extra_flops", "messages_down", "messages_up"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.wall_s += other.wall_s
        self.storage_bytes = max(self.storage_bytes, other.storage_bytes)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "comm_bytes": self.comm_bytes,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "messages_down": self.messages_down, "messages_up": self.messages_up,
                "flops": self.flops, "train_samples": self.samples_processed,
                "forward_samples": self.forward_samples, "server_flops": self.extra_flops,
                "wall_s": round(self.wall_s, 3), "storage_bytes": self.storage_bytes}


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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"phase role {self.role!r}; allowed: {ROLES}")

    def config(self) -> ConfigRecord:
        return ConfigRecord({"lr": float(self.lr), "local-epochs": int(self.local_epochs),
                             "clip-norm": float(self.clip_norm),
                             "weight-decay": float(self.weight_decay), "phase": self.name})


@dataclass
class UnlearningContext:
    """What the server knows when unlearning starts.

    ``requests`` maps node id -> accepted request; ``node_partitions`` is the verified
    node id -> partition map; ``model_factory()`` builds a fresh, randomly initialised
    model; ``progress(phase, round, arrays, num_rounds)`` logs test accuracy and returns
    a ``MetricRecord`` (or ``None``).
    """

    cfg: ExperimentConfig
    requests: dict[int, UnlearningRequest] = field(default_factory=dict)
    fully_forgotten: set[int] = field(default_factory=set)
    node_partitions: dict[int, int] = field(default_factory=dict)
    model_factory: Callable | None = None
    example_input: object = None
    flops_per_sample: int = 0
    forward_flops_per_sample: int = 0
    progress: Callable[[str, int, ArrayRecord, int], MetricRecord | None] | None = None
    info: dict = field(default_factory=dict)


class UnlearningStrategy(FedAvg):
    """FedAvg over the nodes that may train, with roles, phases and metered costs.

    Parameters
    ----------
    context : UnlearningContext
        Configuration, accepted requests and helpers.
    phase : str, optional
        Name shown in progress logs (defaults to the method name).
    params : MethodParams, optional
        The method's parameters (defaults: parsed from ``cfg.method_params``).
    """

    name = "fedavg"
    #: Whether accepted requests shape who trains on what (pretraining: no).
    uses_requests = True
    #: Request scopes this method can serve; others are refused up front.
    scopes: tuple[str, ...] = SCOPES
    #: The method's parameters class (a frozen dataclass).
    Params: type[MethodParams] = MethodParams

    def __init__(self, context: UnlearningContext, phase: str | None = None,
                 params: MethodParams | None = None) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        self.context = context
        self.cfg = context.cfg
        self.phase = phase or self.name
        self.params = params if params is not None else self.params_from_config(context.cfg)
        self.costs: dict[str, CostMeter] = {}
        self._cost_phase = "recovery"
        self.current_phase: Phase | None = None
        self.round_start: ArrayRecord | None = None
        self.notes: dict = {}

    # -- parameters and up-front checks -------------------------------------------------
    @classmethod
    def params_from_config(cls, cfg: ExperimentConfig) -> MethodParams:
        return cls.Params.from_values(cls.name, cfg.method_params_for(cls.name))

    @classmethod
    def preflight(cls, context: UnlearningContext) -> None:
        """Fail before pretraining on settings that would only fail later."""

    def refusal(self, requests: dict[int, UnlearningRequest]) -> str | None:
        """Why this method cannot serve ``requests`` (``None``: it can)."""
        bad = sorted({r.scope for r in requests.values()} - set(self.scopes))
        if bad:
            return (f"{self.name} cannot serve {'/'.join(bad)}-wise requests; it serves "
                    f"{', '.join(self.scopes)}-wise requests")
        return None

    # -- costs ------------------------------------------------------------------------
    @property
    def meter(self) -> CostMeter:
        """The cost meter of the phase that is running."""
        if self._cost_phase not in self.costs:
            self.costs[self._cost_phase] = CostMeter(
                flops_per_sample=self.context.flops_per_sample,
                forward_flops_per_sample=self.context.forward_flops_per_sample)
        return self.costs[self._cost_phase]

    @property
    def cost(self) -> CostMeter:
        """Total over phases."""
        total = CostMeter(flops_per_sample=self.context.flops_per_sample,
                          forward_flops_per_sample=self.context.forward_flops_per_sample)
        for meter in self.costs.values():
            total.add(meter)
        return total

    def cost_dict(self) -> dict:
        """Totals plus ``phases``: one breakdown per phase, in the order they ran."""
        out = self.cost.as_dict()
        out["phases"] = {name: m.as_dict() for name, m in self.costs.items()}
        return out

    @contextmanager
    def cost_phase(self, name: str) -> Iterator[CostMeter]:
        """Meter everything inside under phase ``name`` (its wall time too)."""
        previous, self._cost_phase = self._cost_phase, name
        start = time.perf_counter()
        meter = self.meter
        try:
            yield meter
        finally:
            meter.wall_s += time.perf_counter() - start
            self._cost_phase = previous

    def meter_down(self, content: RecordDict) -> None:
        self.meter.bytes_down += sum(arrayrecord_nbytes(r) for r in content.array_records.values())
        self.meter.messages_down += 1

    def meter_up(self, msg: Message) -> None:
        """Bytes of every ArrayRecord of a reply, and the samples it processed."""
        if msg.has_error():
            return
        content = msg.content
        self.meter.bytes_up += sum(arrayrecord_nbytes(r) for r in content.array_records.values())
        self.meter.messages_up += 1
        for metrics in content.metric_records.values():
            self.meter.samples_processed += int(metrics.get("samples-processed", 0))
            self.meter.forward_samples += int(metrics.get("forward-samples", 0))

    # -- hooks a method overrides -------------------------------------------------------
    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        """Where unlearning starts (every method but Retrain: the pretrained model)."""
        return pretrained

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The method's own unlearning before recovery (FT: nothing)."""
        return arrays

    def recovery_phase(self) -> Phase:
        """FedAvg rounds on the retained data after the unlearning step."""
        cfg = self.cfg
        return Phase("recovery", rounds=cfg.unlearn_rounds, lr=cfg.unlearn_lr,
                     local_epochs=cfg.unlearn_local_epochs, clip_norm=cfg.unlearn_clip_norm)

    def participants(self, role: str, grid: Grid) -> list[int]:
        """The nodes that take part in a round in ``role`` (sorted by node id).

        Only nodes of the verified federation take part (when one is known): a node
        that joined later or under a new id is left out."""
        nodes = set(grid.get_node_ids())
        known = self.context.node_partitions
        if known:
            strangers = nodes - set(known)
            if strangers:
                log(WARNING, "nodes %s are not in the verified federation; they take no "
                    "part", sorted(strangers))
            nodes &= set(known)
        if role == "all":
            return sorted(nodes)
        if role == "targets":
            return sorted(nodes & set(self.context.requests)) if self.uses_requests else []
        if role == "retained":
            return sorted(nodes - self.excluded_nodes())
        raise ValueError(f"role {role!r}; allowed: {ROLES}")

    def excluded_nodes(self) -> set[int]:
        """Nodes with nothing retained: client-wise targets, and any node whose request
        covers all of its training data."""
        if not self.uses_requests:
            return set()
        client_wise = {n for n, r in self.context.requests.items() if r.scope == "client"}
        return client_wise | set(self.context.fully_forgotten)

    def training_nodes(self, grid: Grid) -> list[int]:
        return self.participants("retained", grid)

    def message_type(self, node_id: int, phase: Phase) -> str:
        """Which client action ``node_id`` runs in ``phase``."""
        return action_message_type(phase.action)

    def node_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config for one node: the shared config plus its accepted request."""
        out = ConfigRecord(dict(config))
        request = self.context.requests.get(node_id) if self.uses_requests else None
        if request is not None:
            out.update(request_to_config(request))
        return out

    def node_content(self, node_id: int, arrays: ArrayRecord,
                     config: ConfigRecord) -> RecordDict:
        """What ``node_id`` receives: the model (and any other model a method sends)."""
        return RecordDict({MODEL_KEY: arrays, self.configrecord_key: config})

    # -- machinery ----------------------------------------------------------------------
    def unlearn(self, grid: Grid, pretrained: ArrayRecord) -> ArrayRecord:
        """Run the whole procedure: unlearning step, then recovery; return the model."""
        arrays = self.initial_arrays(pretrained)
        with self.cost_phase("unlearning"):
            arrays = self.unlearning_step(grid, arrays)
        phase = self.recovery_phase()
        with self.cost_phase(phase.name):
            arrays = self.run_phase(grid, arrays, phase)
        return arrays

    def run_phase(self, grid: Grid, arrays: ArrayRecord, phase: Phase) -> ArrayRecord:
        """``phase.rounds`` FedAvg rounds (Flower's ``start()``) from ``arrays``."""
        if phase.rounds == 0:
            return arrays
        self.current_phase = phase
        progress = self.context.progress
        evaluate_fn = None
        if progress is not None:
            def evaluate_fn(server_round: int, current: ArrayRecord):
                if server_round == 0:
                    return None
                if server_round % self.cfg.eval_every and server_round != phase.rounds:
                    return None
                return progress(self.phase, server_round, current, phase.rounds)
        try:
            result = self.start(grid, arrays, num_rounds=phase.rounds,
                                train_config=phase.config(), evaluate_fn=evaluate_fn)
        finally:
            self.current_phase = None
        return result.arrays if result.arrays is not None else arrays

    # Kept for callers of the one-phase API (pretraining).
    def train_rounds(self, grid: Grid, arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        phase = self.recovery_phase()
        phase = Phase(phase.name, num_rounds, phase.lr, phase.local_epochs, phase.clip_norm,
                      phase.weight_decay, phase.action, phase.role)
        return self.run_phase(grid, arrays, phase)

    def round_config(self, phase: Phase, server_round: int) -> ConfigRecord:
        config = phase.config()
        config["server-round"] = server_round
        config["seed"] = self.cfg.seed * 100_000 + server_round
        return config

    def build_messages(self, arrays: ArrayRecord, phase: Phase, nodes: Iterable[int],
                       server_round: int, extra: dict[str, ArrayRecord] | None = None,
                       config: ConfigRecord | None = None) -> list[Message]:
        """One message per node: its action, config and content (plus ``extra`` models)."""
        config = config if config is not None else self.round_config(phase, server_round)
        messages = []
        for node_id in nodes:
            content = self.node_content(node_id, arrays, self.node_config(node_id, config))
            for key, record in (extra or {}).items():
                content[key] = record
            messages.append(Message(content=content, message_type=self.message_type(node_id, phase),
                                    dst_node_id=node_id))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        phase = self.current_phase or self.recovery_phase()
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["seed"] = self.cfg.seed * 100_000 + server_round
        self.round_start = arrays  # the round's starting model, for methods that need deltas
        messages = self.build_messages(arrays, phase, self.participants(phase.role, grid),
                                       server_round, config=config)
        for msg in messages:
            self.meter_down(msg.content)
        self.meter.rounds += 1
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No per-round federated evaluation: the experiment measures the original and
        the unlearned model itself (retain/forget/test/MIA), and progress is central."""
        return []

    def order_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in a fixed order (by partition, then node id), whatever their arrival
        order, so float sums and everything after them are reproducible."""
        parts = self.context.node_partitions
        return sorted(replies, key=lambda m: (parts.get(int(m.metadata.src_node_id), -1),
                                              int(m.metadata.src_node_id)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.order_replies(replies)
        for msg in replies:
            self.meter_up(msg)
        return super().aggregate_train(server_round, replies)

    def exchange(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and wait for the replies, metering both directions.

        Returns the replies that carry content, in :meth:`order_replies` order; failures
        are logged."""
        for msg in messages:
            self.meter_down(msg.content)
        replies = self.order_replies(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        ok = []
        for msg in replies:
            if msg.has_error():
                log(WARNING, "[%s] node %s failed: %s", self.phase, msg.metadata.src_node_id,
                    msg.error.reason)
                continue
            self.meter_up(msg)
            ok.append(msg)
        return ok

    @staticmethod
    def weighted_average(replies: list[Message]) -> ArrayRecord:
        """FedAvg of the replies' models, weighted by ``num-examples``."""
        usable = [m for m in replies if int(m.content["metrics"]["num-examples"]) > 0]
        if not usable:
            raise RuntimeError("no reply carried a model trained on any example")
        return aggregate_arrayrecords([m.content for m in usable], "num-examples")

    def summary(self) -> None:
        phase = self.current_phase or self.recovery_phase()
        log(INFO, "\t├──> Method: %s, phase %s (%d rounds, lr %s, action %s, role %s)",
            self.phase, phase.name, phase.rounds, phase.lr, phase.action, phase.role)
        log(INFO, "\t└──> Excluded nodes (client-wise targets): %s",
            sorted(self.excluded_nodes()) or "none")


class PretrainingProtocol:
    """Mixin: train with the pretraining settings (``pretrain.rounds``, ``pretrain.lr``,
    ``federation.local-epochs``, no clipping). Used by pretraining and by Retrain."""

    cfg: ExperimentConfig

    def recovery_phase(self) -> Phase:
        cfg = self.cfg
        return Phase("training", rounds=cfg.pretrain_rounds, lr=cfg.pretrain_lr,
                     local_epochs=cfg.local_epochs)


__all__ = ["METRIC_KEYS", "ROLES", "CostMeter", "Phase", "PretrainingProtocol",
           "UnlearningContext", "UnlearningStrategy"]

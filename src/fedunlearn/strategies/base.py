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
  own :class:`Phase` settings (server momentum included: Flower's ``FedAvgM``), which
  stop when the model is recovered (:mod:`.stopping`, federated validation);
* **costs** (:class:`CostMeter`, one per phase): the bytes of every ArrayRecord of every
  message and reply, whatever path it takes (Flower's ``start()`` rounds or a direct
  :meth:`exchange`), FLOPs of trained (forward + backward) and forward-only samples,
  server-side extra FLOPs, and storage a method keeps between rounds.

Adding a method means one subclass overriding the hooks it changes, in its own module of
this package (registered with :func:`fedunlearn.strategies.register_method`, found by
discovery), plus its client action if it has one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from ..arrays import decoded, records
from ..protocol import (COST_METRICS, DEFAULT_ACTION, EVALUATE_UNLEARN, METRIC_KEYS, MODEL_KEY,
                        FORWARD_SAMPLES, NUM_EXAMPLES, RETAINED_ACTION, SAMPLES_PROCESSED)
from ..protocol import message_type as action_message_type
from ..metrics import arrayrecord_nbytes
from ..requests import SCOPES, UnlearningRequest, merge_requests, request_to_config
from ..history import HistorySpec
from ..wire import WireError, exact_int, finite_number
from .aggregation import Aggregation
from .params import MethodParams
from .stopping import FIXED, MAXIMUM, StoppingRule

ROLES = ("retained", "targets", "all")
from ..protocol import REPLY_TIMEOUT_S, reply_timeout  # noqa: E402
STOP_RULES = ("fixed", "validation")


class UnlearningFailed(RuntimeError):
    """A method could not finish: no model is returned, and the reason says why (which
    node, which key, which round)."""


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

    def __post_init__(self) -> None:
        _check_int("Recovery.rounds", self.rounds, 0)
        _check_int("Recovery.local_epochs", self.local_epochs, 1)
        _check_int("Recovery.validate_every", self.validate_every, 1)
        _check_int("Recovery.patience", self.patience, 1)
        _check_number("Recovery.lr", self.lr, lo=0.0, open_lo=True)
        _check_number("Recovery.clip_norm", self.clip_norm, lo=0.0)
        _check_number("Recovery.server_momentum", self.server_momentum, lo=0.0, hi=1.0)
        _check_number("Recovery.target_gap", self.target_gap, lo=0.0)
        _check_number("Recovery.min_delta", self.min_delta, lo=0.0)
        if self.stop not in STOP_RULES:
            raise ValueError(f"Recovery.stop={self.stop!r}; allowed: {', '.join(STOP_RULES)}")



@dataclass(frozen=True)
class Training:
    """How the original model was trained: Retrain repeats it on the retained data,
    FedEraser calibrates and MoDE degrades with its local settings."""

    rounds: int = 30
    lr: float = 0.01
    local_epochs: int = 1

    def __post_init__(self) -> None:
        _check_int("Training.rounds", self.rounds, 0)
        _check_int("Training.local_epochs", self.local_epochs, 1)
        _check_number("Training.lr", self.lr, lo=0.0, open_lo=True)



def _check_int(name: str, value, lo: int) -> None:
    exact_int(name, value, lo=lo)


def _check_number(name: str, value, lo: float, hi: float | None = None,
                  open_lo: bool = False) -> None:
    """A finite number ``>= lo`` (``> lo`` with ``open_lo``) and ``< hi``: the bounds
    :func:`~fedunlearn.wire.finite_number` (inclusive ones) cannot say."""
    value = finite_number(name, value, lo=lo)
    if (open_lo and value == lo) or (hi is not None and value >= hi):
        bounds = f"{'>' if open_lo else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
        raise WireError(name, value, f"expected a finite number {bounds}")


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
    #: Of ``samples_processed``, those estimated as ``num-examples x local-epochs`` for
    #: replies that did not count their own (a user's train handler).
    estimated_samples: int = 0

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
                  "extra_flops", "messages_down", "messages_up", "estimated_samples"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.wall_s += other.wall_s
        self.storage_bytes = max(self.storage_bytes, other.storage_bytes)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "comm_bytes": self.comm_bytes,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "messages_down": self.messages_down, "messages_up": self.messages_up,
                "flops": self.flops, "train_samples": self.samples_processed,
                "forward_samples": self.forward_samples, "server_flops": self.extra_flops,
                "wall_s": round(self.wall_s, 3), "storage_bytes": self.storage_bytes,
                **({"estimated_train_samples": self.estimated_samples}
                   if self.estimated_samples else {})}


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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"phase role {self.role!r}; allowed: {ROLES}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"phase server_momentum={self.server_momentum} must be in [0, 1)")

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


class UnlearningStrategy(FedAvgM):
    """FedAvg(M) over the nodes that may train, with roles, phases and metered costs.

    Flower's ``FedAvgM`` with the server momentum of the running :class:`Phase` (0 for
    pretraining and Retrain: plain FedAvg).

    Built like Flower's own strategies, with explicit arguments; what a serving run
    learns (the accepted requests, the verified nodes) is bound to it later with
    :meth:`bind` (:func:`fedunlearn.serve` does this).

    Parameters
    ----------
    recovery : Recovery, optional
        The recovery rounds after the unlearning step (default: ``Recovery()``).
    params : MethodParams or dict, optional
        The method's own parameters (its ``Params`` class, or a dict of its fields;
        default: the class's defaults).
    training : Training, optional
        How the original model was trained (Retrain repeats it; default ``Training()``).
    model_fn : callable, optional
        Builds a fresh, randomly initialised model (the user's ``Net``): NoT resolves
        the layers to negate on it, Retrain starts from it.
    example_input : torch.Tensor, optional
        One input batch (e.g. ``torch.zeros(1, 3, 32, 32)``): NoT traces the layers'
        execution order with it.
    seed : int
        Seeds every draw of the method (client shuffles, random models).
    eval_every : int
        Progress (server-side evaluation, when one is given) every N rounds.
    device : str
        Where server-side computation runs (``auto``, ``cpu``, ``cuda:N``).
    context : UnlearningContext, optional
        The serving state; :meth:`bind` sets it.
    phase : str, optional
        Name shown in progress logs (defaults to the method name).
    aggregation : flwr.serverapp.strategy.Strategy, optional
        The Flower strategy that aggregates the method's rounds (``FedAdam``,
        ``FedProx``, ``FedMedian``, ``Krum``, a DP clipping wrapper, ...), copied afresh
        for each phase; its sampling and config keys apply over the nodes the method lets
        train. Default: ``FedAvgM`` with the phase's server momentum
        (``Recovery.server_momentum``). See :mod:`.aggregation`.
    """

    name = "fedavg"
    #: Whether accepted requests shape who trains on what (pretraining: no).
    uses_requests = True
    #: Request scopes this method can serve; others are refused up front.
    scopes: tuple[str, ...] = SCOPES
    #: The method's parameters class (a frozen dataclass).
    Params: type[MethodParams] = MethodParams

    @classmethod
    def history_needs(cls, params: MethodParams) -> HistorySpec:
        """What this method needs recorded during pretraining (default: nothing)."""
        return HistorySpec()


    def __init__(self, recovery: Recovery | None = None,
                 params: MethodParams | dict | None = None, *,
                 training: Training | None = None, model_fn: Callable | None = None,
                 example_input=None, seed: int = 0, eval_every: int = 5,
                 device: str = "auto", context: UnlearningContext | None = None,
                 phase: str | None = None, aggregation: Strategy | None = None) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        if recovery is not None and not isinstance(recovery, Recovery):
            raise TypeError(f"recovery={recovery!r}: expected a fedunlearn.Recovery")
        if training is not None and not isinstance(training, Training):
            raise TypeError(f"training={training!r}: expected a fedunlearn.Training")
        if aggregation is not None and (not isinstance(aggregation, Strategy)
                                        or isinstance(aggregation, UnlearningStrategy)):
            raise TypeError(f"aggregation={aggregation!r}: expected a Flower strategy "
                            "(flwr.serverapp.strategy.FedAdam(...), FedMedian(...), ...)")
        self.aggregation = aggregation
        self.aggregator: Aggregation | None = None
        self.recovery = recovery if recovery is not None else Recovery()
        self.training = training if training is not None else Training()
        if params is None:
            params = self.Params.from_values(self.name, {})
        elif isinstance(params, dict):
            params = self.Params.from_values(self.name, params)
        elif not isinstance(params, self.Params):
            raise TypeError(f"params={params!r}: {self.name} takes {self.Params.__name__} "
                            "or a dict of its fields")
        self.params = params
        _check_int("seed", seed, 0)
        _check_int("eval_every", eval_every, 1)
        self.seed, self.eval_every, self.device = seed, eval_every, device
        self._model_fn, self._example_input = model_fn, example_input
        self.context = context if context is not None else UnlearningContext()
        self.phase = phase or self.name
        self.costs: dict[str, CostMeter] = {}
        self._cost_phase = "recovery"
        self.current_phase: Phase | None = None
        self.round_start: ArrayRecord | None = None
        self.notes: dict = {}
        self._asked_epochs: dict[int, int] = {}

    # -- binding, up-front checks -----------------------------------------------------
    def fresh(self) -> UnlearningStrategy:
        """A copy with the same settings and no state of any run (its costs, notes,
        server optimizer, bound requests): service mode runs one per unlearning step."""
        clone = copy.copy(self)
        clone.context = UnlearningContext()
        clone.costs, clone.notes, clone._asked_epochs = {}, {}, {}
        clone.current_phase = clone.round_start = clone.aggregator = None
        clone._cost_phase = "recovery"
        return clone

    def bind(self, context: UnlearningContext) -> UnlearningStrategy:
        """Attach what a serving run knows (requests, verified nodes, helpers)."""
        self.context = context
        return self

    @property
    def model_factory(self) -> Callable:
        fn = self._model_fn or self.context.model_factory
        if fn is None:
            raise UnlearningFailed(f"{self.name} needs a model factory: pass model_fn=Net "
                                   "(a callable building a fresh model)")
        return fn

    @property
    def example_input(self):
        if self._example_input is not None:
            return self._example_input
        return self.context.example_input

    def check_ready(self) -> None:
        """Fail before any round on settings this instance cannot run with (default:
        nothing; NoT resolves its layers here)."""

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
        self.meter.bytes_down += sum(arrayrecord_nbytes(r)
                                     for r in records(content, ArrayRecord).values())
        self.meter.messages_down += 1

    def meter_up(self, msg: Message) -> None:
        """Bytes of every ArrayRecord of a reply, and the samples it processed."""
        if msg.has_error():
            return
        content = msg.content
        metric_records = records(content, MetricRecord).values()
        self.meter.bytes_up += sum(arrayrecord_nbytes(r)
                                   for r in records(content, ArrayRecord).values())
        self.meter.messages_up += 1
        epochs = self._asked_epochs.pop(int(msg.metadata.src_node_id), None)
        if epochs is not None and not any(
                SAMPLES_PROCESSED in m or FORWARD_SAMPLES in m
                for m in metric_records):
            # A reply that does not count its own work (the user's train handler): it
            # trained its num-examples for the local epochs it was asked to.
            n = next((m[NUM_EXAMPLES] for m in metric_records
                      if isinstance(m.get(NUM_EXAMPLES), int)), 0)
            self.meter.samples_processed += max(n, 0) * epochs
            self.meter.estimated_samples += max(n, 0) * epochs
        for metrics in metric_records:
            processed = metrics.get("samples-processed", 0)
            forward = metrics.get("forward-samples", 0)
            self.meter.samples_processed += processed if isinstance(processed, int) else 0
            self.meter.forward_samples += forward if isinstance(forward, int) else 0

    # -- hooks a method overrides -------------------------------------------------------
    def initial_arrays(self, pretrained: ArrayRecord) -> ArrayRecord:
        """Where unlearning starts (every method but Retrain: the pretrained model)."""
        return pretrained

    def unlearning_step(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The method's own unlearning before recovery (FT: nothing)."""
        return arrays

    def recovery_phase(self) -> Phase:
        """FedAvgM rounds on the retained data after the unlearning step, stopped by the
        validation rule unless ``unlearn.stop="fixed"``."""
        r = self.recovery
        return Phase("recovery", rounds=r.rounds, lr=r.lr, local_epochs=r.local_epochs,
                     clip_norm=r.clip_norm, server_momentum=r.server_momentum,
                     stop_early=r.stop == "validation")

    def participants(self, role: str, grid: Grid) -> list[int]:
        """The nodes that take part in a round in ``role`` (sorted by node id).

        Only nodes of the verified federation take part (when one is known): a node
        that joined later or under a new id is left out, and a verified node that left
        is still asked (the grid answers for it with an error: it is a failed node of
        the round, never silently a smaller federation)."""
        nodes = set(grid.get_node_ids())
        known = self.context.node_partitions
        if known:
            strangers = nodes - set(known)
            if strangers:
                log(WARNING, "nodes %s are not in the verified federation; they take no "
                    "part", sorted(strangers))
            nodes = set(known)
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
        served = self.context.served
        gone = {n for n, r in served.items() if r.scope == "client"} | set(
            self.context.served_fully)
        if not self.uses_requests:
            return gone
        client_wise = {n for n, r in self.context.requests.items() if r.scope == "client"}
        return client_wise | set(self.context.fully_forgotten) | gone

    def shaping_request(self, node_id: int) -> UnlearningRequest | None:
        """The request that decides what ``node_id`` trains on: this step's (when the
        method uses requests) merged with what it had honoured before (service mode)."""
        current = self.context.requests.get(node_id) if self.uses_requests else None
        earlier = self.context.served.get(node_id)
        if earlier is None or current is None:
            return current if current is not None else earlier
        return merge_requests(earlier, current)

    def message_type(self, node_id: int, phase: Phase) -> str:
        """Which client action ``node_id`` runs in ``phase``: local training goes to
        ``train.retained`` on a node with an accepted request (it leaves its forget set
        out) and to the plain ``train`` elsewhere (a plugin node's own handler)."""
        if phase.action == DEFAULT_ACTION and self.shaping_request(node_id) is not None:
            return action_message_type(RETAINED_ACTION)
        return action_message_type(phase.action)

    def node_config(self, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config for one node: the shared config plus its accepted request."""
        out = ConfigRecord(dict(config))
        request = self.shaping_request(node_id)
        if request is not None:
            out.update(request_to_config(request))
        return out

    def node_content(self, node_id: int, arrays: ArrayRecord,
                     config: ConfigRecord) -> RecordDict:
        """What ``node_id`` receives: the model (and any other model a method sends)."""
        return RecordDict({MODEL_KEY: arrays, self.configrecord_key: config})

    # -- machinery ----------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int | None = None,
              timeout: float = REPLY_TIMEOUT_S, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None):
        """Flower's ``Strategy.start``, made safe for an unlearning strategy: it runs
        the unlearning step *and* recovery (:meth:`unlearn`) for the requests bound
        with :meth:`bind`, and raises when none is bound, so it never silently
        fine-tunes. ``num_rounds`` overrides the recovery rounds. Most users call
        :func:`fedunlearn.serve`, which collects and checks the requests first."""
        from flwr.serverapp.strategy import Result

        if not self.context.requests and self.uses_requests:
            raise RuntimeError(
                f"{self.name}.start(): no accepted unlearning request is bound, so there "
                "is nothing to unlearn (and plain fine-tuning would pass for unlearning). "
                "Call fedunlearn.serve(grid, arrays, [strategy], output_dir=...), which "
                "collects and checks the nodes' requests, or bind an UnlearningContext "
                "with requests first")
        if num_rounds is not None:
            self.recovery = dataclasses.replace(self.recovery, rounds=int(num_rounds))
        arrays = self.unlearn(grid, initial_arrays)
        return Result(arrays=arrays)

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
        """Up to ``phase.rounds`` rounds of Flower's ``configure_train`` ->
        ``send_and_receive`` -> ``aggregate_train`` from ``arrays``; with
        ``phase.stop_early``, stopped by the validation rule (:mod:`.stopping`). What
        happened goes into ``notes[phase.name]`` (rounds, why it stopped, the validation
        history)."""
        if phase.rounds == 0:
            return arrays
        self.begin_phase(phase)  # a fresh server optimizer
        rule = self.stopping_rule(grid) if phase.stop_early else None
        every = self.recovery.validate_every
        progress, on_round = self.context.progress, self.context.on_round
        trajectory = self.context.trajectory and progress is not None
        if trajectory:
            progress(self.phase, 0, arrays, phase.rounds)
        reason, done, round_s = (MAXIMUM if rule else FIXED), 0, []
        try:
            for rnd in range(1, phase.rounds + 1):
                started = time.perf_counter()
                messages = list(self.configure_train(rnd, arrays, phase.config(), grid))
                if not messages:
                    raise RuntimeError(f"[{self.phase}] no node can take part in "
                                       f"{phase.name} (role {phase.role})")
                replies = grid.send_and_receive(messages, timeout=reply_timeout(grid))
                replies = list(replies)
                aggregated, _ = self.aggregate_train(rnd, replies)
                if aggregated is None:
                    asked = sorted(int(m.metadata.dst_node_id) for m in messages)
                    answered = {int(m.metadata.src_node_id) for m in replies}
                    silent = [n for n in asked if n not in answered]
                    why = list(getattr(self, "round_problems", []))
                    if silent:
                        why.append(f"node(s) {silent} did not answer")
                    raise UnlearningFailed(
                        f"[{self.phase}] {phase.name} round {rnd}: no usable reply from "
                        f"nodes {asked} ({'; '.join(why) or 'no reply'}); the method "
                        "stops here and returns no model")
                arrays = aggregated
                done = rnd
                round_s.append(round(time.perf_counter() - started, 4))
                verdict = None
                if rule is not None and (rnd % every == 0 or rnd == phase.rounds):
                    accuracy = self.validate(grid, arrays)
                    verdict = rule.update(rnd, accuracy)
                    log(INFO, "[%s] round %d validation accuracy %.2f%% (target %.2f%%)%s",
                        self.phase, rnd, accuracy, rule.target,
                        f": stop, {verdict}" if verdict else "")
                if progress is not None and (trajectory or rnd % self.eval_every == 0
                                             or rnd == phase.rounds or verdict):
                    progress(self.phase, rnd, arrays, phase.rounds)
                elif on_round is not None:
                    on_round(self.phase, rnd, phase.rounds)
                if verdict:
                    reason = verdict
                    break
        finally:
            self.current_phase = None
        note = {"rounds": done, "max_rounds": phase.rounds, "stopped": reason,
                "server_momentum": phase.server_momentum,
                "round_s": round_s}  # training rounds only (send, train, aggregate)
        if self.aggregation is not None:
            note["aggregation"] = type(self.aggregation).__name__
        if rule is not None:
            note["target"] = round(rule.target, 4)
            note["validation"] = [[r, round(a, 4)] for r, a in rule.history]
        self.notes[phase.name] = note
        return arrays

    def begin_phase(self, phase: Phase, arrays: ArrayRecord | None = None,
                    momentum: list | None = None) -> Aggregation:
        """Start ``phase`` with a fresh aggregating strategy (:attr:`aggregation`, or
        ``FedAvgM`` with the phase's server momentum, from ``arrays`` and ``momentum``
        when given: service mode resumes its optimizer)."""
        self.current_phase = phase
        self.aggregator = Aggregation.for_phase(self.aggregation, phase.server_momentum,
                                                arrays, momentum)
        return self.aggregator

    def stopping_rule(self, grid: Grid) -> StoppingRule:
        """The rule for this job: the target is the original model's validation accuracy
        on the retained clients minus ``unlearn.target-gap``. The original is validated
        once per job (shared by its methods, each charged its cost)."""
        r, info = self.recovery, self.context.info
        if "original_validation" not in info:
            if self.context.original_arrays is None:
                raise RuntimeError("the stopping rule needs the original model "
                                   "(context.original_arrays)")
            probe = CostMeter()
            accuracy = self._validate(grid, self.context.original_arrays, probe)
            info["original_validation"] = (accuracy, probe)
        accuracy, probe = info["original_validation"]
        meter = self.costs.setdefault("validation", CostMeter())
        meter.add(probe)
        self.notes["original_validation"] = round(accuracy, 4)
        return StoppingRule(target=accuracy - r.target_gap, patience=r.patience,
                            min_delta=r.min_delta)

    def validate(self, grid: Grid, arrays: ArrayRecord) -> float:
        """Federated validation accuracy (%) of ``arrays`` on the retained clients,
        metered under ``validation``."""
        return self._validate(grid, arrays, self.costs.setdefault("validation", CostMeter()))

    def _validate(self, grid: Grid, arrays: ArrayRecord, meter: CostMeter) -> float:
        nodes = self.participants("retained", grid)
        messages = []
        for node_id in nodes:
            config = self.node_config(node_id, ConfigRecord({"split": "val"}))
            messages.append(Message(RecordDict({MODEL_KEY: arrays, "config": config}),
                                    dst_node_id=node_id, message_type=EVALUATE_UNLEARN))
        correct = total = 0
        meter.bytes_down += sum(arrayrecord_nbytes(arrays) for _ in messages)
        meter.messages_down += len(messages)
        for msg in grid.send_and_receive(messages, timeout=reply_timeout(grid)):
            if msg.has_error():
                log(WARNING, "[%s] validation failed on node %s: %s", self.phase,
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            meter.messages_up += 1
            meter.bytes_up += sum(arrayrecord_nbytes(r)
                                  for r in msg.content.array_records.values())
            try:
                m = msg.content["metrics"]
                c, t = int(m["val-correct"]), int(m["val-total"])
            except (KeyError, TypeError, ValueError, OverflowError) as err:
                log(WARNING, "[%s] malformed validation reply from node %s (%s): ignored",
                    self.phase, msg.metadata.src_node_id, err)
                continue
            if not 0 <= c <= t:
                log(WARNING, "[%s] validation reply from node %s reports %d of %d correct: "
                    "ignored", self.phase, msg.metadata.src_node_id, c, t)
                continue
            correct, total = correct + c, total + t
            meter.forward_samples += t
        meter.forward_flops_per_sample = self.context.forward_flops_per_sample
        return 100.0 * correct / total if total else float("nan")

    def round_config(self, phase: Phase, server_round: int) -> ConfigRecord:
        config = phase.config()
        config["server-round"] = server_round
        config["seed"] = self.seed * 100_000 + server_round
        return config

    def build_messages(self, arrays: ArrayRecord, phase: Phase, nodes: Iterable[int],
                       server_round: int, extra: dict[str, ArrayRecord] | None = None,
                       config: ConfigRecord | None = None) -> list[Message]:
        """One message per node: its action, config and content (plus ``extra`` models)."""
        config = config if config is not None else self.round_config(phase, server_round)
        messages = []
        epochs = config.get("local-epochs", 1)
        for node_id in nodes:
            if self.message_type(node_id, phase).startswith("train"):
                self._asked_epochs[node_id] = int(epochs) if isinstance(epochs, int) else 1
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
        config["seed"] = self.seed * 100_000 + server_round
        self.round_start = arrays  # the round's starting model, for methods that need deltas
        nodes, config = self._aggregation(phase).prepare(
            server_round, arrays, config, grid, self.participants(phase.role, grid))
        messages = self.build_messages(arrays, phase, nodes, server_round, config=config)
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

    def reply_problem(self, msg: Message) -> str | None:
        """Why a train reply cannot be aggregated (``None``: it can).

        A reply must carry exactly one ArrayRecord (``arrays``) with the keys and shapes
        of the model sent, and one MetricRecord (any name, as Flower's FedAvg accepts)
        with a positive, finite ``num-examples`` (the aggregation weight, as in Flower).
        fedunlearn's cost metrics (``samples-processed``, ``forward-samples``) are
        optional; any other metric (a user's ``train_loss``) must be a finite number."""
        content = msg.content
        array_records, metric_records = records(content, ArrayRecord), records(content, MetricRecord)
        if len(array_records) != 1 or MODEL_KEY not in array_records:
            return f"expected one ArrayRecord {MODEL_KEY!r}, got {sorted(array_records)}"
        if len(metric_records) != 1:
            return f"expected one MetricRecord, got {sorted(metric_records)}"
        metrics = next(iter(metric_records.values()))
        if NUM_EXAMPLES not in metrics:
            return (f"the reply's metrics have no {NUM_EXAMPLES!r} (keys: "
                    f"{sorted(metrics)[:8]}): Flower's FedAvg weights every reply by it")
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                        v == v and abs(v) != float("inf")):
                    return f"metric {key}={value!r} is not a finite number"
            if key in (NUM_EXAMPLES, *COST_METRICS) and not (
                    isinstance(value, int) and value >= 0):
                return f"metric {key}={value!r} is not a non-negative integer"
        if metrics[NUM_EXAMPLES] <= 0:
            return f"{NUM_EXAMPLES} is 0: nothing to aggregate"
        sent = self.round_start
        if sent is not None:
            got = content[MODEL_KEY]
            if set(got) != set(sent):
                return "the model's keys differ from the model sent"
            bad = [k for k in sent if tuple(got[k].shape) != tuple(sent[k].shape)]
            if bad:
                return f"array shapes differ from the model sent: {bad[:3]}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = []
        self.round_problems = []
        for msg in self.order_replies(replies):
            if msg.has_error():
                self.round_problems.append(f"node {msg.metadata.src_node_id} failed: "
                                           f"{msg.error.reason}")
            else:
                problem = self.reply_problem(msg)
                if problem is not None:
                    log(WARNING, "[%s] round %d: reply from node %s dropped: %s", self.phase,
                        server_round, msg.metadata.src_node_id, problem)
                    self.round_problems.append(f"node {msg.metadata.src_node_id}: {problem}")
                    continue
            self.meter_up(msg)
            usable.append(msg)
        self.observe_replies(server_round, [m for m in usable if not m.has_error()])
        phase = self.current_phase or self.recovery_phase()
        return self._aggregation(phase).aggregate(
            server_round, [normalized(m) for m in usable], self.round_start)

    def _aggregation(self, phase: Phase) -> Aggregation:
        if self.aggregator is None:  # configure/aggregate called outside run_phase
            self.aggregator = Aggregation.for_phase(self.aggregation, phase.server_momentum,
                                                    self.round_start)
        return self.aggregator

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """Called with the replies a round aggregates, in partition order (pretraining
        records its training history here); default: nothing."""

    def exchange(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and wait for the replies, metering both directions.

        Returns the replies that carry content, in :meth:`order_replies` order; failures
        are logged."""
        for msg in messages:
            self.meter_down(msg.content)
        replies = self.order_replies(grid.send_and_receive(messages, timeout=reply_timeout(grid)))
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


def normalized(msg: Message) -> Message:
    """A checked train reply reduced to what FedAvg aggregates (the model and
    ``num-examples``), so replies with different metric names (a plugin node's own
    handler and fedunlearn's actions in one round) pass Flower's consistency check."""
    if msg.has_error():
        return msg
    metrics = next(iter(records(msg.content, MetricRecord).values()))
    content = RecordDict({MODEL_KEY: decoded(msg.content[MODEL_KEY]),
                          "metrics": MetricRecord({NUM_EXAMPLES: int(metrics[NUM_EXAMPLES])})})
    return Message(content, metadata=msg.metadata)


class PretrainingProtocol:
    """Mixin: train with the pretraining settings (``pretrain.rounds``, ``pretrain.lr``,
    ``federation.local-epochs``, no clipping). Used by pretraining and by Retrain."""

    training: Training

    def recovery_phase(self) -> Phase:
        t = self.training
        return Phase("training", rounds=t.rounds, lr=t.lr, local_epochs=t.local_epochs)


__all__ = ["METRIC_KEYS", "ROLES", "CostMeter", "Phase", "PretrainingProtocol", "Recovery",
           "Training", "UnlearningContext", "UnlearningFailed", "UnlearningStrategy"]

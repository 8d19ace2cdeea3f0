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
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from ..logs import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from .. import protocol as P
from ..history import HistorySpec
from ..protocol import (
    DEFAULT_ACTION,
    METRIC_KEYS,
    MODEL_KEY,
    REPLY_TIMEOUT_S,
    RETAINED_ACTION,
    reply_timeout,
)
from ..protocol import message_type as action_message_type
from ..requests import SCOPES, UnlearningRequest, request_to_config
from .aggregation import Aggregation, check_template
from .context import UnlearningContext, UnlearningFailed
from .costs import CostMeter, Metered
from .params import MethodParams
from .reply_checks import ReplyChecks, normalized, shared_metrics
from .roles import Roles
from .round_records import PlayedRound, RoundRecords
from .settings import ROLES, STOP_RULES, Phase, Recovery, Training, _check_int  # noqa: F401  (re-exported)
from .stopping import FIXED, MAXIMUM
from .validation import Validating, check_needs


class UnlearningStrategy(Roles, Metered, Validating, ReplyChecks, RoundRecords, FedAvgM):
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
    #: What the method builds models for (non-empty: ``model_fn`` is required).
    model_fn_use: str = ""
    #: What the method traces the model with (non-empty: ``example_input`` is required).
    example_input_use: str = ""

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
        self.recovery = recovery if recovery is not None else Recovery()
        check_template(aggregation, self.recovery.selection,
                       isinstance(aggregation, UnlearningStrategy))
        self.aggregation = aggregation
        self.aggregator: Aggregation | None = None
        #: Flower's ``Result`` histories of the last :meth:`start`, by recovery round.
        self.train_metrics: dict[int, MetricRecord] = {}
        self.evaluate_metrics: dict[int, MetricRecord] = {}
        self._evaluate_fn = None
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
        check_needs(self)

    # -- binding, up-front checks -----------------------------------------------------
    def fresh(self) -> UnlearningStrategy:
        """A copy with the same settings and no state of any run (its costs, notes,
        server optimizer, bound requests): service mode runs one per unlearning step."""
        clone = copy.copy(self)
        clone.context = UnlearningContext()
        clone.costs, clone.notes, clone._asked_epochs = {}, {}, {}
        clone.train_metrics, clone.evaluate_metrics = {}, {}
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
                     stop_early=r.stop == "validation", selection=r.selection)

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
        fine-tunes. ``num_rounds`` overrides the recovery rounds. As Flower's, the
        ``Result`` holds the aggregated train metrics of every recovery round and, with
        ``evaluate_fn(server_round, arrays) -> MetricRecord | None``, the server-side
        evaluation of round 0 (the model recovery starts from) and of every recovery
        round. Most users call :func:`fedunlearn.serve`, which collects and checks the
        requests first."""
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
        self.train_metrics, self.evaluate_metrics = {}, {}
        self._evaluate_fn = evaluate_fn
        try:
            arrays = self.unlearn(grid, initial_arrays)
        finally:
            self._evaluate_fn = None
        return Result(arrays=arrays, train_metrics_clientapp=dict(self.train_metrics),
                      evaluate_metrics_serverapp=dict(self.evaluate_metrics))

    def unlearn(self, grid: Grid, pretrained: ArrayRecord) -> ArrayRecord:
        """Run the whole procedure: unlearning step, then recovery; return the model."""
        arrays = self.initial_arrays(pretrained)
        with self.cost_phase("unlearning"):
            arrays = self.unlearning_step(grid, arrays)
        phase = self.recovery_phase()
        if self._evaluate_fn is not None:
            self._evaluate(0, arrays)
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
                played = None  # the last round's replies go before the next round's come
                played = self.play_round(grid, arrays, phase, rnd)
                if not played.messages:
                    raise RuntimeError(f"[{self.phase}] no node can take part in "
                                       f"{phase.name} (role {phase.role})")
                if played.arrays is None:
                    raise self._no_usable_reply(phase, rnd, played.messages, played.replies)
                arrays, metrics = played.arrays, played.metrics
                done = rnd
                round_s.append(round(time.perf_counter() - started, 4))
                self._record_round(phase, rnd, arrays, metrics)
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

    def play_round(self, grid: Grid, arrays: ArrayRecord, phase: Phase,
                   server_round: int) -> PlayedRound:
        """One round of ``phase`` from ``arrays``: Flower's ``configure_train`` ->
        ``send_and_receive`` -> ``aggregate_train``, through the phase's aggregating
        strategy. Every round of every phase, pretraining's and service mode's included,
        is played here; the loops on top (:meth:`run_phase`, service mode's retries)
        decide what to do with a round that had no node or no usable reply."""
        messages = list(self.configure_train(server_round, arrays, phase.config(), grid))
        if not messages:
            return PlayedRound(None, None, [], [])
        replies = list(grid.send_and_receive(messages, timeout=reply_timeout(grid)))
        aggregated, metrics = self.aggregate_train(server_round, replies)
        return PlayedRound(aggregated, metrics, messages, replies)

    def begin_phase(self, phase: Phase, arrays: ArrayRecord | None = None,
                    momentum: list | None = None) -> Aggregation:
        """Start ``phase`` with a fresh aggregating strategy (:attr:`aggregation`, or
        ``FedAvgM`` with the phase's server momentum, from ``arrays`` and ``momentum``
        when given: service mode resumes its optimizer)."""
        self.current_phase = phase
        self.aggregator = Aggregation.for_phase(self.aggregation, phase.server_momentum,
                                                arrays, momentum, phase.selection)
        return self.aggregator

    def round_config(self, phase: Phase, server_round: int) -> ConfigRecord:
        config = phase.config()
        config[P.SERVER_ROUND] = server_round
        config[P.SEED] = self.seed * 100_000 + server_round
        return config

    def build_messages(self, arrays: ArrayRecord, phase: Phase, nodes: Iterable[int],
                       server_round: int, extra: dict[str, ArrayRecord] | None = None,
                       config: ConfigRecord | None = None) -> list[Message]:
        """One message per node: its action, config and content (plus ``extra`` models)."""
        config = config if config is not None else self.round_config(phase, server_round)
        messages = []
        epochs = config.get(P.LOCAL_EPOCHS, 1)
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
        config[P.SERVER_ROUND] = server_round
        config[P.SEED] = self.seed * 100_000 + server_round
        self.round_start = arrays  # the round's starting model, for methods that need deltas
        nodes, config = self._aggregation().prepare(
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
        keep = shared_metrics(usable)
        return self._aggregation().aggregate(
            server_round, [normalized(m, keep) for m in usable], self.round_start)

    def _aggregation(self) -> Aggregation:
        if self.aggregator is None:  # configure/aggregate called outside run_phase:
            # no server optimizer (plain FedAvg) unless a phase says otherwise
            momentum = self.current_phase.server_momentum if self.current_phase else 0.0
            self.aggregator = Aggregation.for_phase(self.aggregation, momentum,
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
        usable = [m for m in replies if int(m.content[P.METRICS_KEY][P.NUM_EXAMPLES]) > 0]
        if not usable:
            raise RuntimeError("no reply carried a model trained on any example")
        return aggregate_arrayrecords([m.content for m in usable], P.NUM_EXAMPLES)

    def summary(self) -> None:
        phase = self.current_phase or self.recovery_phase()
        log(INFO, "\t├──> Method: %s, phase %s (%d rounds, lr %s, action %s, role %s)",
            self.phase, phase.name, phase.rounds, phase.lr, phase.action, phase.role)
        log(INFO, "\t└──> Excluded nodes (client-wise targets): %s",
            sorted(self.excluded_nodes()) or "none")


class PretrainingProtocol:
    """Mixin: train with the pretraining settings (``pretrain.rounds``, ``pretrain.lr``,
    ``federation.local-epochs``, no clipping). Used by pretraining and by Retrain."""

    training: Training

    def recovery_phase(self) -> Phase:
        t = self.training
        return Phase("training", rounds=t.rounds, lr=t.lr, local_epochs=t.local_epochs)


__all__ = ["METRIC_KEYS", "ROLES", "CostMeter", "Phase", "PretrainingProtocol", "Recovery",
           "Training", "UnlearningContext", "UnlearningFailed", "UnlearningStrategy"]

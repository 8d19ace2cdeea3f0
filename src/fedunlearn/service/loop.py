"""Service mode: a federation that trains continuously and serves unlearning requests
as they arrive (:class:`UnlearningService`).

The ServerApp trains FedAvg(M) rounds for as long as its budget allows (rounds, wall
clock, or until ``stop()`` says so). Every ``query_every`` rounds it asks the nodes for
pending requests; when valid ones are pending it runs the configured unlearning method
(NoT by default in the harness) on the *current* global model, publishes the result as a
new **version**, and goes on training from it without the forgotten data: a client-wise
target never trains again in this federation, a class- or instance-wise target trains
on its retained data from then on. Requests that arrive together are served together,
later ones in later steps (sequential unlearning).

Everything the service knows is in its state directory, written atomically:

``checkpoint.pt``
    Every round: the model, the server optimizer's momentum, the round and version, the
    verified federation view, the pending, served and failed requests. A ServerApp that
    dies and is started again on the same directory resumes from it: no accepted
    request is lost or served twice, and round numbers continue.
``versions/v<N>.pt`` and ``versions.json``
    Every published model (the start, each unlearning step, the end) with its round,
    SHA-256 and the requests it honours; ``fedunlearn versions DIR`` lists them.
``audit.jsonl``
    The hash-chained audit log (:mod:`fedunlearn.audit`): every request received,
    accepted, honoured (with round and version) or failed, deadline warnings, resumes.

A published version's receipt carries the model: the target node checks its hash and
measures it on its own forget and retained data (accuracy and loss), writes that into
the data owner's receipt and sends the numbers back; the data never leaves the node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid

from .. import federation
from ..arrays import records
from ..audit import AuditLog, audit_path, model_digest
from ..files import remove_stale_temporaries
from ..logs import log
from ..protocol import NUM_EXAMPLES, REPLY_TIMEOUT_S
from ..server_evaluation import ServerEvaluation
from ..strategies.base import Phase, UnlearningContext, UnlearningStrategy
from .commit import CommittedLedger, ServiceAudit
from .config import ServiceConfig, ServiceError
from .intake import Intake
from .outbox import Outbox
from .rebuild import Rebuild
from .state import (
    CHECKPOINT_FILE,
    VERSIONS_DIR,
    VERSIONS_FILE,
    ServiceOutcome,
    ServiceState,
    _fmt,
    read_versions,
)
from .steps import Steps
from .storage import Storage


class _Trainer(UnlearningStrategy):
    """The continued training: FedAvg(M) rounds on the retained data of every node the
    service may train (a served client-wise target never again)."""

    name = "service"
    uses_requests = False
    last_loss = float("nan")

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        """The round's train loss: the replies' loss metric (any name with ``loss``, the
        user's ``train_loss`` or fedunlearn's), weighted by ``num-examples``."""
        total = weight = 0.0
        for msg in replies:
            for metrics in records(msg.content, MetricRecord).values():
                n = metrics.get(NUM_EXAMPLES, 0)
                loss = _loss(metrics)
                if loss == loss and isinstance(n, int) and n > 0:
                    total, weight = total + loss * n, weight + n
        self.last_loss = total / weight if weight else float("nan")




class UnlearningService(Intake, Steps, Outbox, Storage, Rebuild):
    """Train continuously and serve unlearning requests as they arrive.

    Parameters
    ----------
    method : UnlearningStrategy, optional
        The unlearning method each step runs (e.g. ``NoT(Recovery(rounds=5),
        model_fn=Net, example_input=x)``); a fresh copy per step. Default: NoT with the
        default :class:`Recovery` and ``model_fn`` / ``example_input``.
    state_dir : path
        Checkpoint, versions and audit log; a service started on a directory with a
        checkpoint resumes from it.
    config : ServiceConfig
        Budgets, cadence, training, dropout tolerance, deadlines.
    evaluate_fn : callable, optional
        The server's own evaluation of each published version: Flower's
        ``evaluate_fn(server_round, arrays) -> MetricRecord | None`` (``server_round``:
        the service's round; the ``test_metric`` entry is a fraction, reported x 100) or
        ``evaluate_fn(arrays) -> dict | float`` in % (``{"test": 97.1}``); see
        :mod:`fedunlearn.server_evaluation`. When it raises, the version is published
        with ``not_measured`` saying why.
    test_metric : str, optional
        The accuracy entry of Flower's ``MetricRecord`` (default ``"accuracy"``).
    model_fn, example_input : optional
        The model factory and one input batch (FLOPs and the methods that need them).
    stop : callable, optional
        ``stop() -> bool``, asked after every round: ``True`` ends the service cleanly.
    on_round : callable, optional
        ``on_round(round, info)`` after every round that counted (``info``: version,
        participants, train loss, validation accuracy, pending requests).
    reply_timeout : float
        Seconds to wait for the nodes' replies in any exchange.
    run_config_requests : bool
        Whether a node may ask through the run-config's ``forget.*`` (the simulation
        harness only).
    context_defaults : dict, optional
        Extra :class:`UnlearningContext` fields for every step (the harness passes its
        experiment config).
    note_interrupted : bool
        Record ``job.interrupted`` when the audit log's last run did not end (the
        harness does this itself before its partition check).
    verbose : bool
        Keep Flower's own per-round log lines (its strategies' ``aggregate_train: ...``);
        by default only the service's round lines and step blocks are logged.
    rebuild : bool
        When ``state_dir``'s checkpoint is missing or cannot be read but it lists
        published versions: go on from the last good version (``service.rebuilt`` in
        the audit log names what is lost) instead of stopping. A readable checkpoint is
        resumed as always.
    """

    def __init__(self, method: UnlearningStrategy | None = None, *,
                 state_dir: str | os.PathLike,
                 config: ServiceConfig | None = None, evaluate_fn: Callable | None = None,
                 test_metric: str | None = None,
                 model_fn: Callable | None = None, example_input=None,
                 stop: Callable[[], bool] | None = None,
                 on_round: Callable[[int, dict], None] | None = None,
                 reply_timeout: float = REPLY_TIMEOUT_S, run_config_requests: bool = False,
                 context_defaults: dict | None = None, note_interrupted: bool = True,
                 verbose: bool = False, rebuild: bool = False) -> None:
        if method is None:  # NoT with the default recovery
            from ..strategies import get_method

            method = get_method("not")(model_fn=model_fn, example_input=example_input)
        if not isinstance(method, UnlearningStrategy):
            raise TypeError(f"method={method!r}: expected a fedunlearn strategy "
                            "(e.g. fedunlearn.NoT(...))")
        if config is None:
            config = ServiceConfig()
        if not isinstance(config, ServiceConfig):
            raise TypeError(f"config={config!r}: expected a fedunlearn.ServiceConfig")
        if config.rounds == 0 and config.wall_s == 0 and stop is None:
            raise ValueError("the service has no budget: give ServiceConfig(rounds=...) or "
                             "wall_s=..., or a stop() callable")
        needs = method.history_needs(method.params)
        if needs:
            raise ValueError(
                f"method={method.name}: service mode cannot serve with a method that replays "
                f"the training history ({needs.describe()}): the service trains on after "
                "every step, and a history recorded before it no longer describes the model "
                "it serves; use a method that needs none (NoT, FT, PUF, ...)")
        method.check_ready()
        self.method, self.config = method, config
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.evaluation = ServerEvaluation.of(evaluate_fn, test_metric)
        self.stop, self.on_round = stop, on_round
        self.model_fn = model_fn if model_fn is not None else method._model_fn
        self.example_input = (example_input if example_input is not None
                              else method._example_input)
        self.reply_timeout = reply_timeout
        self.run_config_requests = bool(run_config_requests)
        self.context_defaults = dict(context_defaults or {})
        self.note_interrupted = note_interrupted
        self.verbose = bool(verbose)
        self.rebuild = bool(rebuild)

    # -- the loop ---------------------------------------------------------------------
    def run(self, grid: Grid, arrays: ArrayRecord, *,
            verified: tuple[dict[int, int], dict[int, dict]] | None = None) -> ServiceOutcome:
        """Serve until the budget is spent; resume from ``state_dir``'s checkpoint when
        there is one (``arrays`` is then only checked against it). ``verified``: the
        federation's view (node -> partition) and the nodes' reports when the caller has
        just checked them (the harness), instead of asking the nodes again."""
        quiet = None if self.verbose else _FlowerRoundLines()
        if quiet is not None:
            FLOWER_LOGGER.addFilter(quiet)
        try:
            return self._run(grid, arrays, verified)
        finally:
            if quiet is not None:
                FLOWER_LOGGER.removeFilter(quiet)

    def _run(self, grid: Grid, arrays: ArrayRecord, verified) -> ServiceOutcome:
        if not isinstance(arrays, ArrayRecord) or not len(arrays):
            raise ValueError("arrays must be the model's non-empty ArrayRecord")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.state_dir, self.state_dir / VERSIONS_DIR):  # a kill -9 mid-write
            for stale in remove_stale_temporaries(folder):
                log(WARNING, "[service] removed %s, left by a write that was cut short", stale)
        run = federation.run_id_of(grid)
        self.run_id = run
        audit = AuditLog(audit_path(self.state_dir), run)
        self.audit = ServiceAudit(audit, lambda: {"round": self.state.round,
                                                  "version": self.state.version})
        self.grid = federation.GuardedGrid(grid, self.audit, self.reply_timeout)
        # The one writer of request and unlearning records; receipts go through the
        # service's own durable outbox.
        self.ledger = CommittedLedger(self.audit, self.grid, run, receipts=False)
        self.started = time.monotonic()
        self.trainer = _Trainer(seed=self.config.seed)
        self._check_model(arrays)
        self.state = ServiceState()
        try:
            loaded = self._load_or_rebuild()  # unreadable: service.failed, named
            self.state = loaded[0] if loaded not in (None, "rebuild") else ServiceState()
            if loaded not in (None, "rebuild"):  # the records its checkpoint committed, once
                self.audit.write(self.audit.missing(self.state.due_records,
                                                    self.state.audit_seq))
                self.state.due_records = []
            return self._serve(arrays, verified, audit, loaded, grid)
        except BaseException as err:  # said in the log: no later run takes it for a crash
            self.audit.release()  # records of work a resume does again
            self.audit.record("service.failed", error=f"{type(err).__name__}: {err}"[:1000])
            raise

    def _serve(self, arrays, verified, audit, loaded, grid) -> ServiceOutcome:
        resumed_from = None
        if loaded == "rebuild":
            self.rebuild_state(arrays, verified)
            resumed_from = self.state.round
        elif loaded is None or not self.state.started:  # new, or a start cut short
            self._start(arrays, verified)
        else:
            self.state, self.arrays, self.momentum = loaded
            if self.note_interrupted:
                self.ledger.interrupted()
            self._check_resume(arrays)
            self._check_versions()
            self.remove_unlisted_versions()
            resumed_from = self.state.round
            log(INFO, "[service] resumed from %s: round %d, version %d, %d pending request(s)",
                self.state_dir / CHECKPOINT_FILE, self.state.round, self.state.version,
                len(self.state.pending))
            self.audit.record("service.resumed", method=self.method.name,
                              model_arrays_sha256=model_digest(self.arrays),
                              pending=len(self.state.pending))
            self.rejoin_simulation(grid)
            self.grid.verify(self.state.view)
            self.grid.reports = dict(self.state.reports)
            self.audit_steps()
            self.flush_outbox()
        self._flops()
        stopped = "budget"
        while True:
            why = self.budget_spent()
            if why:
                stopped = why
                break
            if self.state.round % self.config.query_every == 0:
                self.collect()
            self.deadlines()
            if self.ready():
                self.unlearn()
            self.train_round()
            if self.stop is not None and self.stop():
                stopped = "stop() asked"
                break
        if model_digest(self.arrays) != self._last_digest():
            self.publish("final", [])
            self.checkpoint()
        self.audit.record("service.finished", stopped=stopped, pending=len(self.state.pending),
                          model_arrays_sha256=model_digest(self.arrays))
        log(INFO, "[service] stopped at round %d (%s): version %d, %d step(s), %d pending, "
            "%d failed; versions in %s", self.state.round, stopped, self.state.version,
            len(self.state.steps), len(self.state.pending), len(self.state.failed),
            self.state_dir / VERSIONS_DIR)
        return ServiceOutcome(self.arrays, self.state.round, self.state.version, stopped,
                              list(self.state.steps), list(self.state.failed),
                              [p.as_dict() for p in self.state.pending], resumed_from,
                              read_versions(self.state_dir))

    def _load_or_rebuild(self):
        """:meth:`load`'s answer, or ``"rebuild"`` where ``rebuild`` was asked and the
        checkpoint is missing or unreadable in a directory that lists versions."""
        if not self.rebuild or not (self.state_dir / VERSIONS_FILE).exists():
            return self.load()
        try:
            return self.load()
        except ServiceError as err:
            log(WARNING, "[service] %s; rebuilding from the last good version (rebuild=True)",
                str(err)[:300])
            return "rebuild"

    def _start(self, arrays: ArrayRecord, verified) -> None:
        """A new service: its first checkpoint before anything else (a kill from here on
        leaves one, with ``started`` false: the start is made again), then the start's
        records, the view and version 0, committed by the checkpoint that follows."""
        self.state = ServiceState(method=self.method.name, model_keys=list(arrays.keys()),
                                  started=False)
        self.arrays, self.momentum = arrays, None
        self.checkpoint()
        if self.note_interrupted:
            self.ledger.interrupted()
        self.audit.hold()
        self.audit.record("service.started", method=self.method.name,
                          config=dataclasses.asdict(self.config),
                          model_arrays_sha256=model_digest(arrays))
        self.verify(verified)
        self.publish("start", [])
        self.state.started = True
        self.checkpoint()

    def budget_spent(self) -> str:
        c = self.config
        if c.rounds and self.state.round >= c.rounds:
            return f"round budget {c.rounds} reached"
        if c.wall_s and time.monotonic() - self.started >= c.wall_s:
            return f"wall-clock budget {c.wall_s:g} s spent"
        return ""

    # -- training ---------------------------------------------------------------------
    def train_round(self) -> None:
        """One FedAvg(M) round on every trainable node (retried when too few reply)."""
        c, trainer = self.config, self.trainer
        trainer.bind(UnlearningContext(node_partitions=dict(self.state.view),
                                       served=dict(self.state.served),
                                       served_fully=set(self.state.served_fully)))
        phase = Phase("service", rounds=1, lr=c.lr, local_epochs=c.local_epochs,
                      server_momentum=c.server_momentum)
        rnd = self.state.round + 1
        for attempt in range(c.round_retries + 1):
            aggregation = trainer.begin_phase(phase, self.arrays, self.momentum)
            played = trainer.play_round(self.grid, self.arrays, phase, rnd)
            messages, replies, aggregated = played.messages, played.replies, played.arrays
            if not messages:
                raise ServiceError(f"round {rnd}: no node may train (every node of the "
                                   "federation was forgotten client-wise or left)")
            asked = sorted(int(m.metadata.dst_node_id) for m in messages)
            usable = len(replies) - len(getattr(trainer, "round_problems", []))
            need = c.required(len(asked))
            answered = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
            missing = [n for n in asked if n not in answered]
            if aggregated is not None and usable >= need:
                break
            log(WARNING, "[service] round %d: %d usable repl%s of %d asked (need %d; missing "
                "%s)%s", rnd, usable, "y" if usable == 1 else "ies", len(asked), need,
                missing, "; retrying" if attempt < c.round_retries else "")
            self.audit.record("round.retried" if attempt < c.round_retries else "round.failed",
                              server_round=rnd, usable=usable, asked=asked, missing=missing,
                              need=need)
        else:
            raise ServiceError(
                f"round {rnd}: fewer than {need} usable replies in {c.round_retries + 1} "
                f"tries (nodes asked {asked}, missing {missing}); the service stops at its "
                f"last checkpoint (round {self.state.round}); start it again to resume")
        self.arrays = aggregated
        self.momentum = aggregation.momentum()
        self.state.round = rnd
        info = {"version": self.state.version, "participants": usable, "asked": len(asked),
                "missing": missing, "train_loss": trainer.last_loss,
                "pending": len(self.state.pending)}
        if c.validate_every and rnd % c.validate_every == 0:
            info["val_accuracy"] = trainer.validate(self.grid, self.arrays)
        if c.publish_every and rnd % c.publish_every == 0:
            self.publish("trained", [])
        self.checkpoint()
        log(INFO, "[service] round %d | v%d | %d/%d nodes%s | train loss %s%s | pending %d",
            rnd, self.state.version, usable, len(asked),
            f" (missing {missing})" if missing else "", _fmt(info["train_loss"]),
            f" | val {info['val_accuracy']:.2f}%" if "val_accuracy" in info else "",
            len(self.state.pending))
        if self.on_round is not None:
            self.on_round(rnd, info)



class _FlowerRoundLines(logging.Filter):
    """Drops the per-round lines of Flower's own strategies (``aggregate_train:
    Received 9 results and 1 failures``): the service's round line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return "/flwr/serverapp/strategy/" not in path or record.levelno > logging.INFO


def _loss(metrics: MetricRecord | None) -> float:
    if not metrics:
        return float("nan")
    for key, value in metrics.items():
        if "loss" in key and isinstance(value, (int, float)):
            return float(value)
    return float("nan")

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
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid

from . import federation
from .arrays import records
from .audit import AuditLog, audit_path, model_digest
from .files import atomic_write, write_json
from .metrics import flops_per_sample
from .protocol import (CONFIG_KEY, MODEL_KEY, NUM_EXAMPLES, QUERY_UNLEARN, RECEIPT_ACK, RECEIPT_RECORD,
                       REPLY_TIMEOUT_S, reply_timeout)
from .requests import (REQUEST_RECORD, UnlearningRequest, merge_conflict, merge_requests,
                       request_to_config)
from .strategies.base import (Phase, UnlearningContext, UnlearningFailed, UnlearningStrategy)

CHECKPOINT_FILE = "checkpoint.pt"
VERSIONS_FILE = "versions.json"
VERSIONS_DIR = "versions"
STATE_FORMAT = 1
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


@dataclass
class PendingRequest:
    """An accepted request waiting for an unlearning step."""

    node: int
    request: UnlearningRequest
    round: int
    accepted_at: float
    attempts: int = 0
    next_try: int = 0
    warned: bool = False

    def as_dict(self) -> dict:
        return {"node": self.node, "request": _request_dict(self.request), "round": self.round,
                "accepted_at": self.accepted_at, "attempts": self.attempts,
                "next_try": self.next_try, "warned": self.warned}

    @classmethod
    def from_dict(cls, d: dict) -> PendingRequest:
        return cls(int(d["node"]), _request_from_dict(d["request"]), int(d["round"]),
                   float(d["accepted_at"]), int(d["attempts"]), int(d["next_try"]),
                   bool(d["warned"]))


@dataclass
class ServiceState:
    """What the checkpoint holds (besides the model and the momentum)."""

    round: int = 0
    version: int = 0
    view: dict[int, int] = field(default_factory=dict)
    reports: dict[int, dict] = field(default_factory=dict)
    pending: list[PendingRequest] = field(default_factory=list)
    #: node -> every request honoured for it so far, merged.
    served: dict[int, UnlearningRequest] = field(default_factory=dict)
    served_fully: set[int] = field(default_factory=set)
    #: (node, digest) of every request honoured or failed: a copy sent again is ignored.
    seen: set[tuple[int, str]] = field(default_factory=set)
    seen_inbox: set[str] = field(default_factory=set)
    failed: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    #: Receipts decided but not yet known to be sent (sent again after a resume).
    outbox: list[dict] = field(default_factory=list)
    method: str = ""
    model_keys: list[str] = field(default_factory=list)
    last_version_round: int = 0

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "round": self.round, "version": self.version,
                "view": {str(k): v for k, v in self.view.items()},
                "reports": {str(k): v for k, v in self.reports.items()},
                "pending": [p.as_dict() for p in self.pending],
                "served": {str(k): _request_dict(r) for k, r in self.served.items()},
                "served_fully": sorted(self.served_fully),
                "seen": sorted([n, d] for n, d in self.seen),
                "seen_inbox": sorted(self.seen_inbox), "failed": self.failed,
                "steps": self.steps, "outbox": self.outbox, "method": self.method,
                "model_keys": self.model_keys, "last_version_round": self.last_version_round}

    @classmethod
    def from_json(cls, d: dict) -> ServiceState:
        if d.get("format") != STATE_FORMAT:
            raise ServiceError(f"checkpoint format {d.get('format')!r}: this fedunlearn "
                               f"reads format {STATE_FORMAT}")
        return cls(round=int(d["round"]), version=int(d["version"]),
                   view={int(k): int(v) for k, v in d["view"].items()},
                   reports={int(k): v for k, v in d["reports"].items()},
                   pending=[PendingRequest.from_dict(p) for p in d["pending"]],
                   served={int(k): _request_from_dict(r) for k, r in d["served"].items()},
                   served_fully={int(n) for n in d["served_fully"]},
                   seen={(int(n), str(x)) for n, x in d["seen"]},
                   seen_inbox=set(d["seen_inbox"]), failed=list(d["failed"]),
                   steps=list(d["steps"]), outbox=list(d["outbox"]), method=d["method"],
                   model_keys=list(d["model_keys"]),
                   last_version_round=int(d["last_version_round"]))


@dataclass
class ServiceOutcome:
    """What :meth:`UnlearningService.run` returns."""

    arrays: ArrayRecord = field(repr=False)
    round: int
    version: int
    stopped: str
    steps: list[dict]
    failed: list[dict]
    pending: list[dict]
    resumed_from: int | None
    versions: list[dict]


def _request_dict(r: UnlearningRequest) -> dict:
    return {"scope": r.scope, "partition_id": r.partition_id, "classes": list(r.classes),
            "sample_ids": list(r.sample_ids), "node_id": r.node_id,
            "inbox_ids": list(r.inbox_ids)}


def _request_from_dict(d: dict) -> UnlearningRequest:
    return UnlearningRequest(scope=d["scope"], partition_id=int(d["partition_id"]),
                             classes=tuple(d["classes"]), sample_ids=tuple(d["sample_ids"]),
                             node_id=int(d["node_id"]), inbox_ids=tuple(d["inbox_ids"]))


def _atomic_json(path: Path, value) -> None:
    write_json(path, value, indent=1, sort_keys=True)


def read_versions(state_dir: str | os.PathLike) -> list[dict]:
    """The versions a service published in ``state_dir`` (oldest first): ``version``,
    ``round``, ``sha256``, ``path``, ``kind`` (``start``, ``unlearned``, ``trained``,
    ``final``), ``honours`` (the requests it honours: node, scope, inbox ids, digest),
    ``published_at``."""
    path = Path(state_dir) / VERSIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {VERSIONS_FILE} in {state_dir}: not a service state "
                                "directory (service.state-dir / UnlearningService(state_dir=))")
    return json.loads(path.read_text())["versions"]


def honoured_by(versions: list[dict], request_id: str) -> list[dict]:
    """The versions that honour inbox request ``request_id`` (the first one honoured it;
    later ones keep it honoured)."""
    first = next((v["version"] for v in versions for h in v.get("honours", [])
                  if request_id in h.get("inbox_ids", [])), None)
    return [] if first is None else [v for v in versions if v["version"] >= first]


class _RoundAudit:
    """The audit log, with the service's round and version on every record."""

    def __init__(self, audit: AuditLog, where: Callable[[], dict]) -> None:
        self.inner, self.where = audit, where

    def record(self, event: str, **fields):
        return self.inner.record(event, **{**self.where(), **fields})

    def __getattr__(self, name):
        return getattr(self.inner, name)


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


class UnlearningService:
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
        ``evaluate_fn(arrays) -> dict`` on the server's own data, measured for each
        published version (e.g. ``{"test": 97.1}``).
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
    """

    def __init__(self, method: UnlearningStrategy | None = None, *,
                 state_dir: str | os.PathLike,
                 config: ServiceConfig | None = None, evaluate_fn: Callable | None = None,
                 model_fn: Callable | None = None, example_input=None,
                 stop: Callable[[], bool] | None = None,
                 on_round: Callable[[int, dict], None] | None = None,
                 reply_timeout: float = REPLY_TIMEOUT_S, run_config_requests: bool = False,
                 context_defaults: dict | None = None, note_interrupted: bool = True,
                 verbose: bool = False) -> None:
        if method is None:  # NoT with the default recovery
            from .strategies import get_method

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
        method.check_ready()
        self.method, self.config = method, config
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.evaluate_fn, self.stop, self.on_round = evaluate_fn, stop, on_round
        self.model_fn = model_fn if model_fn is not None else method._model_fn
        self.example_input = (example_input if example_input is not None
                              else method._example_input)
        self.reply_timeout = reply_timeout
        self.run_config_requests = bool(run_config_requests)
        self.context_defaults = dict(context_defaults or {})
        self.note_interrupted = note_interrupted
        self.verbose = bool(verbose)

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
        run = federation.run_id_of(grid)
        self.run_id = run
        audit = AuditLog(audit_path(self.state_dir), run)
        self.audit = _RoundAudit(audit, lambda: {"round": self.state.round,
                                                 "version": self.state.version})
        self.grid = federation.GuardedGrid(grid, self.audit, self.reply_timeout)
        self.started = time.monotonic()
        self.trainer = _Trainer(seed=self.config.seed)
        self._check_model(arrays)
        loaded = self.load()
        self.state = loaded[0] if loaded is not None else ServiceState()
        try:
            return self._serve(arrays, verified, audit, loaded, grid)
        except BaseException as err:  # said in the log: no later run takes it for a crash
            self.audit.record("service.failed", error=f"{type(err).__name__}: {err}"[:1000])
            raise

    def _serve(self, arrays, verified, audit, loaded, grid) -> ServiceOutcome:
        resumed_from = None
        if loaded is None:
            self.state = ServiceState(method=self.method.name, model_keys=list(arrays.keys()))
            self.arrays, self.momentum = arrays, None
            self._interrupted(audit)
            self.audit.record("service.started", method=self.method.name,
                              config=dataclasses.asdict(self.config),
                              model=model_digest(arrays))
            self.verify(verified)
            self.publish("start", [])
            self.checkpoint()
        else:
            self.state, self.arrays, self.momentum = loaded
            self._interrupted(audit)
            self._check_resume(arrays)
            resumed_from = self.state.round
            log(INFO, "[service] resumed from %s: round %d, version %d, %d pending request(s)",
                self.state_dir / CHECKPOINT_FILE, self.state.round, self.state.version,
                len(self.state.pending))
            self.audit.record("service.resumed", method=self.method.name,
                              model=model_digest(self.arrays),
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
        self.audit.record("service.finished", stopped=stopped, model=model_digest(self.arrays),
                          pending=len(self.state.pending))
        log(INFO, "[service] stopped at round %d (%s): version %d, %d step(s), %d pending, "
            "%d failed; versions in %s", self.state.round, stopped, self.state.version,
            len(self.state.steps), len(self.state.pending), len(self.state.failed),
            self.state_dir / VERSIONS_DIR)
        return ServiceOutcome(self.arrays, self.state.round, self.state.version, stopped,
                              list(self.state.steps), list(self.state.failed),
                              [p.as_dict() for p in self.state.pending], resumed_from,
                              read_versions(self.state_dir))

    def budget_spent(self) -> str:
        c = self.config
        if c.rounds and self.state.round >= c.rounds:
            return f"round budget {c.rounds} reached"
        if c.wall_s and time.monotonic() - self.started >= c.wall_s:
            return f"wall-clock budget {c.wall_s:g} s spent"
        return ""

    # -- the federation ---------------------------------------------------------------
    def verify(self, verified=None) -> None:
        """Fix the federation's view from the nodes' reports (as :func:`serve` does)."""
        if verified is not None:
            view, reports = verified
            view = {int(n): int(p) for n, p in view.items()}
            self.grid.verify(view)
            self.grid.reports = dict(reports)
            self.state.view, self.state.reports = view, dict(reports)
            self.audit.record("federation.verified", nodes=dict(sorted(view.items())))
            return
        nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            raise ServiceError("no node is connected to the grid")
        replies = federation.query(self.grid, nodes, run_config_requests=False,
                                   want_request=False)
        reports = federation.node_reports(replies)
        if not reports:
            why = sorted({r.error.reason for r in replies if r.has_error()})
            raise ServiceError(f"no node answered the partition check (asked {nodes})"
                               + (f": {'; '.join(w[:300] for w in why[:3])}" if why else ""))
        answered = sorted(reports)
        view = {n: int(reports[n].get("partition-id", i)) for i, n in enumerate(answered)}
        self.grid.verify(view)
        self.grid.reports = reports
        self.state.view, self.state.reports = view, reports
        self.audit.record("federation.verified", nodes=dict(sorted(view.items())))

    def rejoin_simulation(self, grid: Grid) -> None:
        """A resumed *simulation* gets new node ids (every node restarted with the new
        run): when none of the checkpoint's nodes is connected, the nodes are matched by
        the partition each reports, and only when every partition of the checkpoint is
        claimed by exactly one node. A deployment is never remapped: SuperNodes keep
        their ids across ServerApp restarts, and a node that comes back under a new id
        stays outside the federation (a forgotten node never trains again)."""
        view = self.state.view
        connected = set(grid.get_node_ids())
        if not view or set(view) & connected or federation.is_deployment(grid):
            return
        replies = federation.query(grid, sorted(connected), run_config_requests=False,
                                   want_request=False)
        reports = federation.node_reports(replies)
        claims: dict[int, list[int]] = {}
        for node, report in reports.items():
            if "partition-id" in report:
                claims.setdefault(int(report["partition-id"]), []).append(node)
        if sorted(claims) != sorted(view.values()) or any(len(v) > 1 for v in claims.values()):
            raise ServiceError(
                f"none of the checkpoint's nodes {sorted(view)} is connected, and the "
                f"connected nodes' partitions {sorted(claims)} do not match the "
                f"checkpoint's {sorted(view.values())} one to one: cannot resume this "
                f"federation from {self.state_dir}")
        new = {old: claims[part][0] for old, part in view.items()}
        s = self.state
        s.view = {new[n]: p for n, p in view.items()}
        s.reports = {new[n]: reports[new[n]] for n in view}
        for p in s.pending:
            p.node = new[p.node]
            p.request = dataclasses.replace(p.request, node_id=p.node)
        s.served = {new[n]: dataclasses.replace(r, node_id=new[n]) for n, r in s.served.items()}
        s.served_fully = {new[n] for n in s.served_fully}
        s.seen = {(new.get(n, n), d) for n, d in s.seen}
        for item in s.outbox:
            item["node"] = new.get(item["node"], item["node"])
        log(INFO, "[service] a new simulation run: nodes matched to the checkpoint's by "
            "partition (%d nodes)", len(new))
        self.audit.record("federation.rejoined", nodes={str(v): view[k] for k, v in new.items()},
                          previous={str(k): p for k, p in view.items()})

    def trainable(self) -> list[int]:
        gone = {n for n, r in self.state.served.items() if r.scope == "client"}
        gone |= self.state.served_fully
        return [n for n in sorted(self.state.view) if n not in gone]

    def collect(self) -> None:
        """Ask the trainable nodes for requests; keep the new valid ones pending."""
        # Every connected node of the view, forgotten ones too: a request filed on a
        # node forgotten client-wise gets its answer (rejected, with the reason).
        connected = set(self.grid.get_node_ids())
        nodes = [n for n in sorted(self.state.view)
                 if n in connected and n not in self.grid.departed]
        if not nodes:
            return
        replies = federation.query(self.grid, nodes,
                                   run_config_requests=self.run_config_requests)
        fresh, conflicts = [], []
        for reply in replies:
            if not reply.has_error() and REQUEST_RECORD in reply.content.config_records:
                node = int(reply.metadata.src_node_id)
                record = reply.content.config_records[REQUEST_RECORD]
                if self._known(node, record):
                    del reply.content[REQUEST_RECORD]
                else:
                    conflict = self._conflict(node, record)
                    if conflict is not None:
                        conflicts.append((node, *conflict))
                        del reply.content[REQUEST_RECORD]
            fresh.append(reply)
        reports = dict(self.state.reports)
        accepted, rejected = federation.collect_valid_requests(
            fresh, None, verified=self.state.view, audit=self.audit, reports=reports)
        self.state.reports = reports
        self.grid.reports = reports
        for node, request, reason in conflicts:
            log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
            self.audit.record("request.received", node=node, scope=request.scope,
                              digest=request.digest(), inbox_ids=list(request.inbox_ids))
            self.audit.record("request.rejected", node=node, reason=reason, by="service")
            rejected.append({"node_id": node, "reason": reason,
                             "inbox_ids": list(request.inbox_ids)})
        receipts: dict[int, list] = {}
        for node, request in sorted(accepted.items()):
            earlier = self.state.served.get(node)
            reason = merge_conflict(earlier, request) if earlier is not None else None
            queued = next((p for p in self.state.pending if p.node == node), None)
            if reason is None and queued is not None:
                reason = merge_conflict(queued.request, request)
            if reason is not None:
                log(WARNING, "[service] request from node %d rejected: %s", node, reason)
                self.audit.record("request.rejected", node=node, reason=reason, by="service")
                rejected.append({"node_id": node, "reason": reason,
                                 "inbox_ids": list(request.inbox_ids)})
                continue
            if queued is not None:  # the node filed more before its earlier one was served
                queued.request = merge_requests(queued.request, request)
            else:
                self.state.pending.append(PendingRequest(node, request, self.state.round,
                                                         time.time()))
            if request.inbox_ids:
                receipts.setdefault(node, []).append(federation.receipt_record(
                    request.inbox_ids, "accepted", self.run_id,
                    model_before_sha256=model_digest(self.arrays), round=self.state.round,
                    version=self.state.version))
        for entry in rejected:
            if entry.get("inbox_ids"):
                receipts.setdefault(entry["node_id"], []).append(federation.receipt_record(
                    entry["inbox_ids"], "rejected", self.run_id, reason=entry["reason"]))
                self.state.seen_inbox.update(entry["inbox_ids"])
        self.checkpoint()  # accepted requests are never lost from here on
        if receipts:
            federation.send_receipts(self.grid, receipts, audit=self.audit)

    def _conflict(self, node: int, record) -> tuple[UnlearningRequest, str] | None:
        """A well-formed request that cannot be served on top of what the node already
        forgets (or has pending): the request and why (checked before it is accepted)."""
        try:
            request = UnlearningRequest.from_config_record(record, node_id=node)
        except ValueError:
            return None  # malformed: rejected with its reason by the usual checks
        earlier = self.state.served.get(node)
        reason = merge_conflict(earlier, request) if earlier is not None else None
        queued = next((p for p in self.state.pending if p.node == node), None)
        if reason is None and queued is not None:
            reason = merge_conflict(queued.request, request)
        return None if reason is None else (request, reason)

    def _known(self, node: int, record) -> bool:
        """A request this service already holds (pending), honoured or failed: the node
        sends an accepted request again until it is honoured."""
        ids = [str(i) for i in record.get("inbox-ids", [])] if hasattr(record, "get") else []
        pending_ids = {i for p in self.state.pending for i in p.request.inbox_ids}
        if ids:
            return all(i in pending_ids or i in self.state.seen_inbox for i in ids)
        try:
            request = UnlearningRequest.from_config_record(record, node_id=node)
        except ValueError:
            return False
        digest = request.digest()
        if (node, digest) in self.state.seen:
            return True
        return any(p.node == node and p.request.digest() == digest for p in self.state.pending)

    def deadlines(self) -> None:
        c, now = self.config, time.time()
        for p in self.state.pending:
            if p.warned:
                continue
            share = self._deadline_share(p, now)
            if share is not None and share >= c.warn_at:
                p.warned = True
                log(WARNING, "[service] request of node %d (%s, accepted at round %d) is at "
                    "%.0f%% of its deadline and still pending", p.node, p.request.scope,
                    p.round, 100 * share)
                self.audit.record("request.deadline_near", node=p.node, scope=p.request.scope,
                                  accepted_round=p.round, share=round(share, 3),
                                  inbox_ids=list(p.request.inbox_ids))

    def _deadline_share(self, p: PendingRequest, now: float) -> float | None:
        c = self.config
        shares = []
        if c.deadline_rounds:
            shares.append((self.state.round - p.round) / c.deadline_rounds)
        if c.deadline_days:
            shares.append((now - p.accepted_at) / (c.deadline_days * DAY_S))
        return max(shares) if shares else None

    def ready(self) -> bool:
        return any(p.next_try <= self.state.round for p in self.state.pending)

    # -- unlearning steps -----------------------------------------------------------------
    def _flops(self) -> None:
        self.flops = {"train": 0, "forward": 0}
        if self.model_fn is None or self.example_input is None:
            return
        classes = max((int(r.get("num-classes", 0)) for r in self.state.reports.values()),
                      default=0)
        with torch.random.fork_rng(devices=[]):
            model = self.model_fn()
            if not classes:
                with torch.no_grad():
                    classes = int(model.eval()(self.example_input[:1]).shape[-1])
            self.flops = flops_per_sample(model, tuple(self.example_input.shape[1:]), classes)

    def context(self, requests: dict[int, UnlearningRequest]) -> UnlearningContext:
        reports = self.state.reports
        fully = {n for n, r in requests.items()
                 if reports.get(n, {}).get("num-retained", 1) == 0}
        fields = dict(self.context_defaults)
        fields.update(requests=requests, fully_forgotten=fully,
                      node_partitions=dict(self.state.view), original_arrays=self.arrays,
                      model_factory=self.model_fn, example_input=self.example_input,
                      flops_per_sample=self.flops["train"],
                      forward_flops_per_sample=self.flops["forward"],
                      served=dict(self.state.served),
                      served_fully=set(self.state.served_fully))
        return UnlearningContext(**fields)

    def unlearn(self) -> None:
        """One unlearning step for every pending request due now, served together."""
        due = [p for p in self.state.pending if p.next_try <= self.state.round]
        requests = {p.node: p.request for p in due}
        strategy = self.method.fresh()
        strategy.bind(self.context(requests))
        step = len(self.state.steps) + 1
        what = ", ".join(f"node {n} ({_what(r)})" for n, r in sorted(requests.items()))
        log(INFO, "[service] unlearning step %d at round %d: %s with %s", step,
            self.state.round, what, strategy.name)
        before = model_digest(self.arrays)
        reason = strategy.refusal(requests)
        started = time.perf_counter()
        unlearned = None
        if reason is None:
            self.audit.record("unlearning.started", method=strategy.name,
                              targets=sorted(requests), model_before=before,
                              attempt=max(p.attempts for p in due) + 1)
            try:
                unlearned = strategy.unlearn(self.grid, self.arrays)
            except (UnlearningFailed, RuntimeError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"
                if self.grid.departed:
                    reason += f" (node(s) {self.grid.departed} left the federation)"
        else:
            for p in due:  # a refusal does not change by waiting
                p.attempts = self.config.method_retries
        if unlearned is None:
            self._step_failed(strategy, due, reason, before)
            return
        wall = time.perf_counter() - started
        self.arrays, self.momentum = unlearned, None  # the method's model; a fresh optimizer
        for p in due:
            earlier = self.state.served.get(p.node)
            self.state.served[p.node] = (p.request if earlier is None
                                         else merge_requests(earlier, p.request))
            if self.state.reports.get(p.node, {}).get("num-retained", 1) == 0:
                self.state.served_fully.add(p.node)
            self.state.seen.add((p.node, p.request.digest()))
            self.state.seen_inbox.update(p.request.inbox_ids)
        self.state.pending = [p for p in self.state.pending if p not in due]
        cost = strategy.cost
        honours = [dict(_request_dict(p.request), node=p.node, digest=p.request.digest(),
                        accepted_round=p.round,
                        deadline_missed=self._deadline_missed(p)) for p in due]
        for h in honours:
            h.pop("sample_ids")
        entry = self.publish("unlearned", honours)
        info = {"step": step, "round": self.state.round, "version": entry["version"],
                "method": strategy.name, "targets": sorted(requests),
                "rounds": cost.rounds, "comm_bytes": cost.comm_bytes, "flops": cost.flops,
                "wall_s": round(wall, 3), "model_sha256": entry["sha256"],
                "path": entry["path"], "metrics": entry.get("metrics", {}),
                "requests": honours,
                "filed_to_published_s": [round(time.time() - p.accepted_at, 3) for p in due]}
        self.state.steps.append(info)
        for p in due:
            if p.request.inbox_ids:
                self.state.outbox.append({"node": p.node, "status": "honoured",
                                          "request": _request_dict(p.request),
                                          "version": entry["version"], "round": self.state.round,
                                          "method": strategy.name, "sha256": entry["sha256"],
                                          "path": entry["path"], "rounds": cost.rounds,
                                          "comm_bytes": cost.comm_bytes,
                                          "deadline_missed": self._deadline_missed(p)})
        info["model_before"] = before
        info["audited"] = False
        self.checkpoint()  # served: from here on a crash never serves these again
        self.audit_steps()
        log(INFO, "[service]   %s: %d round(s), %.3g B, %.1f s; published version %d: %s "
            "(sha256 %s)", strategy.name, cost.rounds, cost.comm_bytes, wall,
            entry["version"], entry["path"], entry["sha256"][:12])
        self.flush_outbox()

    def audit_steps(self) -> None:
        """Write the audit records of honoured steps that have none yet (a crash between
        the checkpoint that marks a step served and its records is caught up on resume:
        every honoured request is recorded exactly once)."""
        pending = [step for step in self.state.steps if not step.get("audited", True)]
        for step in pending:
            self.audit.record("unlearning.finished", method=step["method"],
                              rounds=step["rounds"], comm_bytes=step["comm_bytes"],
                              wall_s=step["wall_s"], metrics=step["metrics"],
                              model_before=step["model_before"], model_after=step["model_sha256"],
                              published_version=step["version"])
            for r in step["requests"]:
                self.audit.record("request.honoured", node=r["node"], scope=r["scope"],
                                  digest=r["digest"], inbox_ids=list(r["inbox_ids"]),
                                  accepted_round=r["accepted_round"],
                                  published_version=step["version"],
                                  model=step["model_sha256"],
                                  deadline_missed=r["deadline_missed"])
            step["audited"] = True
        if pending:
            self.checkpoint()

    def _deadline_missed(self, p: PendingRequest) -> bool:
        share = self._deadline_share(p, time.time())
        return bool(share is not None and share > 1.0)

    def _step_failed(self, strategy, due: list[PendingRequest], reason: str,
                     before: str) -> None:
        c = self.config
        final = []
        for p in due:
            p.attempts += 1
            if p.attempts > c.method_retries:
                final.append(p)
            else:
                p.next_try = self.state.round + c.retry_after
        self.audit.record("unlearning.failed", method=strategy.name, reason=reason[:2000],
                          model_before=before, targets=sorted(p.node for p in due),
                          final=bool(final))
        if not final:
            log(WARNING, "[service] %s failed (%s); trying again at round %d", strategy.name,
                reason, due[0].next_try)
            self.checkpoint()
            return
        log(WARNING, "[service] %s failed (%s) after %d attempt(s): the request(s) of "
            "node(s) %s fail", strategy.name, reason, final[0].attempts,
            [p.node for p in final])
        for p in final:
            self.state.seen.add((p.node, p.request.digest()))
            self.state.seen_inbox.update(p.request.inbox_ids)
            self.state.failed.append({"node": p.node, "request": _request_dict(p.request),
                                      "round": self.state.round, "reason": reason[:2000],
                                      "method": strategy.name, "attempts": p.attempts})
            self.audit.record("request.failed", node=p.node, scope=p.request.scope,
                              digest=p.request.digest(), inbox_ids=list(p.request.inbox_ids),
                              reason=reason[:2000], attempts=p.attempts)
            if p.request.inbox_ids:
                self.state.outbox.append({"node": p.node, "status": "failed",
                                          "request": _request_dict(p.request),
                                          "method": strategy.name, "round": self.state.round,
                                          "reason": f"{strategy.name} could not serve the "
                                                    f"request: {reason}"})
        self.state.pending = [p for p in self.state.pending if p not in final]
        self.checkpoint()
        self.flush_outbox()

    def flush_outbox(self) -> None:
        """Send the receipts decided so far (in one exchange). An honoured receipt
        carries the published model, so the node checks it on its own data; what it
        measured comes back and goes to the audit log and the version's entry. A receipt
        whose node cannot be reached stays in the audit log (``receipt.undelivered``)."""
        if not self.state.outbox:
            return
        connected = set(self.grid.get_node_ids())
        departed = set(self.grid.departed)
        failed: dict[int, list] = {}
        honoured: list[tuple[dict, Message]] = []
        for item in self.state.outbox:
            node = item["node"]
            request = _request_from_dict(item["request"])
            if node not in connected or node in departed:
                self.audit.record("receipt.undelivered", node=node, status=item["status"],
                                  inbox_ids=list(request.inbox_ids),
                                  reason="the node left the federation", **(
                                      {"reason_failed": item["reason"][:500]}
                                      if "reason" in item else {}))
                log(WARNING, "[service] receipt (%s) for node %d not delivered: the node "
                    "left; it stays in the audit log", item["status"], node)
            elif item["status"] == "failed":
                failed.setdefault(node, []).append(federation.receipt_record(
                    request.inbox_ids, "failed", self.run_id, method=item["method"],
                    reason=item["reason"], round=item["round"]))
            else:
                honoured.append((item, self._honoured_message(node, request, item)))
        if failed:
            federation.send_receipts(self.grid, failed, audit=self.audit)
        if honoured:
            replies = {int(r.metadata.src_node_id): r for r in self.grid.send_and_receive(
                [m for _, m in honoured], timeout=reply_timeout(self.grid))}
            for item, msg in honoured:
                node = int(msg.metadata.dst_node_id)
                self._record_check(node, item, self._honoured_reply(node, item,
                                                                    replies.get(node)))
        self.state.outbox = []
        self.checkpoint()

    def _honoured_message(self, node: int, request: UnlearningRequest, item: dict) -> Message:
        arrays = self._version_arrays(item)
        record = federation.receipt_record(
            request.inbox_ids, "honoured", self.run_id, method=item["method"],
            model_sha256=item["sha256"], rounds=item["rounds"], comm_bytes=item["comm_bytes"],
            version=item["version"], round=item["round"],
            deadline_missed=int(bool(item.get("deadline_missed"))))
        anchor = self.audit.head()
        if anchor is not None:
            record["audit-seq"], record["audit-sha256"] = int(anchor[0]), anchor[1]
        config = ConfigRecord({"max-members": 0})
        config.update(request_to_config(request))
        return Message(RecordDict({RECEIPT_RECORD: record, MODEL_KEY: arrays,
                                   CONFIG_KEY: config}),
                       dst_node_id=node, message_type=QUERY_UNLEARN)

    def _honoured_reply(self, node: int, item: dict, reply: Message | None) -> dict:
        request = _request_from_dict(item["request"])
        if reply is None or reply.has_error():
            why = reply.error.reason if reply is not None else "no reply"
            log(WARNING, "[service] node %d did not take its honoured receipt: %s", node, why)
            self.audit.record("receipt.undelivered", node=node, status="honoured",
                              inbox_ids=list(request.inbox_ids), reason=why[:500])
            return {}
        ack = reply.content.config_records.get(RECEIPT_ACK, ConfigRecord())
        check = {k[len("check-"):]: v for k, v in ack.items() if k.startswith("check-")}
        written = ack.get("written", 0)
        self.audit.record("receipt.sent", node=node, status="honoured",
                          inbox_ids=list(request.inbox_ids), written=written,
                          method=item["method"], published_version=item["version"],
                          check=check)
        log(INFO, "Receipt (honoured) for inbox request(s) %s written on node %d",
            ", ".join(request.inbox_ids), node)
        return check

    def _record_check(self, node: int, item: dict, check: dict) -> None:
        if not check:
            return
        for step in self.state.steps:
            if step["version"] == item["version"]:
                step.setdefault("node_checks", {})[str(node)] = check
        versions = read_versions(self.state_dir)
        for v in versions:
            if v["version"] == item["version"]:
                v.setdefault("node_checks", {})[str(node)] = check
        _atomic_json(self.state_dir / VERSIONS_FILE, {"versions": versions})
        retained = ("nothing retained" if not check.get("retain-total") else
                    f"retained {_fmt(check.get('retain-accuracy'))}% "
                    f"(loss {_fmt(check.get('retain-loss'))})")
        log(INFO, "[service]   node %d checked version %d: hash %s; forget %s%% (loss %s), %s",
            node, item["version"], "ok" if check.get("model-sha256-ok") else "MISMATCH",
            _fmt(check.get("forget-accuracy")), _fmt(check.get("forget-loss")), retained)

    def _version_arrays(self, item: dict) -> ArrayRecord:
        if item["sha256"] == model_digest(self.arrays):
            return self.arrays
        from .service import load_model

        return load_model(item["path"])

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
            messages = list(trainer.configure_train(rnd, self.arrays, phase.config(),
                                                    self.grid))
            if not messages:
                raise ServiceError(f"round {rnd}: no node may train (every node of the "
                                   "federation was forgotten client-wise or left)")
            replies = list(self.grid.send_and_receive(messages,
                                                      timeout=reply_timeout(self.grid)))
            aggregated, metrics = trainer.aggregate_train(rnd, replies)
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

    # -- state on disk ----------------------------------------------------------------
    def publish(self, kind: str, honours: list[dict]) -> dict:
        """Write the current model as the next version (atomically) and list it."""
        versions = (read_versions(self.state_dir)
                    if (self.state_dir / VERSIONS_FILE).exists() else [])
        # From the checkpoint's version: a version written by a step that a crash cut
        # short before its checkpoint is replaced, never skipped over.
        number = 0 if kind == "start" else self.state.version + 1
        path = self.state_dir / VERSIONS_DIR / f"v{number:04d}.pt"
        state_dict = self.arrays.to_torch_state_dict()
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
        entry = {"version": number, "round": self.state.round, "kind": kind,
                 "sha256": model_digest(self.arrays), "path": str(path), "honours": honours,
                 "method": self.method.name if kind == "unlearned" else None,
                 "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.evaluate_fn is not None:
            value = self.evaluate_fn(self.arrays)
            entry["metrics"] = value if isinstance(value, dict) else {"test": float(value)}
        versions = [v for v in versions if v["version"] < number] + [entry]
        _atomic_json(self.state_dir / VERSIONS_FILE, {"versions": versions})
        self.state.version = number
        self.state.last_version_round = self.state.round
        self.audit.record("version.published", published_version=number, kind=kind,
                          model=entry["sha256"], path=str(path),
                          honours=[{k: h[k] for k in ("node", "scope", "digest", "inbox_ids")}
                                   for h in honours])
        metrics = ", ".join(f"{k} {v:.2f}%" for k, v in entry.get("metrics", {}).items()
                            if isinstance(v, (int, float)))
        log(INFO, "[service] published version %d (%s, round %d%s): %s", number, kind,
            self.state.round, f", {metrics}" if metrics else "", path)
        return entry

    def _last_digest(self) -> str:
        versions = read_versions(self.state_dir)
        return versions[-1]["sha256"] if versions else ""

    def checkpoint(self) -> None:
        """Everything the service knows, in one file, replaced atomically."""
        blob = {"model": self.arrays.to_torch_state_dict(),
                "momentum": (None if self.momentum is None
                             else [torch.from_numpy(a.copy()) for a in self.momentum]),
                "state": json.dumps(self.state.to_json())}
        atomic_write(self.state_dir / CHECKPOINT_FILE, lambda tmp: torch.save(blob, tmp))

    def load(self):
        path = self.state_dir / CHECKPOINT_FILE
        if not path.exists():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = ServiceState.from_json(json.loads(blob["state"]))
        momentum = (None if blob["momentum"] is None
                    else [t.numpy() for t in blob["momentum"]])
        return state, ArrayRecord(blob["model"]), momentum

    def _check_resume(self, arrays: ArrayRecord) -> None:
        s = self.state
        if s.method != self.method.name:
            raise ServiceError(f"{self.state_dir} holds a service of method {s.method!r}; "
                               f"this one is {self.method.name!r}: use another state_dir or "
                               "the same method")
        if list(arrays.keys()) != s.model_keys:
            raise ServiceError(f"the checkpoint in {self.state_dir} is of another model "
                               f"(its keys {s.model_keys[:3]}..., given {list(arrays)[:3]}...)")
        bad = [k for k in s.model_keys
               if tuple(arrays[k].shape) != tuple(self.arrays[k].shape)]
        if bad:
            raise ServiceError(f"the checkpoint in {self.state_dir} is of another model: "
                               f"shapes differ for {bad[:3]} (checkpoint "
                               f"{[tuple(self.arrays[k].shape) for k in bad[:3]]}, given "
                               f"{[tuple(arrays[k].shape) for k in bad[:3]]})")

    def _check_model(self, arrays: ArrayRecord) -> None:
        """With a model factory, ``arrays`` must be that model's (names and shapes):
        checked before anything is written, not by every node at its first round."""
        if self.model_fn is None:
            return
        with torch.random.fork_rng(devices=[]):
            expected = {k: tuple(v.shape) for k, v in self.model_fn().state_dict().items()}
        given = {k: tuple(arrays[k].shape) for k in arrays.keys()}
        if given != expected:
            missing = sorted(set(expected) - set(given))[:3]
            extra = sorted(set(given) - set(expected))[:3]
            shapes = [k for k in expected if k in given and given[k] != expected[k]][:3]
            raise ValueError(
                "arrays are not the model model_fn builds: "
                + "; ".join(part for part in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {extra}" if extra else "",
                    f"other shapes for {shapes}" if shapes else "") if part)
                + " (pass the ArrayRecord of model_fn()'s state dict)")

    def _interrupted(self, audit: AuditLog) -> None:
        if not self.note_interrupted:
            return
        try:
            record = audit.note_interrupted()
        except OSError as err:
            log(WARNING, "could not read the audit log's last record: %s", err)
            return
        if record is not None:
            log(WARNING, "[service] the previous run on %s (run %s) did not finish: its last "
                "record is %s (seq %s)", audit.path, record["interrupted_run"],
                record["last_event"], record["last_seq"])


class _FlowerRoundLines(logging.Filter):
    """Drops the per-round lines of Flower's own strategies (``aggregate_train:
    Received 9 results and 1 failures``): the service's round line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return "/flwr/serverapp/strategy/" not in path or record.levelno > logging.INFO


def _key(name: str) -> str:
    """A ServiceConfig field as the error names it: the field and its run-config key."""
    return f"ServiceConfig {name} (run-config service.{name.replace('_', '-')})"


def _what(r: UnlearningRequest) -> str:
    if r.scope == "class":
        return f"class-wise {list(r.classes)}"
    if r.scope == "instance":
        return f"instance-wise, {len(r.sample_ids)} sample(s)"
    return "client-wise"


def _loss(metrics: MetricRecord | None) -> float:
    if not metrics:
        return float("nan")
    for key, value in metrics.items():
        if "loss" in key and isinstance(value, (int, float)):
            return float(value)
    return float("nan")


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


__all__ = ["ServiceConfig", "ServiceError", "ServiceOutcome", "UnlearningService",
           "honoured_by", "read_versions"]

"""Unlearning from a user's own ServerApp: :func:`serve`.

A Flower user trains with their own strategy (Flower's ``FedAvg`` or any other), then
calls :func:`serve` with the grid, their current model and one or more fedunlearn
strategies. It

1. asks every node for its unlearning request (``query.unlearn``): a node answers with
   what its data owner filed (its inbox, its node-config) and with counts about its own
   data (how many samples it holds, forgets and keeps; which labels), never the data;
2. checks each request with what the nodes reported and fixes the federation's view
   (a node that joins later or under a new id takes no part);
3. runs each strategy from the user's model (the unlearning step, then recovery),
   asks the targets how the unlearned model does on their forget and retained data,
   writes the model atomically (``<output_dir>/<method>/model.pt`` with its SHA-256),
   and records everything in the audit log and the inbox receipts;
4. returns a :class:`ServeOutcome`: the unlearned ``ArrayRecord`` (of the last method
   that finished), a report of every request and method, and each method's outcome.

The server never needs the nodes' data. A method that cannot serve the requests is
refused up front with the reason; a method that fails mid-way is reported as failed
(``failed.json`` with the reason) and returns no model; the other methods still run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from . import federation
from .arrays import check_model_arrays
from .audit import AuditLog, audit_path, model_digest
from .files import FAILED_FILE, save_state_dict, write_json
from .ledger import Ledger
from .lifecycle import MethodRun, run_method
from .metrics import flops_per_sample
from .parsing import WireError
from .protocol import EVALUATE_UNLEARN, MODEL_KEY, REPLY_TIMEOUT_S, reply_timeout
from .replies import parse_evaluate_reply
from .requests import request_to_config
from .strategies.base import UnlearningContext, UnlearningStrategy

MODEL_FILE = "model.pt"
RESULT_FILE = "results.json"


@dataclass
class MethodOutcome:
    """What one method did: its model (``None`` if it failed or was refused)."""

    method: str
    status: str  # "honoured", "refused" or "failed"
    arrays: ArrayRecord | None = None
    reason: str = ""
    model_path: str = ""
    model_sha256: str = ""
    rounds: int = 0
    comm_bytes: int = 0
    flops: int = 0
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)
    """``test`` (from ``evaluate_fn``), ``forget`` and ``retain`` (accuracy % reported by
    the target nodes on their own forget / retained data)."""
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"method": self.method, "status": self.status, "reason": self.reason,
                "model_path": self.model_path, "model_sha256": self.model_sha256,
                "rounds": self.rounds, "comm_bytes": self.comm_bytes, "flops": self.flops,
                "wall_s": round(self.wall_s, 3), "metrics": self.metrics,
                "notes": self.notes}


@dataclass
class ServeOutcome:
    """The result of :func:`serve`."""

    arrays: ArrayRecord
    """The unlearned model of the last method that finished (the input model when no
    request was accepted or no method finished)."""
    methods: dict[str, MethodOutcome]
    report: dict

    @property
    def honoured(self) -> bool:
        return any(m.status == "honoured" for m in self.methods.values())

    def table(self) -> str:
        """One line per method: test, forget and retain accuracy, rounds, bytes, model."""
        rows = [f"{'method':<10} {'status':<9} {'test':>7} {'forget':>7} {'retain':>7} "
                f"{'rounds':>6} {'comm (B)':>10} {'FLOPs':>9}  model (sha256)"]
        for m in self.methods.values():
            def pct(key):
                v = m.metrics.get(key)
                return f"{v:7.2f}" if isinstance(v, float) and v == v else f"{'-':>7}"
            model = f"{m.model_path} ({m.model_sha256[:12]})" if m.model_path else m.reason
            rows.append(f"{m.method:<10} {m.status:<9} {pct('test')} {pct('forget')} "
                        f"{pct('retain')} {m.rounds:>6} {m.comm_bytes:>10.3g} {m.flops:>9.3g}  {model}")
        return "\n".join(rows)


def serve(grid: Grid, arrays: ArrayRecord,
          strategies: UnlearningStrategy | Sequence[UnlearningStrategy], *,
          output_dir: str | os.PathLike, evaluate_fn: Callable | None = None,
          history=None, model_fn: Callable | None = None, example_input=None,
          run_id: int | None = None, audit: bool = True,
          reply_timeout: float = REPLY_TIMEOUT_S) -> ServeOutcome:
    """Collect the nodes' unlearning requests and serve them with ``strategies``.

    Parameters
    ----------
    grid : Grid
        The grid of the user's ``@app.main()``.
    arrays : ArrayRecord
        The current global model (e.g. ``FedAvg(...).start(...).arrays``).
    strategies : UnlearningStrategy or list of them
        Built with explicit arguments, e.g. ``NoT(Recovery(rounds=11), model_fn=Net)``;
        each runs from ``arrays``.
    output_dir : path
        Where each method's ``model.pt`` and ``results.json`` (or ``failed.json``) and the
        audit log (``audit.jsonl``) go.
    evaluate_fn : callable, optional
        ``evaluate_fn(arrays) -> dict`` or ``-> float`` on the server's own data (e.g.
        ``{"test": 97.2}``, accuracy in %); the server holds no client data, so test
        accuracy comes only from here.
    history : HistoryKeeper or TrainingHistory, optional
        The training history FedEraser, FUKD and PGD replay: the
        :class:`fedunlearn.HistoryKeeper` that wrapped the strategy which trained
        ``arrays`` (or its ``.history``). Without one those methods are refused.
    model_fn, example_input : optional
        The model factory and one input batch, to count FLOPs
        (``torch.utils.flop_counter``); default: those of the first strategy given both.
        Without them the report's FLOPs count only server-side arithmetic.
    reply_timeout : float
        Seconds to wait for the nodes' replies in any exchange (default 600): a node
        that has not answered by then failed that round.
    """
    strategies, names = _checked_strategies(strategies)
    for s in strategies:
        s.check_ready()
    history = _training_history(history)
    if model_fn is None or example_input is None:
        model_fn, example_input = _flop_model(strategies, model_fn, example_input)
    _checked_arrays(arrays, strategies, model_fn)  # before any request is accepted
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = federation.run_id_of(grid) if run_id is None else int(run_id)
    log_ = AuditLog(audit_path(out), run)
    guarded = federation.GuardedGrid(grid, log_ if audit else None, reply_timeout)
    ledger = Ledger(log_, guarded, run)
    ledger.interrupted()
    log_.record("serve.started", methods=names, model_before=model_digest(arrays),
                history=str(history.directory) if history is not None else None)
    try:
        return _serve(guarded, ledger, log_, arrays, strategies, out, evaluate_fn, history,
                      model_fn, example_input)
    except BaseException as err:
        log_.record("serve.failed", error=f"{type(err).__name__}: {err}"[:1000])
        raise


def _checked_strategies(strategies) -> tuple[list[UnlearningStrategy], list[str]]:
    """``(strategies, names)``: ``serve()``'s strategies as a non-empty list of distinct
    fedunlearn strategies, and their method names."""
    if isinstance(strategies, UnlearningStrategy):
        strategies = [strategies]
    strategies = list(strategies)
    if not strategies:
        raise ValueError("serve() needs at least one unlearning strategy")
    for s in strategies:
        if not isinstance(s, UnlearningStrategy):
            raise TypeError(f"{s!r} is not a fedunlearn strategy (UnlearningStrategy)")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"serve() got a method twice: {names}")
    return strategies, names


def _checked_arrays(arrays, strategies, model_fn) -> None:
    """``arrays`` must be a non-empty ArrayRecord and, with a model factory (given or a
    strategy's), that model's state (names, shapes, floating dtypes)."""
    if not isinstance(arrays, ArrayRecord) or not len(arrays):
        raise ValueError("arrays must be the model's non-empty ArrayRecord")
    factory = model_fn or next((s._model_fn for s in strategies if s._model_fn), None)
    if factory is not None:
        check_model_arrays(arrays, factory)


def _training_history(history):
    """The TrainingHistory of ``serve(history=...)`` (a HistoryKeeper's ``.history``),
    or ``None``."""
    from .history_keeper import HistoryKeeper

    if isinstance(history, HistoryKeeper):
        if history.history is None:
            raise ValueError("serve(history=...): the HistoryKeeper has recorded nothing yet "
                             "(call keeper.start(grid, arrays, num_rounds) first)")
        history = history.history
    if history is not None and not hasattr(history, "manifest"):
        raise TypeError(f"history={history!r}: expected a fedunlearn.HistoryKeeper or a "
                        "TrainingHistory")
    return history


def _flop_model(strategies: list[UnlearningStrategy], model_fn, example_input):
    """``(model_fn, example_input)`` to count FLOPs with: those of the first strategy
    given both, else the ones passed."""
    for s in strategies:
        if s._model_fn is not None and s._example_input is not None:
            return s._model_fn, s._example_input
    return model_fn, example_input


def _serve(guarded, ledger, log_, arrays, strategies, out, evaluate_fn, history, model_fn,
           example_input) -> ServeOutcome:
    nodes = sorted(guarded.get_node_ids())
    if not nodes:
        raise RuntimeError("serve(): no node is connected to the grid")
    replies = federation.query(guarded, nodes, run_config_requests=False)
    reports: dict[int, dict] = {}
    accepted, rejected = federation.collect_valid_requests(
        replies, None, audit=log_, reports=reports)
    answered = sorted(reports)
    view = {n: federation.node_label(n, reports[n]) for n in answered}
    guarded.verify(view)
    guarded.reports = reports
    ledger.verified(view)
    ledger.verdicts(accepted, rejected, arrays)
    report = {"nodes": answered, "accepted": [dict(r.describe(), node_id=n)
                                              for n, r in sorted(accepted.items())],
              "rejected": rejected, "model_before": model_digest(arrays)}
    outcomes: dict[str, MethodOutcome] = {}
    if not accepted:
        log(INFO, "fedunlearn.serve: no valid unlearning request (%d rejected); the model "
            "is unchanged", len(rejected))
        log_.record("serve.finished", honoured=[])
        return ServeOutcome(arrays, outcomes, report)
    fully = {n for n, r in accepted.items() if reports.get(n, {}).get("num-retained", 1) == 0}
    flops = {"train": 0, "forward": 0}
    if model_fn is not None and example_input is not None:
        classes = max((int(r.get("num-classes", 0)) for r in reports.values()), default=0)
        with torch.random.fork_rng(devices=[]):  # the user's random state stays as it was
            model = model_fn()
            if not classes:
                with torch.no_grad():
                    classes = int(model.eval()(example_input[:1]).shape[-1])
            flops = flops_per_sample(model, tuple(example_input.shape[1:]), classes)
    context = UnlearningContext(requests=accepted, fully_forgotten=fully,
                                node_partitions=view, original_arrays=arrays,
                                model_factory=model_fn, example_input=example_input,
                                flops_per_sample=flops["train"],
                                forward_flops_per_sample=flops["forward"], history=history)
    final = arrays
    for strategy in strategies:
        strategy.bind(context)
        run = run_method(strategy, guarded, arrays, accepted, ledger,
                         lambda run: _publish(guarded, strategy, run, accepted, report, out,
                                              evaluate_fn, outcomes),
                         departed=lambda: guarded.departed)
        if run.status == "refused":
            log(WARNING, "[%s] refused: %s", run.method, run.reason)
        elif run.status == "failed":
            log(WARNING, "[%s] FAILED: %s", run.method, run.reason)
        if run.status != "honoured":
            outcomes[run.method] = MethodOutcome(run.method, run.status, reason=run.reason,
                                                 wall_s=run.wall_s)
            write_json(out / run.method / FAILED_FILE, outcomes[run.method].as_dict())
            continue
        final = run.arrays
    log_.record("serve.finished",
                honoured=[n for n, o in outcomes.items() if o.status == "honoured"],
                failed=[n for n, o in outcomes.items() if o.status == "failed"])
    return ServeOutcome(final, outcomes, report)


def _publish(grid, strategy, run: MethodRun, accepted, report, out: Path, evaluate_fn,
             outcomes: dict) -> dict:
    """serve()'s publication of an honoured run: the targets' measurements, the server's
    own evaluation, ``model.pt`` with its hash and ``results.json``."""
    name, unlearned, cost = run.method, run.arrays, strategy.cost
    metrics = target_metrics(grid, unlearned, accepted)
    if evaluate_fn is not None:
        value = evaluate_fn(unlearned)
        metrics.update(value if isinstance(value, dict) else {"test": float(value)})
    path, digest = save_model(out / name / MODEL_FILE, unlearned)
    outcome = MethodOutcome(name, "honoured", unlearned, model_path=str(path),
                            model_sha256=digest, rounds=cost.rounds,
                            comm_bytes=cost.comm_bytes, flops=cost.flops,
                            wall_s=run.wall_s, metrics=metrics,
                            notes=_jsonable(strategy.notes))
    outcomes[name] = outcome
    write_json(out / name / RESULT_FILE, dict(outcome.as_dict(), request=report["accepted"],
                                              cost=strategy.cost_dict()))
    log(INFO, "[%s] honoured: %s; model %s (sha256 %s)", name,
        ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), path, digest[:12])
    return {"metrics": metrics, "model_after": digest}


def target_metrics(grid, arrays: ArrayRecord, requests: dict) -> dict:
    """Forget and retain accuracy (%) of ``arrays``, measured by the target nodes on
    their own data (counts only come back)."""
    messages = []
    for node, request in sorted(requests.items()):
        config = ConfigRecord({"max-members": 0})
        config.update(request_to_config(request))
        messages.append(Message(RecordDict({MODEL_KEY: arrays, "config": config}),
                                dst_node_id=node, message_type=EVALUATE_UNLEARN))
    sums = {"forget-correct": 0, "forget-total": 0, "retain-correct": 0, "retain-total": 0}
    failed = []
    for reply in grid.send_and_receive(messages, timeout=reply_timeout(grid)):
        try:
            if reply.has_error():
                raise WireError("reply", reply.error.reason, "expected the node's counts")
            counts = parse_evaluate_reply(reply, max_members=0).counts
        except WireError:
            failed.append(int(reply.metadata.src_node_id))
            continue
        for key in sums:
            sums[key] += counts[key]
    out = {}
    for part in ("forget", "retain"):
        total = sums[f"{part}-total"]
        out[part] = 100.0 * sums[f"{part}-correct"] / total if total and not failed else float("nan")
    if failed:
        log(WARNING, "target node(s) %s did not measure the unlearned model", failed)
    return out


def save_model(path: Path, arrays: ArrayRecord) -> tuple[Path, str]:
    """Write ``arrays`` as a torch state dict, atomically; return the path and the
    model's SHA-256 (:func:`fedunlearn.audit.model_digest`, the hash the audit log and
    the receipts name)."""
    save_state_dict(path, arrays.to_torch_state_dict())
    return path, model_digest(arrays)


def load_model(path: str | os.PathLike) -> ArrayRecord:
    """A model written by :func:`save_model`, as an ``ArrayRecord``."""
    return ArrayRecord(torch.load(path, map_location="cpu", weights_only=True))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


__all__ = ["MethodOutcome", "ServeOutcome", "load_model", "save_model", "serve",
           "target_metrics"]

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
   writes the model atomically (``<output_dir>/<method>/model.pt``; the SHA-256 of the file),
   and records everything in the audit log and the inbox receipts;
4. returns a :class:`ServeOutcome`: the unlearned ``ArrayRecord`` (of the last method
   that honoured the requests), a report of every request and method, and each method's
   outcome.

The server never needs the nodes' data. A method that cannot serve the requests is
refused up front with the reason; a method that fails mid-way is reported as failed
(``failed.json`` with the reason) and returns no model; one whose recovery diverged is
``degraded`` (:mod:`.serve_checks`); the other methods still run. When no node could
answer the query, or no method honoured the accepted requests, ``serve()`` raises
:class:`~fedunlearn.serve_checks.ServeError` once everything is recorded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from .logs import log
from flwr.serverapp import Grid

from . import federation
from .arrays import check_model_arrays
from .audit import AuditLog, audit_path, model_digest
from .files import FAILED_FILE, save_state_dict_sha256, write_json
from .ledger import Ledger
from .lifecycle import MethodRun, run_method
from .metrics import flops_per_sample
from .parsing import WireError
from .protocol import EVALUATE_UNLEARN, MODEL_KEY, REPLY_TIMEOUT_S, reply_timeout
from .replies import parse_evaluate_reply
from .requests import request_to_config
from .serve_outcome import PARTIAL_FLOPS, MethodOutcome, ServeOutcome
from .serve_checks import (
    MAX_ACCURACY_DROP,
    DivergenceCheck,
    ServeError,
    no_answer_error,
    no_method_error,
    no_request_line,
    query_failures,
    unmeasured_note,
)
from .server_evaluation import ServerEvaluation
from .strategies.base import UnlearningContext, UnlearningStrategy

MODEL_FILE = "model.pt"
RESULT_FILE = "results.json"


def serve(grid: Grid, arrays: ArrayRecord,
          strategies: UnlearningStrategy | Sequence[UnlearningStrategy], *,
          output_dir: str | os.PathLike, evaluate_fn: Callable | None = None,
          test_metric: str | None = None, history=None, model_fn: Callable | None = None,
          example_input=None, run_id: int | None = None, audit: bool = True,
          reply_timeout: float = REPLY_TIMEOUT_S,
          max_accuracy_drop: float | None = MAX_ACCURACY_DROP) -> ServeOutcome:
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
    evaluate_fn, test_metric : optional
        The server's own test accuracy: Flower's ``(server_round, arrays) -> MetricRecord
        | None`` (its ``test_metric`` entry, default ``"accuracy"``, a fraction) or
        ``(arrays) -> dict | float`` in %; if it fails the model is still published and
        ``MethodOutcome.not_measured`` says why (:mod:`fedunlearn.server_evaluation`).
    history : HistoryKeeper or TrainingHistory, optional
        The training history FedEraser, FUKD and PGD replay: the
        :class:`fedunlearn.HistoryKeeper` that wrapped the strategy which trained
        ``arrays`` (or its ``.history``). Without one those methods are refused.
    model_fn, example_input : optional
        The model factory and one input batch, to count FLOPs
        (``torch.utils.flop_counter``); default: those of the first strategy given both.
        Without them FLOPs count only server-side arithmetic (``*`` in the table).
    reply_timeout : float
        Seconds a node has to answer any exchange (default 600).
    max_accuracy_drop : float or None
        Points below the input model's test (or targets' retained) accuracy past which a
        method is ``degraded`` (default 20; :mod:`fedunlearn.serve_checks`).

    Raises :class:`ServeError` when no node could answer the query or no method honoured
    the accepted requests (each named with its reason; everything is recorded first).
    """
    strategies, names, history, model_fn, example_input, divergence = _checked_inputs(
        strategies, arrays, history, model_fn, example_input, max_accuracy_drop)
    evaluation = ServerEvaluation.of(evaluate_fn, test_metric)
    out = _output_dir(output_dir)
    run = federation.run_id_of(grid) if run_id is None else int(run_id)
    log_ = AuditLog(audit_path(out), run)
    guarded = federation.GuardedGrid(grid, log_ if audit else None, reply_timeout)
    ledger = Ledger(log_, guarded, run)
    ledger.interrupted()
    log_.record("serve.started", methods=names, model_before_arrays_sha256=model_digest(
        arrays), history=str(history.directory) if history is not None else None)
    try:
        return _serve(guarded, ledger, log_, arrays, strategies, out, evaluation, history,
                      model_fn, example_input, divergence)
    except BaseException as err:
        log_.record("serve.failed", error=f"{type(err).__name__}: {err}"[:1000])
        raise


def _output_dir(output_dir) -> Path:
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _checked_inputs(strategies, arrays, history, model_fn, example_input, max_accuracy_drop):
    """serve()'s arguments checked before any request is accepted: ``(strategies, names,
    history, model_fn, example_input, divergence check)``."""
    strategies, names = _checked_strategies(strategies)
    for s in strategies:
        s.check_ready()
    history = _training_history(history)
    if model_fn is None or example_input is None:
        model_fn, example_input = _flop_model(strategies, model_fn, example_input)
    _checked_arrays(arrays, strategies, model_fn)
    return (strategies, names, history, model_fn, example_input,
            DivergenceCheck(max_drop=max_accuracy_drop))


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


def _serve(guarded, ledger, log_, arrays, strategies, out, evaluation, history, model_fn,
           example_input, divergence) -> ServeOutcome:
    accepted, reports, view, report = _collect(guarded, ledger, log_, arrays)
    outcomes: dict[str, MethodOutcome] = {}
    if not accepted:
        log(INFO, no_request_line(len(reports), len(report["rejected"]),
                                  report["unanswered"]))
        log_.record("serve.finished", honoured=[])
        return ServeOutcome(arrays, outcomes, report)
    fully = {n for n, r in accepted.items() if reports.get(n, {}).get("num-retained", 1) == 0}
    flops = _flops_per_sample(model_fn, example_input, reports)
    context = UnlearningContext(requests=accepted, fully_forgotten=fully,
                                node_partitions=view, original_arrays=arrays,
                                model_factory=model_fn, example_input=example_input,
                                flops_per_sample=flops["train"],
                                forward_flops_per_sample=flops["forward"], history=history,
                                served_fully=_forgotten_earlier(out, report["nodes"],
                                                                accepted))
    divergence.baseline = report["input_metrics"] = _input_metrics(
        guarded, arrays, accepted, evaluation)
    divergence.num_classes = max((int(r.get("num-classes", 0)) for r in reports.values()),
                                 default=0) or None
    final = arrays
    for strategy in strategies:
        strategy.bind(context)
        run = run_method(strategy, guarded, arrays, accepted, ledger,
                         lambda run: _publish(guarded, strategy, run, accepted, report, out,
                                              evaluation, outcomes, divergence),
                         departed=lambda: guarded.departed)
        if run.status == "refused":
            log(WARNING, "[%s] refused: %s", run.method, run.reason)
        elif run.status == "failed":
            log(WARNING, "[%s] FAILED: %s", run.method, run.reason)
        if run.status in ("refused", "failed"):
            outcomes[run.method] = MethodOutcome(run.method, run.status, reason=run.reason,
                                                 wall_s=run.wall_s)
            write_json(out / run.method / FAILED_FILE, outcomes[run.method].as_dict())
        elif run.status == "honoured":
            final = run.arrays
    outcome = ServeOutcome(final, outcomes, report)
    problem = no_method_error(outcomes)
    if problem is not None:
        raise ServeError(problem, outcome)  # serve() records it as serve.failed
    _finished(log_, outcomes, report, out)
    return outcome


def _forgotten_earlier(out: Path, nodes: list[int], accepted: dict) -> set[int]:
    """Nodes of this federation an earlier serve() into ``out`` forgot client-wise (its
    audit log says so): they stay out of this run's training too, as
    :class:`~fedunlearn.ExcludeForgotten` keeps them out of the user's."""
    from .forgotten import ForgottenNodes

    earlier = set(ForgottenNodes(out).nodes()) & set(nodes)
    if earlier:
        log(INFO, "fedunlearn.serve: node(s) %s were forgotten client-wise before (%s): they "
            "do not train", sorted(earlier), out)
    return earlier - set(accepted)


def _finished(log_, outcomes: dict, report: dict, out: Path) -> None:
    """``serve.finished``; once a method honoured the requests, the line that keeps
    forgotten nodes out of the user's later training, in the report and the log."""
    by_status = {s: [n for n, o in outcomes.items() if o.status == s]
                 for s in ("honoured", "degraded", "failed")}
    log_.record("serve.finished", **by_status)
    honoured = by_status["honoured"]
    if honoured:
        report["go_on_with"] = f"ExcludeForgotten(your_strategy, output_dir={str(out)!r})"
        log(INFO, "fedunlearn.serve: train on with %s so that forgotten nodes stay out "
            "(docs/plugin.md, 'Forgetting that lasts')", report["go_on_with"])


def _collect(guarded, ledger, log_, arrays):
    """Ask every node for its request and check them: ``(accepted, reports, view,
    report)``. Raises :class:`ServeError` when no node could answer (named, with why)."""
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
    failures = query_failures(replies, reports)
    report = {"nodes": answered, "accepted": [dict(r.describe(), node_id=n)
                                              for n, r in sorted(accepted.items())],
              "rejected": rejected, "unanswered": failures,
              "model_before_arrays_sha256": model_digest(arrays)}
    if not answered:
        raise ServeError(no_answer_error(nodes, failures), ServeOutcome(arrays, {}, report))
    if failures:
        log(WARNING, "fedunlearn.serve: %d of %d node(s) did not answer the query: %s",
            len(failures), len(nodes),
            "; ".join(f"node {n}: {r}" for n, r in sorted(failures.items())))
    return accepted, reports, view, report


def _flops_per_sample(model_fn, example_input, reports) -> dict:
    """FLOPs per training / forward sample of ``model_fn``'s model (0 without one)."""
    if model_fn is None or example_input is None:
        return {"train": 0, "forward": 0}
    classes = max((int(r.get("num-classes", 0)) for r in reports.values()), default=0)
    with torch.random.fork_rng(devices=[]):  # the user's random state stays as it was
        model = model_fn()
        if not classes:
            with torch.no_grad():
                classes = int(model.eval()(example_input[:1]).shape[-1])
        return flops_per_sample(model, tuple(example_input.shape[1:]), classes)


def _input_metrics(grid, arrays, accepted, evaluation) -> dict:
    """The input model's accuracy (%), measured once, where methods are judged against it:
    ``test`` (``evaluate_fn``) and the targets' ``forget`` / ``retain``. The random state
    stays as it was (in one process, the nodes' handlers share it)."""
    unmeasured: dict[str, str] = {}
    with torch.random.fork_rng(devices=[]):
        metrics = target_metrics(grid, arrays, accepted, unmeasured)
        if evaluation is not None:
            metrics.update(evaluation.measure(0, arrays)[0])
    return {k: float(v) for k, v in metrics.items()
            if k not in unmeasured and isinstance(v, (int, float)) and math.isfinite(v)}


def _publish(grid, strategy, run: MethodRun, accepted, report, out: Path,
             evaluation: ServerEvaluation | None, outcomes: dict,
             divergence: DivergenceCheck) -> dict:
    """serve()'s publication of a finished run: the targets' measurements, the server's
    own evaluation, the divergence check, ``model.pt`` with the SHA-256 of the file and
    ``results.json``; ``degraded`` / ``unmeasured`` / ``not_measured`` in what it returns
    say so to the lifecycle (audit records, receipts)."""
    name, unlearned, cost = run.method, run.arrays, strategy.cost
    unmeasured: dict[str, str] = {}
    metrics, not_measured = target_metrics(grid, unlearned, accepted, unmeasured), {}
    if evaluation is not None:
        measured, problem = evaluation.measure(cost.rounds, unlearned)
        metrics.update(measured)
        if problem:
            not_measured["test"] = problem
    degraded = divergence.degradation(unlearned, metrics)
    if not degraded and divergence.shortfall(metrics):
        log(WARNING, "[%s] %s", name, divergence.shortfall(metrics))
    path, digest = save_model(out / name / MODEL_FILE, unlearned)
    arrays_digest = model_digest(unlearned)
    outcome = MethodOutcome(name, "degraded" if degraded else "honoured", unlearned,
                            reason=degraded or "", model_path=str(path), model_sha256=digest,
                            model_arrays_sha256=arrays_digest, rounds=cost.rounds,
                            comm_bytes=cost.comm_bytes, flops=cost.flops,
                            wall_s=run.wall_s, metrics=metrics,
                            notes=_jsonable(strategy.notes), not_measured=not_measured,
                            unmeasured=unmeasured,
                            flops_partial=PARTIAL_FLOPS if cost.flops_partial else "")
    outcomes[name] = outcome
    write_json(out / name / RESULT_FILE, dict(outcome.as_dict(), request=report["accepted"],
                                              cost=strategy.cost_dict()))
    _log_published(outcome)
    published = {"metrics": metrics, "model_sha256": digest,
                 "model_arrays_sha256": arrays_digest}
    for key, value in (("unmeasured", unmeasured), ("not_measured", not_measured),
                       ("degraded", degraded)):
        if value:
            published[key] = value
    return published


def _log_published(outcome: MethodOutcome) -> None:
    measured = ", ".join(f"{k} {v:.2f}" for k, v in outcome.metrics.items())
    where = f"model {outcome.model_path} (sha256 {outcome.model_sha256[:12]})"
    if outcome.status == "degraded":
        log(WARNING, "[%s] DEGRADED: %s (%s); %s is kept for inspection, not handed on",
            outcome.method, outcome.reason, measured, where)
    else:
        log(INFO, "[%s] honoured: %s; %s", outcome.method, measured, where)
    if outcome.unmeasured:
        log(WARNING, "[%s] %s", outcome.method, unmeasured_note(outcome.unmeasured))


def target_metrics(grid, arrays: ArrayRecord, requests: dict,
                   unmeasured: dict | None = None) -> dict:
    """Forget and retain accuracy (%) of ``arrays``, measured by the target nodes on
    their own data (counts only come back). A part not every target could measure is
    ``nan``; ``unmeasured`` (when given) gets why: ``{"forget": "node 12: <reason>",
    "retain": ...}``."""
    messages = []
    for node, request in sorted(requests.items()):
        config = ConfigRecord({"max-members": 0})
        config.update(request_to_config(request))
        messages.append(Message(RecordDict({MODEL_KEY: arrays, "config": config}),
                                dst_node_id=node, message_type=EVALUATE_UNLEARN))
    sums = {"forget-correct": 0, "forget-total": 0, "retain-correct": 0, "retain-total": 0}
    failed: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=reply_timeout(grid)):
        node = int(reply.metadata.src_node_id)
        try:
            if reply.has_error():
                raise WireError("reply", reply.error.reason, "expected the node's counts")
            counts = parse_evaluate_reply(reply, max_members=0).counts
        except WireError as err:
            failed[node] = reply.error.reason if reply.has_error() else str(err)
            continue
        for key in sums:
            sums[key] += counts[key]
    out = {}
    for part in ("forget", "retain"):
        total = sums[f"{part}-total"]
        out[part] = 100.0 * sums[f"{part}-correct"] / total if total and not failed else float("nan")
    if failed:
        why = "; ".join(f"node {n}: {r}" for n, r in sorted(failed.items()))
        log(WARNING, "target node(s) %s did not measure the model: %s", sorted(failed), why)
        if unmeasured is not None:
            unmeasured.update({"forget": why, "retain": why})
    return out


def save_model(path: Path, arrays: ArrayRecord) -> tuple[Path, str]:
    """Write ``arrays`` as a torch state dict, atomically; return the path and the
    SHA-256 of the file's bytes as written (``sha256sum PATH`` prints the same; it is the
    ``model_sha256`` the results, the audit log and the receipts name). The model's array
    digest is :func:`fedunlearn.audit.model_digest`."""
    return save_state_dict_sha256(path, arrays.to_torch_state_dict())


def load_model(path: str | os.PathLike) -> ArrayRecord:
    """A model written by :func:`save_model`, as an ``ArrayRecord``."""
    return ArrayRecord(torch.load(path, map_location="cpu", weights_only=True))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


__all__ = ["MethodOutcome", "ServeError", "ServeOutcome", "load_model", "save_model",
           "serve", "target_metrics"]

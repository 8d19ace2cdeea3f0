"""One request lifecycle: accepted requests and a method, to a published outcome.

:func:`run_method` is the one code path that :func:`fedunlearn.serve`, the experiment
harness and service mode take for every method they run on a set of accepted requests:

1. **refusal**: a method that cannot serve the requests (``strategy.refusal``) is
   refused up front (``method.refused``) and nothing runs;
2. **run**: ``unlearning.started``, then the unlearning step and recovery
   (``strategy.unlearn``);
3. **failure**: a method that could not finish returns no model; its reason (with the
   nodes that left the federation) goes into ``unlearning.failed`` and, when the failure
   is final, one ``request.failed`` per request, and to the inbox receipts;
4. **publication**: the caller's ``publish(run)`` stores the model (``model.pt`` and the
   SHA-256 of its bytes, ``results.json`` or a service version) and says what it
   published; then
   ``unlearning.finished`` and one ``request.honoured`` per request are recorded and the
   honoured receipts sent (service mode records them itself once its checkpoint holds
   the step: ``publish`` returns ``None``). A publication that found the model
   ``degraded`` (:mod:`.serve_checks`: the recovery diverged) makes the run
   ``degraded``: ``unlearning.degraded``, one ``request.failed`` per request and
   ``failed`` receipts saying why (the requests stay pending unless another method
   honours them); ``unmeasured`` goes into the honoured records and receipts.

Every record goes through :class:`fedunlearn.ledger.Ledger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from .audit import model_digest
from .requests import UnlearningRequest
from .strategies.context import UnlearningFailed

#: What a method may raise when it cannot finish (anything else is a bug: it propagates).
METHOD_FAILURES = (UnlearningFailed, RuntimeError, ValueError)


@dataclass
class MethodRun:
    """What :func:`run_method` did: ``status`` is ``refused``, ``failed``, ``degraded``
    (``arrays`` is the model its publication judged diverged) or ``honoured`` (then
    ``arrays`` is the unlearned model)."""

    method: str
    status: str
    reason: str = ""
    arrays: ArrayRecord | None = None
    wall_s: float = 0.0
    model_before: str = ""
    """The array digest of the model the method started from (not a file)."""
    published: dict = field(default_factory=dict)


def request_fields(node: int, request: UnlearningRequest) -> dict:
    """How a request is named in its ``request.honoured`` / ``request.failed`` record."""
    return {"node": int(node), "scope": request.scope, "digest": request.digest(),
            "inbox_ids": list(request.inbox_ids)}


def run_method(strategy, grid: Grid, arrays: ArrayRecord,
               requests: Mapping[int, UnlearningRequest], ledger,
               publish: Callable[[MethodRun], dict | None], *,
               departed: Callable[[], list] = list, final: bool = True,
               request_extra: Callable[[int], dict] | None = None,
               started_fields: dict | None = None,
               failed_fields: dict | None = None) -> MethodRun:
    """Run ``strategy`` on ``requests`` from ``arrays`` and publish the outcome.

    ``publish(run)`` is called with a finished run; it returns what it published
    (``metrics``, ``model_sha256``: the SHA-256 of the file it saved the model to,
    ``model_arrays_sha256``, ``degraded`` (why the model is unfit), ``unmeasured``, and
    any field for ``unlearning.finished``), or ``None`` when it records the step itself.
    ``final``: a failure is the requests'
    last word (service mode retries first). ``request_extra(node)``: fields added to each
    ``request.*`` record."""
    name = strategy.name
    before = model_digest(arrays)
    reason = strategy.refusal(dict(requests))
    if reason is not None:
        ledger.refused(name, reason)
        return MethodRun(name, "refused", reason, model_before=before)
    ledger.unlearning_started(strategy, sorted(requests), before, **(started_fields or {}))
    started = time.perf_counter()

    def named() -> list[dict]:
        return [dict(request_fields(n, r), **(request_extra(n) if request_extra else {}))
                for n, r in sorted(requests.items())]

    try:
        unlearned = strategy.unlearn(grid, arrays)
    except METHOD_FAILURES as err:
        reason = f"{type(err).__name__}: {err}"
        gone = list(departed())
        if gone:
            reason += f" (node(s) {gone} left the federation)"
        ledger.unlearning_failed(name, reason, model_before=before,
                                 failures=named() if final else [], **(failed_fields or {}))
        return MethodRun(name, "failed", reason, wall_s=time.perf_counter() - started,
                         model_before=before)
    run = MethodRun(name, "honoured", arrays=unlearned, wall_s=time.perf_counter() - started,
                    model_before=before)
    published = publish(run)
    if published is not None:
        run.published = dict(published)
        fields = {k: v for k, v in published.items()
                  if k not in ("metrics", "model_sha256", "model_arrays_sha256", "degraded")}
        cost = strategy.cost
        common = dict(rounds=cost.rounds, comm_bytes=cost.comm_bytes, wall_s=cost.wall_s,
                      metrics=published.get("metrics", {}), model_before=before,
                      model_sha256=published["model_sha256"],
                      model_arrays_sha256=(published.get("model_arrays_sha256")
                                           or model_digest(unlearned)))
        if published.get("degraded"):
            run.status, run.reason = "degraded", str(published["degraded"])
            ledger.unlearning_degraded(name, run.reason,
                                       failures=named() if final else [], **common, **fields)
        else:
            ledger.unlearning_finished(name, honours=named(), **common, **fields)
    return run

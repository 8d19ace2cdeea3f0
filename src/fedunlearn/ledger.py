"""What happened to each unlearning request: the audit log and the inbox receipts.

:class:`Ledger` is what the server calls at each step of a job, and the one writer of
the ``method.*``, ``unlearning.*`` and ``request.honoured`` / ``request.failed``
records (:mod:`.lifecycle` calls it the same way for :func:`fedunlearn.serve`, the
experiment harness and service mode). It writes the audit record of the step
(:mod:`.audit`) and, for requests filed through a node's inbox (:mod:`.inbox`), sends the
verdict back to the node as a receipt: ``accepted`` or ``rejected`` (with the reason)
once requests are checked, ``honoured`` (with the method, the run and the hashes of the
unlearned model: ``model-sha256``, the SHA-256 of the file it was saved to, and
``model-arrays-sha256``, its array digest) once a method has unlearned. Service mode sends its receipts through
its own durable outbox (``receipts=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from .logs import log

from . import federation
from .audit import AuditLog, model_digest
from .serve_checks import unmeasured_note
from .requests import UnlearningRequest


class Ledger:
    """The audit log and the receipts of one job.

    Parameters
    ----------
    audit : AuditLog
    grid : Grid
        The (guarded) grid receipts go through.
    run_id : int
        The Flower run id, written into every record and receipt.
    receipts : bool
        Send inbox receipts (service mode keeps its own outbox: ``False``).
    """

    def __init__(self, audit: AuditLog, grid, run_id: int, receipts: bool = True) -> None:
        self.audit, self.grid, self.run_id = audit, grid, int(run_id)
        self.receipts = receipts
        self.requests: dict[int, UnlearningRequest] = {}
        self.model_before = ""
        """The array digest of the model the job starts from (not a file)."""

    def interrupted(self) -> dict | None:
        """Say so in the log (and the job's log) when the previous run on this audit log
        did not end; return the ``job.interrupted`` record (``None``: it ended)."""
        try:
            record = self.audit.note_interrupted()
        except OSError as err:
            log(WARNING, "could not read the audit log's last record: %s", err)
            return None
        if record is not None:
            log(WARNING, "The previous run on this audit log %s (run %s) did not finish: "
                "its last record is %s (seq %s); recorded as job.interrupted",
                self.audit.path, record["interrupted_run"], record["last_event"],
                record["last_seq"])
        return record

    def started(self, **fields) -> None:
        """``job.started`` with what the job is (``fields``: its methods, data,
        ``deployment``: whether it runs on a SuperLink, ...)."""
        deployment = bool(fields.get("deployment"))
        self.interrupted()
        log(INFO, "fedunlearn on a %s; audit log: %s", "deployment (SuperLink + SuperNodes): "
            "requests come from the nodes" if deployment else "simulation", self.audit.path)
        self.audit.record("job.started", **fields)

    def verified(self, node_partitions: Mapping[int, int]) -> None:
        self.audit.record("federation.verified", nodes=dict(sorted(node_partitions.items())))

    def verdicts(self, accepted: Mapping[int, UnlearningRequest], rejected: list[dict],
                 pretrained: ArrayRecord) -> None:
        """Receipts for the inbox requests just checked (the audit records were written
        while checking, by :func:`federation.collect_valid_requests`)."""
        self.requests = dict(accepted)
        self.model_before = model_digest(pretrained)
        receipts: dict[int, list] = {}
        for node, request in accepted.items():
            if request.inbox_ids:
                receipts.setdefault(node, []).append(federation.receipt_record(
                    request.inbox_ids, "accepted", self.run_id,
                    model_before_arrays_sha256=self.model_before))
        for entry in rejected:
            if entry.get("inbox_ids"):
                receipts.setdefault(entry["node_id"], []).append(federation.receipt_record(
                    entry["inbox_ids"], "rejected", self.run_id, reason=entry["reason"]))
        self._send(receipts)

    def refused(self, method: str, reason: str) -> None:
        self.audit.record("method.refused", method=method, reason=reason)

    def unlearning_started(self, strategy, targets=None, model_before: str | None = None,
                           **fields) -> None:
        """``unlearning.started``: the method, its parameters, the target nodes and the
        model it starts from (``fields``: service mode's attempt number)."""
        targets = sorted(self.requests if targets is None else targets)
        self.audit.record("unlearning.started", method=strategy.name,
                          params=strategy.params.as_dict(), targets=targets,
                          model_before_arrays_sha256=model_before or self.model_before,
                          **fields)

    def unlearning_finished(self, method: str, *, rounds: int, comm_bytes: int,
                            wall_s: float, metrics: dict, model_before: str,
                            model_sha256: str, model_arrays_sha256: str,
                            honours: list[dict], unmeasured: dict | None = None,
                            **fields) -> None:
        """``unlearning.finished`` and one ``request.honoured`` per request served
        (``honours``: ``node``, ``scope``, ``digest``, ``inbox_ids`` and any other field
        of the request's record); honoured receipts to their inboxes. ``model_sha256``:
        the SHA-256 of the saved model file; ``model_before`` and ``model_arrays_sha256``:
        array digests (:func:`fedunlearn.audit.model_digest`). ``unmeasured`` (what the
        targets could not measure, part -> why) goes into every record and receipt;
        ``fields``' ``not_measured`` (the server's test) into the receipts' ``reason``."""
        hashes = {"model_sha256": model_sha256, "model_arrays_sha256": model_arrays_sha256}
        extra = {"unmeasured": dict(unmeasured)} if unmeasured else {}
        self.audit.record("unlearning.finished", method=method, rounds=rounds,
                          comm_bytes=comm_bytes, wall_s=round(wall_s, 3), metrics=metrics,
                          model_before_arrays_sha256=model_before, **hashes, **extra,
                          **fields)
        for h in honours:
            self.audit.record("request.honoured", method=method, **hashes, **extra,
                              **{k: h[k] for k in h if k not in ("method", *hashes)})
        not_measured = "; ".join(f"{k} not measured: {why}"
                                 for k, why in fields.get("not_measured", {}).items())
        if self.receipts:
            note = unmeasured_note(unmeasured) if unmeasured else None
            self._send({node: federation.receipt_record(
                            r.inbox_ids, "honoured", self.run_id, method=method,
                            model_before_arrays_sha256=model_before, rounds=rounds,
                            comm_bytes=comm_bytes, reason=not_measured or None,
                            unmeasured=note, **hashes)
                        for node, r in self.requests.items() if r.inbox_ids})

    def unlearning_degraded(self, method: str, reason: str, *, rounds: int,
                            comm_bytes: int, wall_s: float, metrics: dict,
                            model_before: str, model_sha256: str, model_arrays_sha256: str,
                            failures: list[dict], **fields) -> None:
        """``unlearning.degraded`` (the method finished, but its model is unfit: the
        recovery diverged) and one ``request.failed`` per request it leaves unserved;
        ``failed`` receipts naming the degraded model (the requests stay pending unless
        another method honours them)."""
        hashes = {"model_sha256": model_sha256, "model_arrays_sha256": model_arrays_sha256}
        self.audit.record("unlearning.degraded", method=method, reason=reason[:2000],
                          rounds=rounds, comm_bytes=comm_bytes, wall_s=round(wall_s, 3),
                          metrics=metrics, model_before_arrays_sha256=model_before,
                          **hashes, **fields)
        why = f"degraded: {reason}"
        for f in failures:
            self.audit.record("request.failed", method=method, reason=why[:2000], **hashes,
                              **{k: f[k] for k in f if k not in ("method", "reason", *hashes)})
        if self.receipts:
            self._send({node: federation.receipt_record(
                            r.inbox_ids, "failed", self.run_id, method=method,
                            reason=f"{method}'s model is degraded, not used: {reason}",
                            model_before_arrays_sha256=model_before, **hashes)
                        for node, r in self.requests.items() if r.inbox_ids})

    def unlearning_failed(self, method: str, reason: str, *, model_before: str,
                          failures: list[dict], **fields) -> None:
        """``unlearning.failed`` and one ``request.failed`` per request it leaves failed
        for good (``failures``: as ``honours`` above; service mode lists none while a
        retry is due); failed receipts to their inboxes (they stay pending unless
        another method honours them)."""
        self.audit.record("unlearning.failed", method=method, reason=reason[:2000],
                          model_before_arrays_sha256=model_before, **fields)
        for f in failures:
            self.audit.record("request.failed", method=method, reason=reason[:2000],
                              **{k: f[k] for k in f if k not in ("method", "reason")})
        if self.receipts:
            self._send({node: federation.receipt_record(
                            r.inbox_ids, "failed", self.run_id, method=method,
                            reason=f"{method} could not serve the request: {reason}")
                        for node, r in self.requests.items() if r.inbox_ids})

    def finished(self, results: Mapping[str, dict], output_dir) -> None:
        self.audit.record("job.finished", methods=list(results), output_dir=str(output_dir))

    def failed(self, error: BaseException) -> None:
        try:
            self.audit.record("job.failed", error=f"{type(error).__name__}: {error}"[:1000])
        except OSError as err:  # the job's own error matters more
            log(WARNING, "could not write the audit record of the failure: %s", err)

    def _send(self, receipts: dict) -> None:
        if receipts:
            federation.send_receipts(self.grid, receipts, audit=self.audit)

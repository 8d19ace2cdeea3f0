"""What happened to each unlearning request: the audit log and the inbox receipts.

:class:`Ledger` is what the server calls at each step of a job. It writes the audit
record of the step (:mod:`.audit`) and, for requests filed through a node's inbox
(:mod:`.inbox`), sends the verdict back to the node as a receipt: ``accepted`` or
``rejected`` (with the reason) once requests are checked, ``honoured`` (with the
method, the run and the hash of the unlearned model) once a method has unlearned.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from flwr.common.logger import log

from . import federation
from .audit import AuditLog, model_digest
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
    """

    def __init__(self, audit: AuditLog, grid, run_id: int) -> None:
        self.audit, self.grid, self.run_id = audit, grid, int(run_id)
        self.requests: dict[int, UnlearningRequest] = {}
        self.model_before = ""

    def interrupted(self) -> None:
        """Say so in the log (and the job's log) when the previous run on this audit log
        did not end."""
        try:
            record = self.audit.note_interrupted()
        except OSError as err:
            log(WARNING, "could not read the audit log's last record: %s", err)
            return
        if record is not None:
            log(WARNING, "The previous run on this audit log (run %s) did not finish: its "
                "last record is %s (seq %s); recorded as job.interrupted",
                record["interrupted_run"], record["last_event"], record["last_seq"])

    def started(self, cfg, deployment: bool, ignored_forget_clients=()) -> None:
        self.interrupted()
        log(INFO, "fedunlearn on a %s; audit log: %s", "deployment (SuperLink + SuperNodes): "
            "requests come from the nodes" if deployment else "simulation", self.audit.path)
        self.audit.record("job.started", methods=list(cfg.methods), dataset=cfg.dataset,
                          model=cfg.model, num_clients=cfg.num_clients, deployment=deployment,
                          ignored_forget_clients=list(ignored_forget_clients))

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
                    model_before_sha256=self.model_before))
        for entry in rejected:
            if entry.get("inbox_ids"):
                receipts.setdefault(entry["node_id"], []).append(federation.receipt_record(
                    entry["inbox_ids"], "rejected", self.run_id, reason=entry["reason"]))
        self._send(receipts)

    def refused(self, method: str, reason: str) -> None:
        self.audit.record("method.refused", method=method, reason=reason)

    def unlearning_started(self, strategy) -> None:
        self.audit.record("unlearning.started", method=strategy.name,
                          params=strategy.params.as_dict(), targets=sorted(self.requests),
                          model_before=self.model_before)

    def unlearning_finished(self, strategy, unlearned_arrays: ArrayRecord,
                            metrics: dict) -> None:
        """Audit the finished method and tell the inbox requests they were honoured."""
        cost = strategy.cost
        after = model_digest(unlearned_arrays)
        self.audit.record("unlearning.finished", method=strategy.name, rounds=cost.rounds,
                          comm_bytes=cost.comm_bytes, wall_s=round(cost.wall_s, 3),
                          metrics=metrics, model_before=self.model_before, model_after=after)
        self._send({node: federation.receipt_record(
                        r.inbox_ids, "honoured", self.run_id, method=strategy.name,
                        model_sha256=after, model_before_sha256=self.model_before,
                        rounds=cost.rounds, comm_bytes=cost.comm_bytes)
                    for node, r in self.requests.items() if r.inbox_ids})

    def unlearning_failed(self, strategy, reason: str) -> None:
        """Audit a method that could not finish; tell the inbox requests it did not
        serve them (they stay pending unless another method honours them)."""
        self.audit.record("unlearning.failed", method=strategy.name, reason=reason[:2000],
                          model_before=self.model_before)
        self._send({node: federation.receipt_record(
                        r.inbox_ids, "failed", self.run_id, method=strategy.name,
                        reason=f"{strategy.name} could not serve the request: {reason}")
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

"""Service mode's view of the federation and its requests: verify the nodes, collect
requests, their deadlines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from logging import INFO, WARNING

from ..logs import log
from flwr.serverapp import Grid

from .. import federation
from ..audit import model_digest
from ..requests import REQUEST_RECORD, UnlearningRequest, merge_conflict, merge_requests
from .config import DAY_S, ServiceError
from .state import PendingRequest


class Intake:
    """The part of :class:`UnlearningService` that knows the federation and collects
    requests."""

    _config_requests: dict[int, str] = {}
    """This query's node-config requests (node -> :func:`_fingerprint`)."""

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
        view = {n: federation.node_label(n, reports[n]) for n in answered}
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
        self.audit.hold()  # this query's records are committed by its checkpoint
        replies = federation.query(self.grid, nodes,
                                   run_config_requests=self.run_config_requests)
        self._drop_withdrawn(replies)
        fresh, conflicts = self._screen_replies(replies)
        reports = dict(self.state.reports)
        accepted, rejected = federation.collect_valid_requests(
            fresh, None, verified=self.state.view, audit=self.audit, reports=reports)
        self.state.reports = reports
        self.grid.reports = reports
        self._reject_conflicts(conflicts, rejected)
        receipts: dict[int, list] = {}
        self._queue_accepted(accepted, rejected, receipts)
        self._rejection_receipts(rejected, receipts)
        self.checkpoint()  # accepted requests are never lost from here on
        if receipts:
            federation.send_receipts(self.grid, receipts, audit=self.audit)
        if self.state.outbox:  # verdicts a node asked for again
            self.flush_outbox()

    def _drop_withdrawn(self, replies) -> None:
        """A pending request whose every inbox id its node reports withdrawn is dropped
        (``request.withdrawn``): a withdrawal that reaches the service before the step
        that would serve it takes effect. One already served stays served."""
        for reply in replies:
            ids = set(federation.withdrawn_ids(reply))
            if not ids:
                continue
            node = int(reply.metadata.src_node_id)
            gone = [p for p in self.state.pending if p.node == node
                    and p.request.inbox_ids and set(p.request.inbox_ids) <= ids]
            for p in gone:
                self.state.pending.remove(p)
                self.state.seen.add((p.node, p.request.digest()))
                self.state.seen_inbox.update(p.request.inbox_ids)
                log(WARNING, "[service] node %d withdrew request(s) %s before they were "
                    "served: dropped", node, ", ".join(p.request.inbox_ids))
                self.audit.record("request.withdrawn", node=node, scope=p.request.scope,
                                  digest=p.request.digest(),
                                  inbox_ids=list(p.request.inbox_ids))

    def _screen_replies(self, replies) -> tuple[list, list[tuple[int, UnlearningRequest, str]]]:
        """``(fresh, conflicts)``: the replies with the requests already known, or in
        conflict with what their node forgets (or has pending), taken out; and
        ``(node, request, reason)`` per conflicting request."""
        fresh, conflicts = [], []
        self._config_requests = {}
        for reply in replies:
            if not reply.has_error() and REQUEST_RECORD in reply.content.config_records:
                node = int(reply.metadata.src_node_id)
                record = reply.content.config_records[REQUEST_RECORD]
                if not record.get("inbox-ids"):  # from the node-config: no receipts
                    self._config_requests[node] = _fingerprint(record)
                if self._known(node, record):
                    del reply.content[REQUEST_RECORD]
                else:
                    conflict = self._conflict(node, record)
                    if conflict is not None:
                        conflicts.append((node, *conflict))
                        del reply.content[REQUEST_RECORD]
            fresh.append(reply)
        return fresh, conflicts

    def _reject_conflicts(self, conflicts: list[tuple[int, UnlearningRequest, str]],
                          rejected: list[dict]) -> None:
        """Each conflicting request: logged, audited as received and rejected by the
        service, and added to ``rejected``."""
        for node, request, reason in conflicts:
            log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
            self.audit.record("request.received", node=node, scope=request.scope,
                              digest=request.digest(), inbox_ids=list(request.inbox_ids))
            self.audit.record("request.rejected", node=node, reason=reason, by="service")
            rejected.append({"node_id": node, "reason": reason,
                             "inbox_ids": list(request.inbox_ids)})

    def _queue_accepted(self, accepted: dict[int, UnlearningRequest], rejected: list[dict],
                        receipts: dict[int, list]) -> None:
        """Queue the accepted requests (merged into the node's pending one), in node
        order; one that cannot be merged with what the node was served or has pending
        goes to ``rejected``. An accepted inbox request gets its receipt."""
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
                    model_before_arrays_sha256=model_digest(self.arrays), round=self.state.round,
                    version=self.state.version))

    def _rejection_receipts(self, rejected: list[dict], receipts: dict[int, list]) -> None:
        """A receipt per rejected inbox request, its inbox ids marked as seen and the
        verdict kept by id (a node whose receipt never arrived sends the request again
        and gets the rejection again, :meth:`resend_verdicts`)."""
        for entry in rejected:
            node = entry["node_id"]
            if not entry.get("inbox_ids") and node in self._config_requests:
                # A node-config request cannot change until the node's config does:
                # rejected once, not again at every query.
                self.state.seen.add((node, self._config_requests[node]))
            if entry.get("inbox_ids"):
                receipts.setdefault(entry["node_id"], []).append(federation.receipt_record(
                    entry["inbox_ids"], "rejected", self.run_id, reason=entry["reason"]))
                self.state.seen_inbox.update(entry["inbox_ids"])
                verdict = {"node": entry["node_id"], "status": "rejected",
                           "reason": entry["reason"][:600],
                           "request": {"inbox_ids": list(entry["inbox_ids"])}}
                for inbox_id in entry["inbox_ids"]:
                    self.state.verdicts[inbox_id] = verdict

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
            known = all(i in pending_ids or i in self.state.seen_inbox for i in ids)
            if known and not any(i in pending_ids for i in ids):
                self.resend_verdicts(node, ids)  # final: its receipt never arrived
            return known
        if (node, _fingerprint(record)) in self.state.seen:  # a node-config request
            return True  # already rejected; the node's config has not changed
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


def _fingerprint(record) -> str:
    """What a node-config request record says, as one string (``config:`` + SHA-256 of
    its fields): the same record sent again is the same request."""
    fields = json.dumps({str(k): v for k, v in record.items()}, sort_keys=True, default=str)
    return "config:" + hashlib.sha256(fields.encode()).hexdigest()

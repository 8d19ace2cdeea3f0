"""Federation checks: which nodes are there, which partition each holds, what they ask.

Everything the server learns about the federation before it trains, and the one view
of it that it keeps for the whole job:

* :func:`wait_for_nodes`: the nodes that connected;
* :func:`check_partitions`: which partition each holds, checked once, before any
  training; every partition must be held by exactly one node;
* :class:`GuardedGrid`: the server's only door to the nodes, built around Flower's
  grid. Once the partitions are verified, a node outside that view (one that joined
  late, restarted under a new node id, or claims a partition someone else holds) is
  never sent a message, is left out of every round and is logged (and audited) once;
  and every train or evaluate reply is checked (:mod:`.replies`) before a strategy sees
  it, a malformed one becoming a failed node for that round;
* :func:`collect_valid_requests`: the unlearning requests, parsed strictly, each bound
  to the node that sent it and validated against the verified view only;
* :func:`send_receipts`: the verdict on inbox requests, sent back to their nodes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from .replies import (check_evaluate_metrics, check_train_reply, parse_evaluate_reply,
                      parse_node_record, parse_node_report)
from .requests import (INBOX_ID_PATTERN, INVALID_SCOPE, MAX_ERROR_CHARS, MAX_INBOX_IDS,
                       QUERY_CONFIG, QUERY_UNLEARN, RECEIPT_ACK, RECEIPT_RECORD,
                       REQUEST_RECORD, RUN_CONFIG_REQUESTS, WANT_REQUEST, UnlearningRequest,
                       check_request_shape, empty_forget_reason, forget_indices,
                       ids_not_held_reason, request_from_config, validate_request)
from .protocol import REJECTED_RECORD, REPLY_TIMEOUT_S, reply_timeout
from .wire import WireError, only_fields, shorten, str_list

NODE_STALL_S = 60.0

MALFORMED_REPLY = 1001
"""``Error.code`` of a reply the server refused as malformed (Flower's own codes are < 100)."""


def is_deployment(grid) -> bool:
    """Whether the ServerApp runs on a real SuperLink rather than in a simulation.

    In flwr 1.41 a deployment's ServerApp process (``flwr-serverapp``, started by the
    SuperLink's SuperExec) talks to the SuperLink through an ``HttpGrid``; the simulation
    engine (``flwr-simulation``) runs the ServerApp in a thread with an ``InMemoryGrid``.
    Any other grid (a test double) counts as a simulation."""
    from flwr.superlink.grid import HttpGrid  # noqa: PLC0415 (only needed here)

    while isinstance(grid, GuardedGrid):
        grid = grid.inner
    return isinstance(grid, HttpGrid)


def run_id_of(grid) -> int:
    """The Flower run id, or 0 when the grid has none (a test double)."""
    try:
        return int(grid.run.run_id)
    except Exception:  # a grid without a run: tests
        return 0


def wait_for_nodes(grid: Grid, want: int) -> list[int]:
    """Wait until ``federation.num-clients`` nodes are connected.

    Gives up once no new node has connected for ``NODE_STALL_S`` seconds (a
    simulation has all its nodes at once; a deployment's nodes keep arriving)."""
    start = last_change = time.monotonic()
    last_log, seen = -1e9, -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        now = time.monotonic()
        if len(nodes) != seen:
            seen, last_change = len(nodes), now
        if now - last_change > NODE_STALL_S:
            raise RuntimeError(
                f"only {len(nodes)} of federation.num-clients={want} nodes connected "
                f"(none joined in the last {NODE_STALL_S:.0f}s): in simulation pass "
                f"--federation-config \"num-supernodes={want}\" (fedunlearn-run does), "
                f"on a deployment start {want} SuperNodes")
        if now - last_log >= 10:
            log(INFO, "Waiting for nodes: %d of %d connected after %.0fs (simulation: "
                "num-supernodes must equal federation.num-clients)", len(nodes), want,
                now - start)
            last_log = now
        time.sleep(1.0)


def query(grid: Grid, nodes: list[int], run_config_requests: bool = True,
          want_request: bool = True) -> list[Message]:
    """Send ``query.unlearn`` to ``nodes``; every node answers with the partition it
    holds and (with ``want_request``) its unlearning request, if it has one.
    ``run_config_requests`` says whether a node may ask through the run-config's
    ``forget.*`` (simulations only)."""
    config = ConfigRecord({RUN_CONFIG_REQUESTS: bool(run_config_requests),
                           WANT_REQUEST: bool(want_request)})
    messages = [Message(RecordDict({QUERY_CONFIG: config}), dst_node_id=n,
                        message_type=QUERY_UNLEARN)
                for n in nodes]
    return list(grid.send_and_receive(messages, timeout=reply_timeout(grid)))


def check_partitions(replies, num_clients: int) -> dict[int, int]:
    """node id -> partition id from ``query.unlearn`` replies: the verified view.

    Raises ``RuntimeError`` unless every partition ``0..num_clients-1`` is held by exactly
    one node: a partition held twice would keep training on data that is being forgotten
    (and nobody can tell which holder is genuine), a missing one would silently shrink
    the federation. A node that fails to answer, sends a malformed record or claims a
    partition outside the range is left out of the view (and named in the error if a
    partition ends up missing).
    """
    claims: dict[int, int] = {}
    left_out: list[str] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            left_out.append(f"node {node} failed to answer: {msg.error.reason}")
            continue
        try:
            partition = parse_node_record(msg.content)
        except WireError as err:
            left_out.append(f"node {node} sent a malformed node record: {err}")
            continue
        if not 0 <= partition < num_clients:
            left_out.append(f"node {node} holds partition {partition}, outside "
                            f"0..{num_clients - 1} (federation.num-clients={num_clients})")
            continue
        claims[node] = partition
    holders: dict[int, list[int]] = {}
    for node, partition in sorted(claims.items()):
        holders.setdefault(partition, []).append(node)
    problems = [f"partition {p} is held by several nodes {nodes}"
                for p, nodes in sorted(holders.items()) if len(nodes) > 1]
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        problems.append(f"no node holds partition(s) {missing}")
    if problems:
        raise RuntimeError("the federation's partitions are inconsistent: "
                           + "; ".join(problems + left_out)
                           + ". Give each SuperNode a distinct node-config partition-id "
                           "in 0..num-partitions-1.")
    for line in left_out:
        log(WARNING, "Left out of the federation: %s", line)
    return claims


class GuardedGrid(Grid):
    """Flower's grid seen through the server's verified view of the federation.

    Before :meth:`verify` it only forwards. Afterwards:

    * :meth:`get_node_ids` returns the connected nodes of the view; a node outside it
      (late, restarted under a new id, impostor) is logged and audited once
      (``node.excluded``) and takes no part, so a forgotten client that reconnects
      cannot bring its data back into training or into the metrics;
    * messages to a node outside the view are not sent; replies from nodes that were not
      asked, or second replies, are dropped;
    * every train reply is checked against the model that was sent
      (:func:`~fedunlearn.replies.check_train_reply`: names, shapes, dtypes, finite values,
      the metric keys, ``num-examples`` at most the node's training split) and every
      evaluate reply against what the node can hold (:func:`check_evaluate`); a malformed
      reply becomes an error reply (code :data:`MALFORMED_REPLY`), so strategies count
      the node as failed for that round.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    audit : AuditLog, optional
        Where ``node.excluded`` and ``reply.refused`` events go.
    """

    def __init__(self, grid: Grid, audit=None, reply_timeout: float = REPLY_TIMEOUT_S) -> None:
        if not (isinstance(reply_timeout, (int, float)) and 0 < reply_timeout < float("inf")):
            raise ValueError(f"reply_timeout={reply_timeout!r}: expected seconds > 0")
        self.inner = grid
        self.audit = audit
        self.reply_timeout = float(reply_timeout)
        self.verified: dict[int, int] = {}
        #: The federation's data as the server knows it (the harness's partitions), if any.
        self.data = None
        #: node id -> what the node reported about its own data (reply bounds).
        self.reports: dict[int, dict] = {}
        self._excluded: set[int] = set()
        self._departed: set[int] = set()
        self._pushed: dict[str, Message] = {}

    def verify(self, node_partitions: Mapping[int, int], data=None) -> None:
        """Fix the view: ``node_partitions`` (from :func:`check_partitions`) for the rest
        of the job; ``data`` bounds what replies may report."""
        self.verified = dict(node_partitions)
        self.data = data

    # -- the Grid interface ---------------------------------------------------------------
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        nodes = list(self.inner.get_node_ids())
        if not self.verified:
            return nodes
        connected = set(nodes)
        for node in sorted(connected - set(self.verified) - self._excluded):
            self._excluded.add(node)
            reason = ("not in the verified federation (joined after the partition check, "
                      "restarted under a new node id, or claims a partition another node "
                      "holds): it takes no part in this job")
            log(WARNING, "Node %d is %s", node, reason)
            if self.audit is not None:
                self.audit.record("node.excluded", node=node, reason=reason)
        for node in sorted(set(self.verified) - connected - self._departed):
            self._departed_now(node, "no longer connected")
        return [n for n in nodes if n in self.verified]

    def _departed_now(self, node: int, how: str) -> None:
        if node in self._departed:
            return
        self._departed.add(node)
        log(WARNING, "Node %d (partition %s) left the federation (%s): it is a failed node "
            "in every round and evaluation from now on; a node that comes back under a new "
            "id takes no part in this job", node, self.verified.get(node), how)
        if self.audit is not None:
            self.audit.record("node.departed", node=node, partition=self.verified.get(node),
                              how=how)

    @property
    def departed(self) -> list[int]:
        """Verified nodes that left (no longer connected, or no reply when asked)."""
        return sorted(self._departed)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        allowed = self._allowed(messages)
        ids = list(self.inner.push_messages(allowed))
        self._pushed.update({mid: msg for mid, msg in zip(ids, allowed) if mid})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for reply in self.inner.pull_messages(message_ids):
            sent = self._pushed.pop(reply.metadata.reply_to_message_id, None)
            out.append(self.checked(reply, sent) if sent is not None else reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send, wait, check. Every message asked of a verified node gets exactly one
        reply: the node's (checked), or an error reply naming why there is none (the node
        left the federation, or no reply within the timeout); an error the SuperLink
        sends on a node's behalf counts as that node's."""
        allowed = self._allowed(messages)
        out: list[Message] = []
        if self.verified:
            connected = set(self.inner.get_node_ids())
            for node in sorted(set(self.verified) - connected):
                self._departed_now(node, "no longer connected")
            gone = [m for m in allowed if int(m.metadata.dst_node_id) in self._departed]
            allowed = [m for m in allowed if int(m.metadata.dst_node_id) not in self._departed]
            out += [_no_reply(m, "the node left the federation") for m in gone]
        timeout = self.reply_timeout if timeout is None else min(timeout, self.reply_timeout)
        sent = {int(m.metadata.dst_node_id): m for m in allowed}
        replies = list(self.inner.send_and_receive(allowed, timeout=timeout)) if allowed else []
        by_id = {m.metadata.message_id: m for m in allowed if m.metadata.message_id}
        seen: set[int] = set()
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            origin = by_id.get(reply.metadata.reply_to_message_id)
            if origin is not None and int(origin.metadata.dst_node_id) != src:
                # An error the SuperLink sends for a node (e.g. it stopped answering).
                src = int(origin.metadata.dst_node_id)
                reason = (reply.error.reason if reply.has_error()
                          else "a reply from another node")
                reply = _no_reply(origin, f"the SuperLink answered for it: {reason}")
            if src not in sent or src in seen:
                log(WARNING, "Dropped a reply from node %d: %s", src,
                    "a second reply" if src in seen else "it was not asked")
                continue
            seen.add(src)
            out.append(self.checked(reply, sent[src]))
        for node in sorted(set(sent) - seen):  # a straggler fails this message only
            out.append(_no_reply(sent[node], f"no reply within {timeout:g} s"))
        if self.verified and allowed:  # who left while this exchange ran
            connected = set(self.inner.get_node_ids())
            for node in sorted(set(sent) - connected):
                self._departed_now(node, "no longer connected")
        return out

    # -- checks ---------------------------------------------------------------------------
    def _allowed(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if not self.verified:
            return messages
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node in self.verified:
                out.append(msg)
            else:
                log(WARNING, "Not sending %s to node %d: it is not in the verified federation",
                    msg.metadata.message_type, node)
        return out

    def checked(self, reply: Message, sent: Message) -> Message:
        """``reply`` if well-formed, else an error reply naming what is wrong."""
        if reply.has_error():
            return reply
        node = int(reply.metadata.src_node_id)
        category = sent.metadata.message_type.split(".")[0]
        try:
            if category == "train":
                check_train_reply(reply, sent, self._train_size(node))
            elif category == "evaluate":
                self.check_evaluate(reply, sent, node)
        except WireError as err:
            reason = f"malformed {sent.metadata.message_type} reply: {err}"
            log(WARNING, "Node %d: %s; counted as a failed node this round", node, reason)
            if self.audit is not None:
                self.audit.record("reply.refused", node=node,
                                  partition=self.verified.get(node),
                                  message_type=sent.metadata.message_type, reason=reason)
            return Message(Error(code=MALFORMED_REPLY, reason=reason),
                           metadata=reply.metadata)
        return reply

    def check_evaluate(self, reply: Message, sent: Message, node: int) -> None:
        """An evaluate reply: the retain/forget counts (exactly the sizes the server
        derives from the node's partition and accepted request) and membership features
        of :func:`~fedunlearn.replies.parse_evaluate_reply`; for an evaluation of another
        ``split`` (e.g. ``"val"``, the recovery stopping rule's), counts that are
        non-negative ints with ``correct <= total`` and finite numbers."""
        config = sent.content.config_records.get("config", ConfigRecord())
        if "split" not in config:  # the retain/forget measurement
            parse_evaluate_reply(reply, max_members=_int_or_none(config.get("max-members")),
                                 expected_totals=self._expected_totals(node, config))
        else:
            check_evaluate_metrics(reply)

    def _train_size(self, node: int) -> int | None:
        if node in self.reports and "num-train" in self.reports[node]:
            return int(self.reports[node]["num-train"])
        if self.data is None or node not in self.verified:
            return None
        return int(self.data.train_indices(self.verified[node]).size)

    def _expected_totals(self, node: int, config) -> dict[str, int] | None:
        if node not in self.verified:
            return None
        partition = self.verified[node]
        report = self.reports.get(node)
        if report is not None and "num-train" in report:
            # What the node reported: its training split and its accepted request's counts.
            request = request_from_config(config, partition)
            if request is None:
                return {"retain-total": report["num-train"], "forget-total": 0}
            if "num-forget" in report:
                return {"retain-total": report["num-retained"],
                        "forget-total": report["num-forget"]}
            return None
        if self.data is None:
            return None
        train = self.data.train_indices(partition)
        request = request_from_config(config, partition)
        forget = 0 if request is None else int(
            forget_indices(request, train, np.asarray(self.data.train.targets)).size)
        return {"retain-total": int(train.size) - forget, "forget-total": forget}


def _no_reply(sent: Message, why: str) -> Message:
    """The error reply standing for a node's missing one (it failed this message)."""
    node = int(sent.metadata.dst_node_id)
    log(WARNING, "Node %d failed %s: %s", node, sent.metadata.message_type, why)
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=why), reply_to=sent)


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- requests -----------------------------------------------------------------------------
ERROR_RECORD_FIELDS = ("scope", "partition-id", "error", "inbox-ids")


def _inbox_ids(record) -> tuple[str, ...]:
    """Best-effort inbox ids of a request record (for the receipt of a rejection)."""
    try:
        return str_list("inbox-ids", record.get("inbox-ids", []), MAX_INBOX_IDS, 64,
                        INBOX_ID_PATTERN)
    except WireError:
        return ()


def _node_error(record) -> str:
    """The reason of a node that could not build its request (``scope="invalid"``)."""
    only_fields(record, ERROR_RECORD_FIELDS, "request")
    error = record.get("error")
    if not isinstance(error, str):
        raise WireError("error", error, "expected the node's error message as a string")
    return f"the node could not build its request: {shorten(error, MAX_ERROR_CHARS)}"


def _node_rejections(record) -> list[tuple[str, str]]:
    """``(inbox id, reason)`` per inbox request the node's own check refused (its
    ``rejected`` record)."""
    if not hasattr(record, "keys"):
        raise WireError(REJECTED_RECORD, record, "expected a ConfigRecord")
    only_fields(record, ("inbox-ids", "reasons"), REJECTED_RECORD)
    ids = str_list("inbox-ids", record.get("inbox-ids"), MAX_INBOX_IDS, 64, INBOX_ID_PATTERN)
    reasons = record.get("reasons")
    if (not isinstance(reasons, (list, tuple)) or len(reasons) != len(ids)
            or not all(isinstance(r, str) for r in reasons)):
        raise WireError("reasons", reasons, f"expected {len(ids)} strings, one reason per "
                        "inbox id")
    return [(i, r if len(r) <= MAX_ERROR_CHARS else r[:MAX_ERROR_CHARS] + "...")
            for i, r in zip(ids, reasons)]


def node_reports(replies, nodes: Mapping[int, int] | None = None) -> dict[int, dict]:
    """node id -> what its ``query.unlearn`` reply reports about its own data
    (:func:`~fedunlearn.replies.parse_node_report`), for the nodes in ``nodes`` (all when
    ``None``); a failed or malformed reply reports nothing."""
    out = {}
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error() or (nodes is not None and node not in nodes):
            continue
        try:
            out[node] = parse_node_report(msg.content)
        except WireError as err:
            log(WARNING, "node %d: malformed node report ignored: %s", node, err)
    return out


def collect_valid_requests(replies, data,
                           verified: dict[int, int] | None = None, audit=None,
                           reports: dict[int, dict] | None = None
                           ) -> tuple[dict[int, UnlearningRequest], list[dict]]:
    """Validate the requests in ``query.unlearn`` replies.

    ``verified`` is the node -> partition map checked before pretraining; when given, a
    request is checked against it only: a node outside it, or one that now claims
    another partition than the one it was verified with, is rejected. Without it, the
    replies' own claims are used, and a partition claimed by several nodes gets none of
    their requests (nobody can tell which holder is genuine).

    Every record is parsed strictly (:meth:`UnlearningRequest.from_config_record`); a
    malformed one is rejected with a reason naming the field, the value and what is
    allowed, never raised. With ``audit``, each request is recorded as received (with
    a digest of what it names, not the ids) and as accepted or rejected.

    With ``data=None`` (a plugin server: it holds no client data), a request is checked
    with what its node reports (:func:`~fedunlearn.replies.parse_node_report`, kept in
    ``reports``): the node checked the ids against its own data, the server checks the
    scope, the classes against the node's label set and that the forget set is not
    empty.

    Returns ``(accepted, rejected)``: node id -> request, and one
    ``{"node_id", "reason"}`` per rejected request (plus ``inbox_ids`` when the request
    came from the node's inbox), each also logged.
    """
    claims: dict[int, int] = {}
    bad_claims: dict[int, str] = {}
    raw: list[tuple[int, object]] = []
    node_refused: dict[int, list[tuple[str, str]]] = {}
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            log(WARNING, "node %d failed to answer the unlearning query: %s", node,
                msg.error.reason)
            continue
        try:
            if data is None:
                report = parse_node_report(msg.content)
                if reports is not None:
                    reports[node] = report
                claims[node] = report.get("partition-id", 0)
            else:
                claims[node] = parse_node_record(msg.content)
        except WireError as err:
            bad_claims[node] = str(err)
        if REQUEST_RECORD in msg.content:
            raw.append((node, msg.content.config_records.get(REQUEST_RECORD)))
        if REJECTED_RECORD in msg.content:
            try:
                node_refused[node] = _node_rejections(
                    msg.content.config_records.get(REJECTED_RECORD))
            except WireError as err:
                log(WARNING, "node %d: malformed record of requests it refused ignored: %s",
                    node, err)
    shared: dict[int, list[int]] = {}
    if verified is None:
        holders: dict[int, list[int]] = {}
        for node, partition in sorted(claims.items()):
            holders.setdefault(partition, []).append(node)
        shared = {n: nodes for nodes in holders.values() if len(nodes) > 1 for n in nodes}
        node_partitions = {n: p for n, p in claims.items() if n not in shared}
    else:
        node_partitions = dict(verified)
    labels = np.asarray(data.train.targets) if data is not None else None
    accepted: dict[int, UnlearningRequest] = {}
    rejected: list[dict] = []
    for node, record in raw:
        request, reason = None, None
        inbox_ids = _inbox_ids(record) if record is not None else ()
        if record is None:
            reason = "malformed request record: request is not a ConfigRecord"
        elif node in bad_claims:
            reason = f"malformed node record: {bad_claims[node]}"
        elif node in shared:
            reason = (f"partition {claims[node]} is claimed by several nodes "
                      f"{shared[node]}: a request cannot be bound to the partition's holder")
        elif node not in node_partitions:
            reason = ("the node is not in the verified federation (it joined after the "
                      "partition check or under a new id)" if verified is not None
                      else "the node did not say which partition it holds")
        elif node in claims and claims[node] != node_partitions[node]:
            reason = (f"the node now claims partition {claims[node]}, but it was verified "
                      f"holding partition {node_partitions[node]}")
        elif record.get("scope") == INVALID_SCOPE:
            try:
                reason = _node_error(record)
            except WireError as err:
                reason = f"malformed request record: {err}"
        else:
            try:
                request = UnlearningRequest.from_config_record(record, node_id=node)
            except WireError as err:
                reason = str(err)
            else:
                if data is None:
                    reason = validate_reported(request, node_partitions[node],
                                               (reports or {}).get(node, {}), node_partitions)
                else:
                    reason = validate_request(request, node_partitions[node], node_partitions,
                                              data.train_indices, labels,
                                              data.info.num_classes)
        if audit is not None:
            audit.record("request.received", **_received(node, node_partitions.get(node),
                                                         request, inbox_ids))
        if reason is None:
            accepted[node] = request
            log(INFO, "Unlearning request accepted from node %d: %s", node, request.describe())
            if audit is not None:
                audit.record("request.accepted", node=node, partition=request.partition_id,
                             scope=request.scope, digest=request.digest())
        else:
            entry = {"node_id": node, "reason": reason}
            if inbox_ids:
                entry["inbox_ids"] = list(inbox_ids)
            rejected.append(entry)
            log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
            if audit is not None:
                audit.record("request.rejected", node=node, partition=node_partitions.get(node),
                             reason=reason)
    for node, refused in sorted(node_refused.items()):
        for inbox_id, reason in refused:
            reason = f"the node's own check: {reason}"
            rejected.append({"node_id": node, "reason": reason, "inbox_ids": [inbox_id]})
            log(WARNING, "Unlearning request %s REJECTED by node %d: %s", inbox_id, node,
                reason)
            if audit is not None:
                audit.record("request.rejected", node=node,
                             partition=node_partitions.get(node), reason=reason,
                             inbox_ids=[inbox_id], by="node")
    return accepted, rejected


def validate_reported(request: UnlearningRequest, partition: int, report: dict,
                      node_partitions: Mapping[int, int] | None = None) -> str | None:
    """A server's check of a request with what its node reported about its own data
    (:func:`~fedunlearn.replies.parse_node_report`), never the data: the same checks and
    reasons as :func:`~fedunlearn.requests.validate_request`."""
    reason = check_request_shape(request, partition, node_partitions or {},
                                 report.get("num-classes"))
    if reason is not None:
        return reason
    if request.scope == "instance" and report.get("num-ids-not-held", 0):
        return ids_not_held_reason(report.get("ids-not-held", []), report["num-ids-not-held"],
                                   partition, report.get("num-train", 0))
    if "num-forget" not in report:
        return ("the node did not report the size of its forget set (num-forget): it "
                "cannot be checked")
    if report["num-forget"] == 0:
        return empty_forget_reason(request)
    return None


def _received(node: int, partition: int | None, request: UnlearningRequest | None,
              inbox_ids: tuple[str, ...]) -> dict:
    """What the audit log keeps of a received request: never the sample ids."""
    out: dict = {"node": node, "partition": partition}
    if request is None:
        out["scope"] = None
        out["parsed"] = False
    else:
        out.update(scope=request.scope, requested_partition=request.partition_id,
                   classes=list(request.classes), num_ids=len(request.sample_ids),
                   digest=request.digest())
    if inbox_ids:
        out["inbox_ids"] = list(inbox_ids)
    return out


# -- receipts -----------------------------------------------------------------------------
def receipt_record(inbox_ids: Iterable[str], status: str, run_id: int, **fields) -> ConfigRecord:
    """A verdict on inbox requests, as :func:`send_receipts` sends it (see
    :func:`fedunlearn.inbox.parse_receipt` for the fields)."""
    record = ConfigRecord({"request-ids": list(inbox_ids), "status": status,
                           "run": str(int(run_id))})
    for key, value in fields.items():
        if value is None:
            continue
        record[key.replace("_", "-")] = (str(value)[:600] if isinstance(value, str)
                                         else int(value))
    return record


def send_receipts(grid: Grid, receipts: Mapping[int, ConfigRecord | list[ConfigRecord]],
                  audit=None) -> int:
    """Send each node its receipt(s) (a ``query.unlearn`` carrying a ``receipt`` record
    each; a node with several verdicts, e.g. one request accepted and one rejected, gets
    them one after the other); returns how many inbox entries the nodes wrote. A node that
    fails is logged: the verdict stays in the server's audit log."""
    lists = {node: (list(r) if isinstance(r, (list, tuple)) else [r])
             for node, r in receipts.items()}
    written = 0
    for wave in range(max((len(v) for v in lists.values()), default=0)):
        written += _send_receipt_wave(grid, {n: v[wave] for n, v in lists.items()
                                             if len(v) > wave}, audit)
    return written


def _anchored(record: ConfigRecord, seq: int, digest: str) -> ConfigRecord:
    out = ConfigRecord(dict(record))
    out["audit-seq"], out["audit-sha256"] = int(seq), digest
    return out


def _send_receipt_wave(grid: Grid, receipts: Mapping[int, ConfigRecord], audit) -> int:
    if not receipts:
        return 0
    nodes = set(grid.get_node_ids())
    anchor = audit.head() if audit is not None else None
    if anchor is not None:  # the chain's head now: the data owner can check the log later
        receipts = {node: _anchored(record, *anchor) for node, record in receipts.items()}
    messages = [Message(RecordDict({RECEIPT_RECORD: record}), dst_node_id=node,
                        message_type=QUERY_UNLEARN)
                for node, record in sorted(receipts.items()) if node in nodes]
    written = 0
    for reply in grid.send_and_receive(messages, timeout=reply_timeout(grid)):
        node = int(reply.metadata.src_node_id)
        record = receipts[node]
        if reply.has_error():
            log(WARNING, "node %d did not take its receipt (%s): %s", node,
                record["status"], reply.error.reason)
            continue
        ack = reply.content.config_records.get(RECEIPT_ACK, ConfigRecord())
        count = ack.get("written", 0)
        count = count if isinstance(count, int) and not isinstance(count, bool) else 0
        written += count
        log(INFO, "Receipt (%s) for inbox request(s) %s written on node %d", record["status"],
            ", ".join(record["request-ids"]), node)
        if audit is not None:
            extra = {"method": record["method"]} if "method" in record else {}
            audit.record("receipt.sent", node=node, status=record["status"],
                         inbox_ids=list(record["request-ids"]), written=count, **extra)
    return written



def without_run_config_requests(cfg):
    """``cfg`` for a deployment: the run-config's ``forget.clients`` cleared (it names
    simulated clients; on a deployment a request comes from the node, through its inbox
    or node-config), and the partitions it named, for the log and the audit."""
    ignored = tuple(cfg.forget.clients)
    if not ignored:
        return cfg, ignored
    log(WARNING, "forget.clients=%s is ignored on a deployment: run-config requests apply "
        "to simulations only; a node asks through its inbox (fedunlearn request file) or "
        "its node-config (forget-scope=...)", ",".join(map(str, ignored)))
    return dataclasses.replace(cfg, forget=dataclasses.replace(cfg.forget, clients=())), ignored

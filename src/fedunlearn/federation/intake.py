"""The unlearning requests: parsed strictly, each bound to the node that sent it and
validated against the verified view only."""


from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from ..logs import log

from ..parsing import MissingField, WireError, only_fields, shorten, str_list
from ..protocol import REJECTED_RECORD, WITHDRAWN_RECORD
from ..replies import parse_node_record, parse_node_report
from ..requests import (
    INBOX_ID_PATTERN,
    INVALID_SCOPE,
    MAX_ERROR_CHARS,
    MAX_INBOX_IDS,
    REQUEST_RECORD,
    UnlearningRequest,
    check_request_shape,
    empty_forget_reason,
    ids_not_held_reason,
    validate_request,
)

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


def withdrawn_ids(msg) -> tuple[str, ...]:
    """The inbox ids a ``query.unlearn`` reply says its data owner withdrew after sending
    (its ``withdrawn`` record, strictly parsed; a malformed one counts as none)."""
    if msg.has_error() or WITHDRAWN_RECORD not in msg.content.config_records:
        return ()
    record = msg.content.config_records[WITHDRAWN_RECORD]
    try:
        only_fields(record, ("inbox-ids",), WITHDRAWN_RECORD)
        return tuple(str_list("inbox-ids", record.get("inbox-ids"), MAX_INBOX_IDS, 64,
                              INBOX_ID_PATTERN))
    except WireError:
        return ()


def node_label(node: int, report: Mapping) -> int:
    """The label a plugin server files a node under in its view (node -> label): the
    partition id the node reports (a simulation gives every node one), else its node id
    (a deployment's node with private data has none). A request binds to the node that
    sent it either way; the label only names the node in the view and the audit log."""
    return int(report["partition-id"]) if "partition-id" in report else int(node)


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
    their requests (nobody can tell which holder is genuine) — on the harness's shared
    data only: with ``data=None`` a partition id is the node's own label, and each
    request binds to the node that sent it.

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
    read = _read_replies(replies, data, reports)
    shared, node_partitions = _bind_partitions(read.claims, verified,
                                               labels_only=data is None)
    labels = np.asarray(data.train.targets) if data is not None else None
    accepted: dict[int, UnlearningRequest] = {}
    rejected: list[dict] = []
    for node, record in read.raw:
        inbox_ids = _inbox_ids(record) if record is not None else ()
        request = None
        reason = _binding_reason(node, record, read, shared, node_partitions,
                                 verified is not None)
        if reason is None:
            request, reason = _checked_request(node, record, node_partitions, data, labels,
                                               reports)
        if audit is not None:
            audit.record("request.received", **_received(node, node_partitions.get(node),
                                                         request, inbox_ids))
        if reason is None:
            _accept(node, request, accepted, audit)
        else:
            _reject(node, reason, inbox_ids, node_partitions, rejected, audit)
    _reject_node_refusals(read.node_refused, node_partitions, rejected, audit)
    return accepted, rejected


@dataclass
class _Replies:
    """What the ``query.unlearn`` replies say, before any request is checked."""

    claims: dict[int, int] = field(default_factory=dict)
    """node id -> the partition it claims to hold"""
    bad_claims: dict[int, str] = field(default_factory=dict)
    """node id -> why its node record (or report) could not be parsed"""
    raw: list[tuple[int, object]] = field(default_factory=list)
    """``(node id, request record)`` per reply that carries a request"""
    node_refused: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    """node id -> ``(inbox id, reason)`` per inbox request its own check refused"""


def _read_replies(replies, data, reports: dict[int, dict] | None) -> _Replies:
    """Each answering node's partition claim, request record and refusals; a failed
    reply is logged and skipped, a malformed claim kept as its reason."""
    read = _Replies()
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
                read.claims[node] = node_label(node, report)
            else:
                read.claims[node] = parse_node_record(msg.content)
        except WireError as err:
            read.bad_claims[node] = str(err)
        if REQUEST_RECORD in msg.content:
            read.raw.append((node, msg.content.config_records.get(REQUEST_RECORD)))
        if REJECTED_RECORD in msg.content:
            try:
                read.node_refused[node] = _node_rejections(
                    msg.content.config_records.get(REJECTED_RECORD))
            except WireError as err:
                log(WARNING, "node %d: malformed record of requests it refused ignored: %s",
                    node, err)
    return read


def _bind_partitions(claims: dict[int, int], verified: dict[int, int] | None,
                     labels_only: bool = False
                     ) -> tuple[dict[int, list[int]], dict[int, int]]:
    """``(shared, node_partitions)``: the nodes whose claimed partition is also claimed
    by another (node -> all its claimants; only without ``verified``), and the partition
    each node's requests are bound to (``verified`` when given, else the unshared
    claims). With ``labels_only`` (a plugin server: the nodes hold their own data, and a
    partition id is a label a node gives itself) a request binds to the node that sent
    it: two nodes with one label never block each other."""
    shared: dict[int, list[int]] = {}
    if verified is None and labels_only:
        node_partitions = dict(claims)
    elif verified is None:
        holders: dict[int, list[int]] = {}
        for node, partition in sorted(claims.items()):
            holders.setdefault(partition, []).append(node)
        shared = {n: nodes for nodes in holders.values() if len(nodes) > 1 for n in nodes}
        node_partitions = {n: p for n, p in claims.items() if n not in shared}
    else:
        node_partitions = dict(verified)
    return shared, node_partitions


def _binding_reason(node: int, record, read: _Replies, shared: dict[int, list[int]],
                    node_partitions: dict[int, int], is_verified: bool) -> str | None:
    """Why a request cannot be bound to its node's partition (``None`` when it can):
    checked before the request itself is parsed."""
    claims = read.claims
    if record is None:
        return "malformed request record: request is not a ConfigRecord"
    if node in read.bad_claims:
        return f"malformed node record: {read.bad_claims[node]}"
    if node in shared:
        return (f"partition {claims[node]} is claimed by several nodes "
                f"{shared[node]}: a request cannot be bound to the partition's holder")
    if node not in node_partitions:
        return ("the node is not in the verified federation (it joined after the "
                "partition check or under a new id)" if is_verified
                else "the node did not say which partition it holds")
    if node in claims and claims[node] != node_partitions[node]:
        return (f"the node now claims partition {claims[node]}, but it was verified "
                f"holding partition {node_partitions[node]}")
    return None


def _checked_request(node: int, record, node_partitions: dict[int, int], data, labels,
                     reports: dict[int, dict] | None
                     ) -> tuple[UnlearningRequest | None, str | None]:
    """``(request, reason)`` for a record bound to its node's partition: the node's own
    error (``scope="invalid"``), a parse error, or the request validated against the
    data (or, with ``data=None``, against what the node reported)."""
    if record.get("scope") == INVALID_SCOPE:
        try:
            return None, _node_error(record)
        except WireError as err:
            return None, f"malformed request record: {err}"
    try:
        request = UnlearningRequest.from_config_record(record, node_id=node)
        if data is not None and request.partition_id is None:  # the harness's nodes name it
            raise MissingField("partition-id", "expected an integer (the partition this "
                               "node holds)", prefix="malformed request record: ")
    except WireError as err:
        return None, str(err)
    if data is None:
        reason = validate_reported(request, node_partitions[node],
                                   (reports or {}).get(node, {}), node_partitions)
    else:
        reason = validate_request(request, node_partitions[node], node_partitions,
                                  data.train_indices, labels, data.info.num_classes)
    return request, reason


def _accept(node: int, request: UnlearningRequest, accepted: dict[int, UnlearningRequest],
            audit) -> None:
    """Keep a valid request: logged and, with ``audit``, recorded as accepted."""
    accepted[node] = request
    log(INFO, "Unlearning request accepted from node %d: %s", node, request.describe())
    if audit is not None:
        audit.record("request.accepted", node=node, partition=request.partition_id,
                     scope=request.scope, digest=request.digest())


def _reject(node: int, reason: str, inbox_ids: tuple[str, ...],
            node_partitions: dict[int, int], rejected: list[dict], audit) -> None:
    """Refuse a request: its entry in ``rejected``, logged and, with ``audit``,
    recorded as rejected."""
    entry = {"node_id": node, "reason": reason}
    if inbox_ids:
        entry["inbox_ids"] = list(inbox_ids)
    rejected.append(entry)
    log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
    if audit is not None:
        audit.record("request.rejected", node=node, partition=node_partitions.get(node),
                     reason=reason)


def _reject_node_refusals(node_refused: dict[int, list[tuple[str, str]]],
                          node_partitions: dict[int, int], rejected: list[dict],
                          audit) -> None:
    """The inbox requests the nodes' own checks refused, in node order: each an entry
    in ``rejected`` (their receipts go out merged, one per node), one log line and,
    with ``audit``, one ``request.rejected`` record per node (its ids and reasons)."""
    for node, refused in sorted(node_refused.items()):
        reasons = [f"the node's own check: {reason}" for _, reason in refused]
        ids = [inbox_id for inbox_id, _ in refused]
        for inbox_id, reason in zip(ids, reasons):
            rejected.append({"node_id": node, "reason": reason, "inbox_ids": [inbox_id]})
        more = f" (and {len(ids) - 3} more)" if len(ids) > 3 else ""
        log(WARNING, "Unlearning request(s) %s%s REJECTED by node %d: %s", ", ".join(ids[:3]),
            more, node, reasons[0])
        if audit is not None:
            same = len(set(reasons)) == 1
            audit.record("request.rejected", node=node, partition=node_partitions.get(node),
                         by="node", inbox_ids=ids,
                         **({"reason": reasons[0]} if same
                            else {"reasons": [r[:300] for r in reasons]}))


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
                                   request.partition_id, report.get("num-train", 0))
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



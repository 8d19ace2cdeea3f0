"""``query.unlearn``: the partition this node holds and its unlearning request, if any;
and the server's verdicts on inbox requests, written back to the inbox as receipts."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from ..logs import log

from .. import protocol as P
from ..inbox import INBOX_KEY, parse_receipt
from ..metrics import predict
from ..replies import CHECK_HASH_OK
from ..requests import (
    INVALID_SCOPE,
    MAX_ERROR_CHARS,
    NODE_RECORD,
    QUERY_CONFIG,
    RECEIPT_ACK,
    RECEIPT_RECORD,
    REQUEST_RECORD,
    RUN_CONFIG_REQUESTS,
    WANT_REQUEST,
    forget_indices,
)
from .node import NodeView, local_check, node_inbox, own_request, resolve_view


def node_report(view: NodeView, context: Context) -> ConfigRecord:
    """What a node tells the server about itself: never its data. The harness's nodes
    name their partition (a plugin node only when its node-config has a ``partition-id``:
    a node with private data has none, and the server labels it by its node id); every
    node reports its training split's size, its label set and the labels it holds."""
    record = ConfigRecord()
    if view.reports_partition:
        record[P.PARTITION_ID] = view.partition_id
        record[P.NUM_PARTITIONS] = view.num_partitions()
    elif view.partition_id is not None and P.PARTITION_ID in context.node_config:
        record[P.PARTITION_ID] = view.partition_id
    record[P.NUM_TRAIN] = int(len(view.train_ids))
    record[P.NUM_CLASSES] = int(view.num_classes)
    held = np.unique(view.labels()[view.train_ids]) if len(view.train_ids) else []
    record[P.CLASSES_HELD] = [int(c) for c in held]
    return record


def request_counts(view: NodeView, request) -> dict:
    """What the server needs to check a request without the data: how many training
    samples it forgets and keeps, and an instance-wise request's ids the node does not
    hold (the first 10, and how many)."""
    forget = int(forget_indices(request, view.train_ids, view.labels()).size)
    out = {P.NUM_FORGET: forget, P.NUM_RETAINED: int(len(view.train_ids) - forget)}
    if request.scope == "instance":
        outside = np.setdiff1d(np.asarray(request.sample_ids, dtype=np.int64), view.train_ids)
        if outside.size:
            out[P.NUM_IDS_NOT_HELD] = int(outside.size)
            out[P.IDS_NOT_HELD] = [int(i) for i in outside[:10]]
    return out


def handle_query(msg: Message, context: Context, view_for=None) -> Message:
    """Answer ``query.unlearn``.

    A query with a ``receipt`` record carries the server's verdict on this node's inbox
    requests: it is appended to each request's history. Any other query asks which
    partition this node holds and what it wants forgotten: from its inbox, its
    node-config, or (when the query's ``run-config-requests`` allows it) the run-config;
    a query with ``want-request=False`` (the partition check) only asks the partition.
    """
    if RECEIPT_RECORD in msg.content:
        return handle_receipt(msg, context, view_for)
    view = resolve_view(view_for, context)
    content = RecordDict({NODE_RECORD: node_report(view, context)})
    allow = True
    if QUERY_CONFIG in msg.content:
        query_config = msg.content[QUERY_CONFIG]
        allow = query_config.get(RUN_CONFIG_REQUESTS, True) is True
        if query_config.get(WANT_REQUEST, True) is False:  # the partition check only
            return Message(content, reply_to=msg)
    refused: list[tuple[str, str]] = []
    try:
        request = own_request(view, context.node_config, run_config_requests=allow,
                              rejected=refused)
    except (ValueError, OSError) as err:  # OSError: an unreadable inbox
        # Report the problem instead of failing the node: the server rejects it by name.
        content[REQUEST_RECORD] = _error_record(view, str(err))
        if getattr(err, "inbox_ids", ()):
            content[REQUEST_RECORD]["inbox-ids"] = list(err.inbox_ids)
    else:
        problem = (None if request is None or view.reports_partition
                   else local_check(view, request))
        if problem is not None:
            record = _error_record(view, problem)
            if request.inbox_ids:
                record["inbox-ids"] = list(request.inbox_ids)
            content[REQUEST_RECORD] = record
        elif request is not None:
            content[REQUEST_RECORD] = request.to_config_record()
            content[NODE_RECORD].update(request_counts(view, request))
        if request is not None and request.inbox_ids:
            record_sent(context, view.partition_id, request)
    if INBOX_KEY in context.node_config:
        try:
            withdrawn = node_inbox(context.node_config).withdrawn_after_sending()
        except (ValueError, OSError):  # an unusable inbox: its request record says why
            withdrawn = []
        if withdrawn:
            content[P.WITHDRAWN_RECORD] = ConfigRecord({"inbox-ids": withdrawn})
    if refused:
        content[P.REJECTED_RECORD] = ConfigRecord(
            {"inbox-ids": [i for i, _ in refused],
             "reasons": [reason[:MAX_ERROR_CHARS] for _, reason in refused]})
    return Message(content, reply_to=msg)


def _error_record(view: NodeView, error: str) -> ConfigRecord:
    """The request record of a node that could not build its request (``scope="invalid"``,
    its partition id when it has one)."""
    record = ConfigRecord({"scope": INVALID_SCOPE, "error": error[:MAX_ERROR_CHARS]})
    if view.partition_id is not None:
        record["partition-id"] = view.partition_id
    return record


def record_sent(context: Context, partition_id: int | None, request) -> None:
    """Note in each inbox request's history that it went to the server in this run."""
    inbox = node_inbox(context.node_config)
    for request_id in request.inbox_ids:
        try:
            inbox.append_event(request_id, {
                "status": "sent", "run": int(context.run_id), "node": int(context.node_id),
                "partition": partition_id, "scope": request.scope,
                "digest": request.digest()})
        except (OSError, ValueError) as err:  # the request still goes out
            log(WARNING, "could not note inbox request %s as sent: %s", request_id, err)


def handle_receipt(msg: Message, context: Context, view_for=None) -> Message:
    """Append the server's verdict to the history of each inbox request it names.

    An ``honoured`` receipt that carries the published model (service mode) is checked
    here, on the node, before it is written: the model's SHA-256 against the one the
    receipt names, and its accuracy and loss on this node's forget and retained data
    (:func:`node_check`). The check goes into every named request's receipt and back to
    the server in the acknowledgement; the data never leaves the node. A verdict a
    request already holds is not written again (``already`` in the acknowledgement)."""
    written = already = 0
    try:
        receipt = parse_receipt(msg.content[RECEIPT_RECORD])
    except ValueError as err:
        log(WARNING, "malformed receipt from the server ignored: %s", err)
        return Message(RecordDict({RECEIPT_ACK: ConfigRecord({"written": 0,
                                                              "error": str(err)[:500]})}),
                       reply_to=msg)
    ack = ConfigRecord()
    check = None
    if receipt["status"] == "honoured" and P.MODEL_KEY in msg.content.array_records:
        try:
            check = node_check(msg, context, receipt, view_for)
        except (ValueError, RuntimeError, KeyError) as err:
            log(WARNING, "could not check the published model: %s", err)
            check = {"error": str(err)[:300]}
        for key, value in check.items():
            ack[f"check-{key}"] = value
    if INBOX_KEY in context.node_config:
        inbox = node_inbox(context.node_config)
        event = {k: v for k, v in receipt.items() if k not in ("request_ids", "reasons")}
        event["node"] = int(context.node_id)
        reasons = receipt.get("reasons") or [None] * len(receipt["request_ids"])
        for request_id, reason in zip(receipt["request_ids"], reasons):
            request_file = inbox.requests_dir / f"{request_id}.json"
            if not request_file.exists() or request_file.is_symlink():
                log(WARNING, "receipt for unknown inbox request %s ignored", request_id)
                continue
            entry_event = dict(event) if reason is None else dict(event, reason=reason)
            if _holds_already(inbox, request_id, entry_event):
                already += 1  # sent again by a server that did not learn it arrived
                continue
            if check is not None:
                entry_event["check"] = dict(check)
                waited = _since_filed(inbox, request_id)
                if waited is not None:
                    entry_event["filed_to_honoured_s"] = waited
            try:
                inbox.append_event(request_id, entry_event)
            except (OSError, ValueError) as err:  # e.g. a symbolic link: refused
                log(WARNING, "receipt for inbox request %s not written: %s", request_id, err)
                continue
            written += 1
    ack["written"] = written
    if already:
        ack["already"] = already
    return Message(RecordDict({RECEIPT_ACK: ack}), reply_to=msg)


#: What makes two verdicts the same verdict (besides their status); a receipt that names
#: neither a version nor a round (not service mode) is also told apart by its run.
_VERDICT_KEYS = ("method", "model_sha256", "version", "round", "reason")


def _holds_already(inbox, request_id: str, event: dict) -> bool:
    """Whether the request's history already holds this final verdict: a rejection (a
    request is rejected once), or the same honoured or failed verdict (same method,
    model, version, round, reason), sent again by a server that was killed before it
    learnt that the first one arrived. The data owner gets each verdict once."""
    status = event["status"]
    if status not in ("rejected", "honoured", "failed"):
        return False
    keys = _VERDICT_KEYS
    if event.get("version") is None and event.get("round") is None:
        keys += ("run",)
    try:
        history = inbox.events(request_id)
    except (OSError, ValueError):
        return False  # written, and the reason the history cannot be read stays visible
    return any(e.get("status") == status and (
        status == "rejected" or all(e.get(k) == event.get(k) for k in keys))
        for e in history)


def node_check(msg: Message, context: Context, receipt: dict, view_for=None) -> dict:
    """The node's own check of a published model (an ``honoured`` receipt's ``arrays``,
    with the honoured request echoed in its ``config``): does the model hash to the
    array digest the receipt names (``model-arrays-sha256``: the node holds the arrays,
    not the server's file), and how does it do on the forget data and on the data the
    node keeps (accuracy in %, mean cross-entropy; ``nan`` for an empty set)."""
    import torch

    from ..audit import model_digest
    from .actions import ActionJob

    arrays = msg.content[P.MODEL_KEY]
    out: dict = {CHECK_HASH_OK: model_digest(arrays) == receipt.get("model_arrays_sha256")}
    job = ActionJob.from_message(msg, context, view_for)
    for name, ids in (("forget", job.forget), ("retain", job.retained)):
        logits, labels = predict(job.model, job.view.dataset, ids, device=job.device)
        total = int(len(ids))
        out[f"{name}-total"] = total
        if total:  # an empty set (a client-wise target keeps nothing) reports no accuracy
            lt = torch.as_tensor(logits)
            yt = torch.as_tensor(labels)
            out[f"{name}-accuracy"] = round(100.0 * float((lt.argmax(1) == yt).float().mean()), 4)
            out[f"{name}-loss"] = round(float(torch.nn.functional.cross_entropy(lt, yt)), 6)
    return out


def _since_filed(inbox, request_id: str) -> float | None:
    """Seconds from the data owner's filing of ``request_id`` to now."""
    import datetime as dt

    try:
        filed = dt.datetime.fromisoformat(inbox.entry(request_id).request.filed_at)
    except (ValueError, OSError, KeyError):
        return None
    if filed.tzinfo is None:
        filed = filed.replace(tzinfo=dt.timezone.utc)
    return round((dt.datetime.now(dt.timezone.utc) - filed).total_seconds(), 3)

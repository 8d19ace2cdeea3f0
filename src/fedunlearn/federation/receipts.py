"""The verdicts on inbox requests, sent back to their nodes as receipts."""


from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from ..logs import log
from flwr.serverapp import Grid

from ..protocol import reply_timeout
from ..requests import MAX_INBOX_IDS, QUERY_UNLEARN, RECEIPT_ACK, RECEIPT_RECORD


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
    lists = {node: merge_receipts(list(r) if isinstance(r, (list, tuple)) else [r])
             for node, r in receipts.items()}
    written = 0
    for wave in range(max((len(v) for v in lists.values()), default=0)):
        written += _send_receipt_wave(grid, {n: v[wave] for n, v in lists.items()
                                             if len(v) > wave}, audit)
    return written


def merge_receipts(records: list[ConfigRecord]) -> list[ConfigRecord]:
    """One receipt per status (and per set of other fields) for one node, not one per
    inbox id: the ids of records that differ only in their ids and ``reason`` are sent
    together, each id with its own reason (``reasons``, aligned with ``request-ids``)
    when the reasons differ; at most ``MAX_INBOX_IDS`` ids per record. A node whose 50
    filings were all rejected gets one message, not 50."""
    groups: dict[tuple, list[ConfigRecord]] = {}
    for record in records:
        rest = tuple(sorted((k, str(v)) for k, v in record.items()
                            if k not in ("request-ids", "reason", "reasons")))
        groups.setdefault(rest, []).append(record)
    out = []
    for group in groups.values():
        pairs: dict[str, str] = {}
        for record in group:
            reasons = _reasons_of(record)
            for inbox_id, reason in zip(record["request-ids"], reasons):
                pairs.setdefault(inbox_id, reason)
        ids = list(pairs)
        for start in range(0, len(ids), MAX_INBOX_IDS):
            chunk = ids[start:start + MAX_INBOX_IDS]
            merged = ConfigRecord({k: v for k, v in group[0].items()
                                   if k not in ("request-ids", "reason", "reasons")})
            merged["request-ids"] = chunk
            reasons = [pairs[i] for i in chunk]
            if len(set(reasons)) == 1:
                if reasons[0]:
                    merged["reason"] = reasons[0]
            else:
                merged["reasons"] = [r[:MAX_MERGED_REASON] for r in reasons]
            out.append(merged)
    return out


#: A reason's length in a merged receipt (one per id; a lone reason may be 600).
MAX_MERGED_REASON = 300


def _reasons_of(record: ConfigRecord) -> list[str]:
    """The reason of each id of ``record`` (``""``: none)."""
    ids = list(record["request-ids"])
    if "reasons" in record:
        return [str(r) for r in record["reasons"]]
    return [str(record.get("reason", ""))] * len(ids)


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




"""Service mode's outbox: honoured receipts sent with the published model, and the
nodes' own checks of it."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from ..logs import log

from .. import federation
from ..audit import model_digest
from ..parsing import shorten
from ..protocol import (
    CONFIG_KEY,
    MODEL_KEY,
    QUERY_UNLEARN,
    RECEIPT_ACK,
    RECEIPT_RECORD,
    reply_timeout,
)
from ..replies import CHECK_HASH_OK, parse_node_check
from ..requests import UnlearningRequest, request_to_config
from .state import (
    VERSIONS_FILE,
    _atomic_json,
    _fmt,
    _request_from_dict,
    arrays_digest_of,
    read_versions,
)


class Outbox:
    """The part of :class:`UnlearningService` that delivers honoured receipts."""

    def queue_verdict(self, item: dict) -> None:
        """Put a final verdict in the outbox and keep it by inbox id: a node that sends
        the request again (its receipt never arrived) gets it again."""
        self.state.outbox.append(item)
        for inbox_id in item["request"].get("inbox_ids", []):
            self.state.verdicts[inbox_id] = item

    def resend_verdicts(self, node: int, inbox_ids: list[str]) -> bool:
        """Queue again the final verdicts of ``inbox_ids`` that ``node`` sent once more;
        ``True`` when every id has one."""
        items = [self.state.verdicts.get(i) for i in inbox_ids]
        if not inbox_ids or any(item is None or item["node"] != node for item in items):
            return False
        queued = {id(x) for x in self.state.outbox}
        for item in items:
            if id(item) not in queued and item not in self.state.outbox:
                self.state.outbox.append(item)
                queued.add(id(item))
                log(INFO, "[service] node %d sent request(s) %s again: its %s receipt is "
                    "sent again", node, ", ".join(item["request"]["inbox_ids"]),
                    item["status"])
        return True

    def flush_outbox(self) -> None:
        """Send the receipts decided so far (in one exchange). An honoured receipt
        carries the published model, so the node checks it on its own data; what it
        measured comes back and goes to the audit log and the version's entry. A receipt
        whose node cannot be reached stays in the audit log (``receipt.undelivered``)."""
        if not self.state.outbox:
            return
        connected = set(self.grid.get_node_ids())
        departed = set(self.grid.departed)
        plain: dict[int, list] = {}  # receipts that carry no model
        honoured: list[tuple[dict, Message]] = []
        for item in self.state.outbox:
            node = item["node"]
            inbox_ids = list(item["request"].get("inbox_ids", []))
            if node not in connected or node in departed:
                self.audit.record("receipt.undelivered", node=node, status=item["status"],
                                  inbox_ids=inbox_ids,
                                  reason="the node left the federation", **(
                                      {"reason_failed": item["reason"][:500]}
                                      if "reason" in item else {}))
                log(WARNING, "[service] receipt (%s) for node %d not delivered: the node "
                    "left; it stays in the audit log", item["status"], node)
            elif item["status"] == "failed":
                plain.setdefault(node, []).append(federation.receipt_record(
                    inbox_ids, "failed", self.run_id, method=item["method"],
                    reason=item["reason"], round=item["round"]))
            elif item["status"] == "rejected":  # asked for again: its receipt was lost
                plain.setdefault(node, []).append(federation.receipt_record(
                    inbox_ids, "rejected", self.run_id, reason=item["reason"]))
            else:
                request = _request_from_dict(item["request"])
                honoured.append((item, self._honoured_message(node, request, item)))
        if plain:
            federation.send_receipts(self.grid, plain, audit=self.audit)
        if honoured:
            replies = {int(r.metadata.src_node_id): r for r in self.grid.send_and_receive(
                [m for _, m in honoured], timeout=reply_timeout(self.grid))}
            for item, msg in honoured:
                node = int(msg.metadata.dst_node_id)
                self._record_check(node, item, self._honoured_reply(node, item,
                                                                    replies.get(node)))
        self.state.outbox = []
        self.checkpoint()

    def _honoured_message(self, node: int, request: UnlearningRequest, item: dict) -> Message:
        arrays = self._version_arrays(item)
        record = federation.receipt_record(
            request.inbox_ids, "honoured", self.run_id, method=item["method"],
            model_sha256=item["sha256"], model_arrays_sha256=arrays_digest_of(item),
            rounds=item["rounds"], comm_bytes=item["comm_bytes"],
            version=item["version"], round=item["round"],
            deadline_missed=int(bool(item.get("deadline_missed"))))
        anchor = self.audit.head()
        if anchor is not None:
            record["audit-seq"], record["audit-sha256"] = int(anchor[0]), anchor[1]
        config = ConfigRecord({"max-members": 0})
        config.update(request_to_config(request))
        return Message(RecordDict({RECEIPT_RECORD: record, MODEL_KEY: arrays,
                                   CONFIG_KEY: config}),
                       dst_node_id=node, message_type=QUERY_UNLEARN)

    def _honoured_reply(self, node: int, item: dict, reply: Message | None) -> dict:
        request = _request_from_dict(item["request"])
        if reply is None or reply.has_error():
            why = reply.error.reason if reply is not None else "no reply"
            log(WARNING, "[service] node %d did not take its honoured receipt: %s", node, why)
            self.audit.record("receipt.undelivered", node=node, status="honoured",
                              inbox_ids=list(request.inbox_ids), reason=why[:500])
            return {}
        ack = reply.content.config_records.get(RECEIPT_ACK, ConfigRecord())
        check, problems = parse_node_check(ack)
        written, already = ack.get("written", 0), ack.get("already", 0)
        if isinstance(written, bool) or not isinstance(written, int):
            problems.append(f"written={shorten(written, 40)}: expected an integer")
            written = 0
        if isinstance(already, bool) or not isinstance(already, int):
            problems.append(f"already={shorten(already, 40)}: expected an integer")
            already = 0
        self.audit.record("receipt.sent", node=node, status="honoured",
                          inbox_ids=list(request.inbox_ids), written=written,
                          **({"already": already} if already else {}),
                          method=item["method"], published_version=item["version"],
                          check=check, **({"check_refused": problems} if problems else {}))
        if problems:
            log(WARNING, "[service] node %d's check of version %d: entries left out: %s",
                node, item["version"], "; ".join(problems))
        log(INFO, "Receipt (honoured) for inbox request(s) %s written on node %d",
            ", ".join(request.inbox_ids), node)
        return check

    def _record_check(self, node: int, item: dict, check: dict) -> None:
        if not check:
            return
        for step in self.state.steps:
            if step["version"] == item["version"]:
                step.setdefault("node_checks", {})[str(node)] = check
        versions = read_versions(self.state_dir)
        for v in versions:
            if v["version"] == item["version"]:
                v.setdefault("node_checks", {})[str(node)] = check
        _atomic_json(self.state_dir / VERSIONS_FILE, {"versions": versions})
        retained = ("nothing retained" if not check.get("retain-total") else
                    f"retained {_fmt(check.get('retain-accuracy'))}% "
                    f"(loss {_fmt(check.get('retain-loss'))})")
        log(INFO, "[service]   node %d checked version %d: hash %s; forget %s%% (loss %s), %s",
            node, item["version"], "ok" if check.get(CHECK_HASH_OK) else "MISMATCH",
            _fmt(check.get("forget-accuracy")), _fmt(check.get("forget-loss")), retained)

    def _version_arrays(self, item: dict) -> ArrayRecord:
        if arrays_digest_of(item) == model_digest(self.arrays):
            return self.arrays
        from ..serving import load_model

        return load_model(item["path"])


"""Service mode's audit records, committed with its checkpoint: a record that describes a
change of the checkpoint's state (a request received, accepted, rejected, withdrawn,
honoured or failed; a version published) is held back until the checkpoint that holds
the change is written, goes into that checkpoint, and is written to the audit log right
after it. A ``kill -9`` before the checkpoint leaves no record of work the service will
do again; one after it leaves the records in the checkpoint, and a resume writes those
the log does not hold yet: each such record is in the log exactly once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..audit import AuditLog, _json_safe
from ..ledger import Ledger
from ..parsing import loads_json


class ServiceAudit:
    """The service's audit log: its round and version on every record; between
    :meth:`hold` and the next checkpoint (:meth:`release`) records are held back."""

    def __init__(self, audit: AuditLog, where: Callable[[], dict]) -> None:
        self.inner, self.where = audit, where
        self._held: list[dict] | None = None

    def record(self, event: str, **fields) -> dict:
        fields = {**self.where(), **fields}
        if self._held is None:
            return self.inner.record(event, **fields)
        entry = {"event": event,
                 "fields": json.loads(json.dumps(_json_safe(fields), allow_nan=False))}
        self._held.append(entry)
        return {"event": event, **entry["fields"]}

    def now(self, event: str, **fields) -> dict:
        """Write a record at once, held records or not."""
        return self.inner.record(event, **{**self.where(), **fields})

    def hold(self) -> None:
        """Hold back the records from here to the next checkpoint."""
        if self._held is None:
            self._held = []

    def release(self) -> list[dict]:
        """The records held back (for the checkpoint); records are written at once again."""
        held, self._held = self._held or [], None
        return held

    def write(self, entries: list[dict]) -> None:
        for entry in entries:
            self.inner.record(entry["event"], **entry["fields"])

    def missing(self, entries: list[dict], after_seq: int) -> list[dict]:
        """Of ``entries`` (a checkpoint's records, written in order right after it, when
        the log's last seq was ``after_seq``), those the log does not hold."""
        if not entries or not self.inner.path.exists():
            return list(entries)
        k = 0
        for record in _records_after(self.inner.path, after_seq):
            if k == len(entries):
                break
            entry = entries[k]
            if record.get("event") != entry["event"] or any(
                    record.get(key) != value for key, value in entry["fields"].items()):
                break
            k += 1
        return list(entries[k:])

    def recorded(self, event: str, **fields) -> bool:
        """Whether the log holds an ``event`` record with these field values."""
        if not self.inner.path.exists():
            return False
        return any(r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
                   for r in _records_after(self.inner.path, -1))

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CommittedLedger(Ledger):
    """The service's :class:`~fedunlearn.ledger.Ledger`: a method's refusal and failure
    records are committed with the checkpoint that counts the attempt."""

    def refused(self, method: str, reason: str) -> None:
        self.audit.hold()
        super().refused(method, reason)

    def unlearning_failed(self, method: str, reason: str, **fields) -> None:
        self.audit.hold()
        super().unlearning_failed(method, reason, **fields)


def _records_after(path: Path, after_seq: int) -> list[dict]:
    """The log's complete records with ``seq > after_seq``, in order (a partial line a
    crash left is skipped)."""
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = loads_json(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("seq"), int) \
                and record["seq"] > after_seq:
            out.append(record)
    return out

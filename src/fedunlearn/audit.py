"""The server's audit log: what was asked, what was decided, what was done.

An unlearning request is a legal act (the right to be forgotten), so the ServerApp
keeps a record of each one: an append-only JSON-lines file, one record per event,
each written with a single ``write`` and then flushed and ``fsync``-ed before the job
goes on. Events (``event`` field):

* ``job.started``: methods, data set, federation size, whether it is a deployment;
* ``federation.verified``: which node holds which partition (checked once, kept);
* ``node.excluded``: a node outside that view (late, restarted, impostor) left out;
* ``request.received``: node, partition, scope, classes, the number of sample ids and
  a SHA-256 digest of the request (never the ids themselves), inbox request ids;
* ``request.accepted`` / ``request.rejected`` (with the reason);
* ``method.refused``: a method that cannot serve the requests (with the reason);
* ``unlearning.started``: method, parameters, target nodes, hash of the model before;
* ``unlearning.finished``: rounds, bytes, metrics, hashes of the model before and after;
* ``receipt.sent``: the verdict sent back to a node's inbox;
* ``job.finished`` / ``job.failed``.

Every record has ``seq`` (its position in the file), ``time`` (UTC), ``run`` (the
Flower run id), ``event`` and ``prev``, the SHA-256 of the previous record's line, so a
record removed or edited later breaks the chain and :func:`read_audit` says where.
A crash can leave at most a partial last line; the next writer seals it with a newline
and chains to the last complete record, and readers skip and report it.

``fedunlearn audit LOG`` prints a log as a table (:func:`format_table`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

AUDIT_ENV = "FEDUNLEARN_AUDIT_LOG"
"""Environment variable: one audit log for every job of this SuperLink (appended to);
without it each job writes ``<output-dir>/audit.jsonl``."""
AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
"""``prev`` of a log's first record."""
_TAIL_BYTES = 1 << 16


def audit_path(output_dir: Path) -> Path:
    """``$FEDUNLEARN_AUDIT_LOG`` when set, else ``<output_dir>/audit.jsonl``."""
    env = os.environ.get(AUDIT_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else Path(output_dir) / AUDIT_FILE


def model_digest(arrays: ArrayRecord) -> str:
    """SHA-256 of a model: every array's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(json.dumps([name, array.dtype, list(array.shape)]).encode())
        h.update(array.numpy().tobytes())
    return h.hexdigest()


def _line_digest(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _json_safe(value: Any) -> Any:
    """Plain JSON: dict keys as strings, tuples/sets as lists, NaN/inf as strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_json_safe(v) for v in items]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return _json_safe(value.tolist())
    return value


TERMINAL_EVENTS = ("job.finished", "job.failed", "serve.finished", "serve.failed",
                   "job.interrupted")
"""Events that end a run's records in the log."""


class AuditLog:
    """Append-only JSONL audit log.

    Parameters
    ----------
    path : Path
        The log file (created with its folder; appended to when it exists).
    run_id : int
        The Flower run these records belong to.
    """

    def __init__(self, path: Path, run_id: int = 0) -> None:
        self.path = Path(path)
        self.run_id = int(run_id)

    def record(self, event: str, **fields: Any) -> dict:
        """Append one record and make it durable before returning it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: seq and prev stay a chain
            seq, prev, sealed = self._tail(fd)
            record = {"seq": seq, "time": _now(), "run": self.run_id, "event": event,
                      **_json_safe(fields), "prev": prev}
            line = json.dumps(record, sort_keys=False, separators=(",", ":"),
                              allow_nan=False).encode() + b"\n"
            os.write(fd, (b"" if sealed else b"\n") + line)
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        return record

    def last_record(self) -> dict | None:
        """The log's last complete record (``None`` for an empty or missing log)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - _TAIL_BYTES)
            for line in reversed(os.pread(fd, size - start, start).split(b"\n")):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("seq"), int):
                    return record
            return None
        finally:
            os.close(fd)

    def note_interrupted(self) -> dict | None:
        """When the log's last run did not end (no ``job.finished``/``job.failed``/
        ``serve.finished``/``serve.failed``: its ServerApp was killed or lost), record
        ``job.interrupted`` for it before this run starts; return that record."""
        last = self.last_record()
        if last is None or last.get("event") in TERMINAL_EVENTS:
            return None
        return self.record("job.interrupted", interrupted_run=last.get("run"),
                           last_event=last.get("event"), last_seq=last.get("seq"),
                           last_time=last.get("time"))

    @staticmethod
    def _tail(fd: int) -> tuple[int, str, bool]:
        """(next seq, digest of the last complete record, whether the file ends with a
        newline) from the end of the file."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS, True
        start = max(0, size - _TAIL_BYTES)
        data = os.pread(fd, size - start, start)
        while True:
            sealed = data.endswith(b"\n")
            lines = data.split(b"\n")
            complete = lines[:-1]  # the last piece is partial (or empty when sealed)
            for line in reversed(complete):
                try:
                    last = json.loads(line)
                except ValueError:
                    continue  # a partial line sealed by an earlier writer
                if isinstance(last, dict) and isinstance(last.get("seq"), int):
                    return last["seq"] + 1, _line_digest(line), sealed
            if start == 0:
                return 0, GENESIS, sealed
            start = max(0, start - _TAIL_BYTES)
            data = os.pread(fd, size - start, start)


@dataclass
class AuditReading:
    """What :func:`read_audit` found: the records and every problem, by line."""

    records: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chain_breaks: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.chain_breaks


def read_audit(path: Path) -> AuditReading:
    """Read an audit log, skipping (and reporting) partial or unreadable lines and
    checking the ``prev`` chain."""
    out = AuditReading()
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        out.skipped.append(f"line {len(lines)}: incomplete last record (the writer stopped "
                           "mid-record); ignored")
        lines.pop()
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            out.skipped.append(f"line {number}: not a complete JSON record "
                               f"({line[:40]!r}); ignored")
            continue
        if record.get("prev") != prev:
            out.chain_breaks.append(
                f"line {number} (seq {record.get('seq')}): prev does not match the record "
                "before it (a record was removed, edited or inserted)")
        prev = _line_digest(line)
        out.records.append(record)
    return out


_COLUMNS = ("seq", "time", "run", "event", "node", "partition", "details")
_SHOWN_KEYS = {"seq", "time", "run", "event", "node", "partition", "prev"}


def format_table(records: list[dict]) -> str:
    """A fixed-width table: one row per record; ``details`` holds the other fields."""
    rows = [list(_COLUMNS)]
    for r in records:
        details = ", ".join(f"{k}={_brief(v)}" for k, v in r.items() if k not in _SHOWN_KEYS)
        rows.append([str(r.get("seq", "")), str(r.get("time", "")), str(r.get("run", "")),
                     str(r.get("event", "")), _brief(r.get("node", "")),
                     _brief(r.get("partition", "")), details])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    out = []
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in out)


def _brief(value: Any, limit: int = 80) -> str:
    if value is None or value == "":
        return ""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")

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
* ``unlearning.started``: method, parameters, target nodes, the array digest of the
  model before (``model_before_arrays_sha256``);
* ``unlearning.finished``: rounds, bytes, metrics, the model before's array digest, and
  the model after: ``model_sha256``, the SHA-256 of the file it was saved to (what
  ``sha256sum`` prints), and ``model_arrays_sha256``, its array digest;
* ``unlearning.degraded``: the same, for a model judged unfit (the recovery diverged),
  with the reason; its requests get ``request.failed``;
* ``receipt.sent``: the verdict sent back to a node's inbox;
* ``job.finished`` / ``job.failed``.

Every record has ``seq`` (its position in the file), ``time`` (UTC), ``run`` (the
Flower run id), ``event`` and ``prev``, the SHA-256 of the previous record's line, so a
record removed or edited later breaks the chain and :func:`read_audit` says where.
A crash can leave at most a partial last line; the next writer seals it with a newline
and chains to the last complete record, and readers skip and report it.

The chain alone cannot show a cut tail or an edited last record (no record follows
them), nor a log rewritten with a recomputed chain. Two anchors outside the log do:

* the **head file** ``<log>.head`` (JSON: ``seq``, ``sha256`` of the last record's line,
  ``time``), replaced atomically after every record, so a log that ends before the head
  or whose last line differs from it was cut or edited;
* the **receipts**: every verdict sent to a node's inbox carries the chain's head at
  that moment (``audit-seq``, ``audit-sha256``). A data owner holding a receipt proves
  that the log still holds that record, unchanged: a cut, an edit at or before it, or a
  rewrite of the chain (head file included) no longer matches
  (``fedunlearn audit LOG --inbox DIR``, :func:`check_anchors`).

``fedunlearn audit LOG`` prints a log as a table (:func:`format_table`).

Two hashes name a model. ``model_sha256`` (``sha256`` in ``versions.json``) is always the
SHA-256 of a saved file's bytes, so ``sha256sum model.pt`` confirms it. A model that is
not a file (the model a method starts from, the model a node is sent) is named by its
*array digest* (:func:`model_digest`), always under a name with ``arrays`` in it
(``model_arrays_sha256``, ``model_before_arrays_sha256``). Logs written before this
split (fedunlearn up to 626ba18) name the array digest ``model``, ``model_before``,
``model_after`` and ``model_sha256``; ``fedunlearn verify`` reads both.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arrays import to_numpy
from .parsing import loads_json

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

AUDIT_ENV = "FEDUNLEARN_AUDIT_LOG"
"""Environment variable: one audit log for every job of this SuperLink (appended to);
without it each job writes ``<output-dir>/audit.jsonl``."""
AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
"""``prev`` of a log's first record."""
HEAD_SUFFIX = ".head"
_TAIL_BYTES = 1 << 16


def audit_path(output_dir: Path) -> Path:
    """``$FEDUNLEARN_AUDIT_LOG`` when set, else ``<output_dir>/audit.jsonl``."""
    env = os.environ.get(AUDIT_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else Path(output_dir) / AUDIT_FILE


def head_path(log_path: Path) -> Path:
    """The head file of an audit log: ``<log>.head``."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.name + HEAD_SUFFIX)


def model_digest(arrays: ArrayRecord) -> str:
    """The *array digest* of a model: SHA-256 over every array's name, dtype, shape and
    bytes, in order. It names a model held in memory (the same arrays give the same
    digest, however they are stored); it is **not** the SHA-256 of a saved file (see
    :func:`fedunlearn.files.file_sha256`), and fedunlearn records it only under names with
    ``arrays`` in them."""
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(json.dumps([name, array.dtype, list(array.shape)]).encode())
        h.update(to_numpy(array).tobytes())
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
                   "service.finished", "service.failed", "job.interrupted")
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
            self._write_head(seq, _line_digest(line), record["time"])  # still under the lock
        finally:
            os.close(fd)  # also releases the lock
        return record

    def head(self) -> tuple[int, str] | None:
        """``(seq, sha256)`` of the log's last complete record: what a receipt carries so
        its holder can check the log later (``None`` for an empty or missing log)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            seq, digest, _ = self._tail(fd)
        finally:
            os.close(fd)
        return None if digest == GENESIS else (seq - 1, digest)

    def _write_head(self, seq: int, digest: str, time: str) -> None:
        """Replace ``<log>.head`` atomically (write a temporary file, fsync, rename)."""
        target = head_path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        data = json.dumps({"seq": seq, "sha256": digest, "time": time}).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

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
                    record = loads_json(line)
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
                    last = loads_json(line)
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
    """What :func:`read_audit` found: the records and every problem, by line.

    ``chain_breaks`` are proofs of tampering (a record removed, edited, inserted, a cut
    tail, a log that no longer matches its head file or a receipt); ``skipped`` are lines
    that could not be read (a crash mid-write) and ``notes`` are what the reader could not
    check (no head file: a log written before head files, or a copy without it)."""

    records: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chain_breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digests: dict[int, tuple[int, str]] = field(default_factory=dict)
    """seq -> (line number, SHA-256 of the record's line)."""
    unanchored: bool = False
    """The log has records but no head file: its end cannot be checked (``fedunlearn
    audit`` fails on it unless told ``--no-head``)."""

    @property
    def intact(self) -> bool:
        return not self.chain_breaks


def read_audit(path: Path, head: bool = True) -> AuditReading:
    """Read an audit log, skipping (and reporting) partial or unreadable lines, checking
    the ``prev`` chain and the ``seq`` numbering record by record, and, with ``head``,
    the log's end against its head file (``<log>.head``)."""
    out = AuditReading()
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        out.skipped.append(f"line {len(lines)}: incomplete last record (the writer stopped "
                           "mid-record); ignored")
        lines.pop()
    prev, prev_seq, prev_number = GENESIS, -1, 0
    partial = None  # (line number, the seq it began) of a crash's sealed partial line
    for number, line in enumerate(lines, start=1):
        try:
            record = loads_json(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            partial = _not_a_record(out, number, line)
            continue
        seq = record.get("seq")
        seq_ok = isinstance(seq, int) and not isinstance(seq, bool)
        if partial is not None:
            _check_partial(out, partial, seq)
            partial = None
        if seq_ok and seq > prev_seq + 1:
            out.chain_breaks.append(
                f"line {number} (seq {seq}): record(s) seq {prev_seq + 1}..{seq - 1} are "
                f"missing after line {prev_number or 'start'} (removed)")
        elif not seq_ok or seq <= prev_seq:
            out.chain_breaks.append(
                f"line {number} (seq {seq}): out of order after seq {prev_seq} (a record "
                "was inserted or moved)")
        elif record.get("prev") != prev:
            where = (f"line {prev_number} (seq {prev_seq}) was edited after it was written "
                     f"(line {number}'s prev no longer matches it)" if prev_number
                     else f"line {number} (seq {seq}): prev is not the log's start")
            out.chain_breaks.append(where)
        prev = _line_digest(line)
        if seq_ok:
            prev_seq, prev_number = seq, number
            out.digests.setdefault(seq, (number, prev))
        out.records.append(record)
    if head:
        _check_head(Path(path), out, prev_seq, prev_number, prev)
    return out


_PARTIAL_SEQ = re.compile(rb'\{"seq":(\d+)')


def _not_a_record(out: AuditReading, number: int, line: bytes) -> tuple[int, int] | None:
    """A line that is no record: the start of one a crash left (skipped; returns its
    line number and the seq it began) or anything else (a chain break: inserted)."""
    begun = _crash_prefix(line)
    if begun is None:
        out.chain_breaks.append(f"line {number}: not a record of this log "
                                f"({line[:40]!r}): inserted")
        return None
    out.skipped.append(f"line {number}: not a complete JSON record ({line[:40]!r}); "
                       "ignored")
    return number, begun


def _check_partial(out: AuditReading, partial: tuple[int, int], seq) -> None:
    """A writer that died mid-record left the start of record seq N; the next writer
    sealed it and wrote seq N again. Any other partial line was put there."""
    number, begun = partial
    if begun not in (-1, seq):
        out.chain_breaks.append(f"line {number}: a partial record of seq {begun} followed "
                                f"by seq {seq}: not left by a crash (inserted)")


def _crash_prefix(line: bytes) -> int | None:
    """The seq a partial line began (``-1``: too short to say), or ``None`` when the line
    cannot be the start of a record this module wrote."""
    if b'{"seq":'.startswith(line):
        return -1
    match = _PARTIAL_SEQ.match(line)
    return int(match.group(1)) if match else None


def _check_head(path: Path, out: AuditReading, last_seq: int, last_number: int,
                last_digest: str) -> None:
    hp = head_path(path)
    try:
        saved = json.loads(hp.read_bytes())
        seq, digest = saved["seq"], saved["sha256"]
        if not isinstance(seq, int) or not isinstance(digest, str):
            raise ValueError("seq/sha256 of the wrong type")
    except FileNotFoundError:
        if out.records:
            out.unanchored = True
            out.notes.append(f"no head file ({hp.name}): the log's end is not anchored (a "
                             "cut tail or an edited last record would not show)")
        return
    except (ValueError, KeyError, TypeError) as err:
        out.chain_breaks.append(f"head file {hp}: unreadable ({err})")
        return
    if seq > last_seq:
        out.chain_breaks.append(
            f"line {last_number or 'start'}: the log ends at seq {last_seq} but its head "
            f"file names seq {seq}: record(s) seq {last_seq + 1}..{seq} were cut")
    elif seq == last_seq and digest != last_digest:
        out.chain_breaks.append(
            f"line {last_number} (seq {seq}), the last record, was edited after it was "
            "written (it no longer matches the head file)")
    elif seq < last_seq:
        number, found = out.digests.get(seq, (None, None))
        if found != digest:
            out.chain_breaks.append(
                f"line {number} (seq {seq}) no longer matches the head file (edited)"
                if number else f"the head file names seq {seq}, which the log does not hold")
        elif last_seq - seq > 1:  # the writer replaces the head file after each record
            out.chain_breaks.append(
                f"record(s) seq {seq + 1}..{last_seq} follow the head file (seq {seq}): "
                "appended by someone else than the log's writer (a writer that dies "
                "between a record and its head file leaves at most one)")
        else:
            out.notes.append(f"record(s) seq {seq + 1}..{last_seq} were appended after the "
                             "head file was last written (a writer that died between the two, "
                             "or records added by hand)")


@dataclass(frozen=True)
class Anchor:
    """A point of the chain someone outside the server holds: a receipt's
    ``audit-seq``/``audit-sha256`` and where it came from."""

    seq: int
    sha256: str
    source: str
    #: The run the receipt was sent in (``None``: it does not say).
    run: object = None


def check_anchors(reading: AuditReading, anchors: list[Anchor]) -> list[str]:
    """Each anchor the log no longer matches, as a sentence (also added to
    ``reading.chain_breaks``): the record is gone (cut) or its line changed (edited, or
    the chain rewritten from there). Only anchors of runs the log holds are checked: the
    receipts of another job's log (two jobs on one inbox) are noted, not failed."""
    problems = []
    runs = {r.get("run") for r in reading.records}
    others = sorted({str(a.run) for a in anchors if a.run is not None and a.run not in runs})
    if others:
        reading.notes.append(
            f"{sum(1 for a in anchors if a.run is not None and a.run not in runs)} receipt "
            f"anchor(s) of run(s) {', '.join(others)}, which this log does not hold (another "
            "job's log): not checked against it")
    for anchor in anchors:
        if anchor.run is not None and anchor.run not in runs:
            continue
        number, digest = reading.digests.get(anchor.seq, (None, None))
        if number is None:
            problems.append(f"{anchor.source}: the log holds no record seq {anchor.seq} "
                            "(cut or removed after the receipt was sent)")
        elif digest != anchor.sha256:
            problems.append(f"line {number} (seq {anchor.seq}) is not the record "
                            f"{anchor.source} was sent with: the log was edited or rewritten "
                            "at or before it")
    reading.chain_breaks.extend(problems)
    return problems


def receipt_anchors(receipts_dir: Path) -> list[Anchor]:
    """The anchors in an inbox's receipts (``<inbox>/receipts/*.jsonl``): every receipt
    event that carries ``audit_seq`` and ``audit_sha256``."""
    out = []
    for path in sorted(Path(receipts_dir).glob("*.jsonl")):
        if path.is_symlink() or not path.is_file():  # a link, a FIFO, a device: not ours
            continue
        for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            try:
                event = loads_json(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            seq, digest = event.get("audit_seq"), event.get("audit_sha256")
            if isinstance(seq, int) and isinstance(digest, str):
                out.append(Anchor(seq, digest, f"receipt {path.name} line {number} "
                                  f"({event.get('status')}, run {event.get('run')})",
                                  run=event.get("run")))
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

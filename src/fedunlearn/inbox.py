"""A SuperNode's request inbox: where its data owner files unlearning requests.

The inbox is a folder on the node's machine, named in the SuperNode's node-config
(``inbox="/srv/fedunlearn/inbox"``). The data owner files, lists and withdraws requests
with ``fedunlearn request ...`` while the SuperNode runs (nothing restarts); each time
the server asks (``query.unlearn``), the ClientApp answers from the inbox, and the
server's verdict comes back as a receipt the data owner reads with the same command.

Layout::

    <inbox>/requests/<id>.json     one request, written once (temp file + rename)
    <inbox>/receipts/<id>.jsonl    its history, one JSON line per event, appended and
                                   fsync-ed: sent, accepted, rejected, honoured, withdrawn

A request's status is its last event (``filed`` before any). ``filed``, ``sent`` and
``accepted`` requests are *pending*: they go to the server at its next query (an
accepted request that was never honoured, e.g. because the job stopped, is asked again).
``rejected``, ``honoured`` and ``withdrawn`` are final. A withdrawal takes effect for
the queries answered after it; data already unlearned stays unlearned.

One request per node travels per job, so pending requests are merged: any client-wise
request makes the node ask for client-wise forgetting (it covers everything else);
otherwise the requests of the oldest pending request's scope are merged (union of
classes or of sample ids) and the others wait for a later job.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parsing import (
    WireError,
    exact_int,
    finite_number,
    int_list,
    loads_json,
    only_fields,
    require,
    str_list,
    text,
)
from .requests import (
    INBOX_ID_PATTERN,
    MAX_CLASSES,
    MAX_ID,
    MAX_INBOX_IDS,
    MAX_SAMPLE_IDS,
    SCOPES,
)

INBOX_KEY = "inbox"
"""Node-config key naming the inbox folder (an absolute path on the node's machine)."""
INBOX_ENV = "FEDUNLEARN_INBOX"
"""Default of ``fedunlearn request --inbox``."""
PENDING = ("filed", "sent", "accepted", "failed")
"""``failed``: a method could not serve the request (the receipt says which and why); it
stays pending, so the next job asks again, unless another method honours it."""
FINAL = ("rejected", "honoured", "withdrawn")
STATUSES = PENDING + FINAL
MAX_NOTE_CHARS = 500
REQUEST_FILE_FIELDS = ("id", "filed_at", "scope", "classes", "sample_ids", "fraction", "note")
RECEIPT_FIELDS = ("request-ids", "status", "run", "reason", "reasons", "method",
                  "model-sha256",
                  "model-arrays-sha256", "model-before-arrays-sha256", "server-time",
                  "rounds", "comm-bytes", "audit-seq", "audit-sha256", "version", "round",
                  "deadline-missed", "unmeasured")
"""Fields of the ``receipt`` record the server sends with ``query.unlearn``:
``model-sha256`` is the SHA-256 of the saved model file (``sha256sum`` confirms it);
``model-arrays-sha256`` and ``model-before-arrays-sha256`` are array digests
(:func:`fedunlearn.audit.model_digest`) of the unlearned model and of the model it
started from."""


class InboxError(ValueError):
    """An inbox operation that cannot be done (unknown id, final request, bad folder)."""


@dataclass(frozen=True)
class InboxRequest:
    """One request filed by the data owner.

    ``fraction`` (instance-wise without ids) is resolved into sample ids by the
    ClientApp, which knows the node's partition."""

    id: str
    filed_at: str
    scope: str
    classes: tuple[int, ...] = ()
    sample_ids: tuple[int, ...] = ()
    fraction: float | None = None
    note: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "filed_at": self.filed_at, "scope": self.scope,
                "classes": list(self.classes), "sample_ids": list(self.sample_ids),
                "fraction": self.fraction, "note": self.note}

    @classmethod
    def from_json(cls, record: Any) -> InboxRequest:
        """Parse a request file strictly (they can be edited by hand)."""
        if not isinstance(record, dict):
            raise WireError("request file", record, "expected a JSON object")
        only_fields(record, REQUEST_FILE_FIELDS, "request file")
        request_id = text("id", require(record, "id", "expected the request id"), 64,
                          pattern=INBOX_ID_PATTERN)
        filed_at = text("filed_at", record.get("filed_at", ""), 64)
        scope = text("scope", require(record, "scope", "expected a scope"), 16, choices=SCOPES)
        fraction = record.get("fraction")
        return cls.build(request_id, filed_at, scope, record.get("classes", []),
                         record.get("sample_ids", []), fraction, record.get("note", ""))

    @classmethod
    def build(cls, request_id: str, filed_at: str, scope: str, classes: Any = (),
              sample_ids: Any = (), fraction: Any = None, note: Any = "") -> InboxRequest:
        """A checked request: the fields its scope needs, nothing else."""
        scope = text("scope", scope, 16, choices=SCOPES)
        classes = int_list("classes", list(classes) if isinstance(classes, tuple) else classes,
                           MAX_CLASSES, lo=0, hi=MAX_ID, allow_scalar=False, show_range=False)
        sample_ids = int_list("sample_ids",
                              list(sample_ids) if isinstance(sample_ids, tuple) else sample_ids,
                              MAX_SAMPLE_IDS, lo=0, hi=MAX_ID, allow_scalar=False,
                              show_range=False)
        if fraction is not None:
            fraction = finite_number("fraction", fraction, lo=0.0, hi=1.0)
        note = text("note", note, MAX_NOTE_CHARS)
        if scope == "class" and not classes:
            raise WireError("classes", [], "a class-wise request names at least one class")
        if scope != "class" and classes:
            raise WireError("classes", list(classes), "only a class-wise request names classes")
        if scope == "instance" and not sample_ids and fraction is None:
            raise WireError("sample_ids", [], "an instance-wise request names sample ids or "
                                              "a fraction")
        if scope == "instance" and sample_ids and fraction is not None:
            raise WireError("fraction", fraction, "give sample ids or a fraction, not both")
        if scope != "instance" and (sample_ids or fraction is not None):
            raise WireError("sample_ids" if sample_ids else "fraction",
                            list(sample_ids) if sample_ids else fraction,
                            "only an instance-wise request names sample ids or a fraction")
        return cls(request_id, filed_at, scope, tuple(classes), tuple(sample_ids), fraction,
                   note)

    def what(self) -> str:
        """A short description: ``client``, ``class [3, 5]``, ``instance 12 ids``."""
        if self.scope == "class":
            return f"class {list(self.classes)}"
        if self.scope == "instance":
            if self.sample_ids:
                return f"instance {len(self.sample_ids)} id(s)"
            return f"instance fraction {self.fraction:g}"
        return "client (all data)"


@dataclass
class InboxEntry:
    """A request with its history (receipts) and current status."""

    request: InboxRequest
    events: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``honoured``, ``rejected`` and ``withdrawn`` stick (in that order: data that
        was unlearned stays unlearned, even after a late withdrawal); otherwise the last
        event's status, ``filed`` before any."""
        seen = {e["status"] for e in self.events}
        for final in FINAL:
            if final in seen:
                return final
        return self.events[-1]["status"] if self.events else "filed"

    @property
    def pending(self) -> bool:
        return self.status in PENDING


class Inbox:
    """A node's request inbox (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        root = Path(root).expanduser()
        if not root.is_absolute():
            raise InboxError(f"inbox={str(root)!r} is not an absolute path: give the inbox "
                             "folder as an absolute path (the ClientApp runs in another "
                             "directory than the command)")
        self.root = root
        self.requests_dir = root / "requests"
        self.receipts_dir = root / "receipts"
        if create:
            self.requests_dir.mkdir(parents=True, exist_ok=True)
            self.receipts_dir.mkdir(parents=True, exist_ok=True)
        elif not self.requests_dir.is_dir():
            raise InboxError(f"{root} is not a request inbox (no requests/ folder); file a "
                             "request first or check the path")
        for folder in (self.requests_dir, self.receipts_dir):
            if folder.is_symlink():
                raise InboxError(f"{folder} is a symbolic link: an inbox's requests/ and "
                                 "receipts/ must be folders inside it")

    # -- the data owner's side ----------------------------------------------------------
    def file(self, scope: str, classes: Sequence[int] = (), sample_ids: Sequence[int] = (),
             fraction: float | None = None, note: str = "") -> InboxRequest:
        """Check and store a new request; returns it (with its id)."""
        for _ in range(_ID_TRIES):
            now = _now()
            stamp = now.replace("-", "").replace(":", "").split(".")[0]
            request = InboxRequest.build(f"{stamp}Z-{_new_token()}", now, scope,
                                         list(classes), list(sample_ids), fraction, note)
            path = self.requests_dir / f"{request.id}.json"
            if _write_new(path, json.dumps(request.to_json(), indent=1).encode() + b"\n"):
                return request
        raise InboxError(f"could not find a free request id in {self.requests_dir} after "
                         f"{_ID_TRIES} tries")

    def withdraw(self, request_id: str) -> dict:
        """Withdraw a pending request; a final one cannot be withdrawn."""
        entry = self.entry(request_id)
        if not entry.pending:
            last = next(e for e in entry.events if e["status"] == entry.status)
            raise InboxError(f"request {request_id} is already {entry.status} (run "
                             f"{last.get('run', '-')}): only a pending request can be "
                             "withdrawn" + ("; data already unlearned stays unlearned"
                                            if entry.status == "honoured" else ""))
        return self.append_event(request_id, {"status": "withdrawn"})

    # -- reading ------------------------------------------------------------------------
    def entries(self) -> tuple[list[InboxEntry], list[Unreadable]]:
        """Every request with its history, oldest first, and the files that could not
        be read (named with the reason). A ``requests/`` folder that cannot be listed
        raises :class:`InboxError` naming it (never "no requests")."""
        out, problems = [], []
        for path in self._request_files():
            try:
                request = InboxRequest.from_json(loads_json(_read(path)))
                if request.id != path.stem:
                    raise WireError("id", request.id, f"expected {path.stem!r}, the file's name")
                events = self.events(request.id)
            except (OSError, ValueError) as err:
                problems.append(Unreadable(path.name, _reason(err)))
                continue
            out.append(InboxEntry(request, events))
        out.sort(key=lambda e: (e.request.filed_at, e.request.id))
        return out, problems

    def _request_files(self) -> list[Path]:
        """The request files (``requests/*.json``), sorted; ``InboxError`` when the folder
        cannot be listed (``Path.glob`` would say "none")."""
        try:
            names = [e.name for e in os.scandir(self.requests_dir)
                     if e.name.endswith(".json") and not e.name.startswith(".")]
        except OSError as err:
            raise InboxError(
                f"cannot list {self.requests_dir}: {_reason(err)}; the user that runs the "
                "SuperNode (and the fedunlearn command) needs read and execute permission "
                "on the inbox's requests/ folder") from err
        return [self.requests_dir / name for name in sorted(names)]

    def entry(self, request_id: str) -> InboxEntry:
        text("request id", request_id, 64, pattern=INBOX_ID_PATTERN)
        path = self.requests_dir / f"{request_id}.json"
        if not path.exists():
            raise InboxError(f"no request {request_id!r} in {self.root}")
        return InboxEntry(InboxRequest.from_json(loads_json(_read(path))),
                          self.events(request_id))

    def events(self, request_id: str) -> list[dict]:
        """The request's history; a partial last line (a crash mid-write) is skipped."""
        path = self.receipts_dir / f"{request_id}.jsonl"
        if not path.exists() and not path.is_symlink():
            return []
        out = []
        for line in _read(path).split(b"\n"):
            try:
                record = loads_json(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("status") in STATUSES:
                out.append(record)
        return out

    def append_event(self, request_id: str, record: dict) -> dict:
        """Append one event to a request's history (durable before returning)."""
        record = {"time": _now(), **record}
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        path = self.receipts_dir / f"{request_id}.jsonl"
        fd = _open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            sealed = size == 0 or os.pread(fd, 1, size - 1) == b"\n"
            os.write(fd, (b"" if sealed else b"\n") + line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def withdrawn_after_sending(self) -> list[str]:
        """The ids of requests withdrawn after they went to a server (at most
        ``MAX_INBOX_IDS``, newest filings first): the node tells the server at every
        query, so a request a service still holds pending is dropped."""
        entries, _ = self.entries()
        out = [e.request.id for e in reversed(entries) if e.status == "withdrawn"
               and any(ev["status"] in ("sent", "accepted") for ev in e.events)]
        return out[:MAX_INBOX_IDS]

    # -- the ClientApp's side -----------------------------------------------------------
    def pending_batch(self) -> tuple[str, list[InboxRequest], list[str]]:
        """The scope and the pending requests to send at this query (merged, see the
        module docstring), and unreadable files. ``("", [], problems)`` when none."""
        entries, problems = self.entries()
        pending = [e.request for e in entries if e.pending]
        if not pending:
            return "", [], problems
        # At most MAX_INBOX_IDS go out at once (what one record may carry); the rest stay
        # pending for the next query.
        if any(r.scope == "client" for r in pending):
            return "client", pending[:MAX_INBOX_IDS], problems
        scope = pending[0].scope
        return scope, [r for r in pending if r.scope == scope][:MAX_INBOX_IDS], problems


_ID_TRIES = 20


class Unreadable(str):
    """A request file that could not be read: ``"<name>: <reason>"``, with ``name``,
    ``reason`` and the ``request_id`` the name gives."""

    name: str
    reason: str

    def __new__(cls, name: str, reason: str) -> Unreadable:
        problem = super().__new__(cls, f"{name}: {reason}")
        problem.name, problem.reason = name, reason
        return problem

    @property
    def request_id(self) -> str | None:
        """The request id the file's name gives (``None``: not an inbox id)."""
        stem = self.name[:-len(".json")] if self.name.endswith(".json") else ""
        return stem if re.fullmatch(INBOX_ID_PATTERN, stem) else None


def _reason(err: BaseException) -> str:
    """An error as one line: a permission problem says so plainly."""
    if isinstance(err, PermissionError):
        return f"permission denied ({err.filename or 'file'}): the SuperNode's user cannot read it"
    return str(err)


def _new_token() -> str:
    return secrets.token_hex(3)


def _open(path: Path, flags: int) -> int:
    """``os.open`` that never follows a symbolic link (the inbox's files are its own)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o640)
    except OSError as err:
        if path.is_symlink():
            raise InboxError(f"{path} is a symbolic link: refused (an inbox file operation "
                             "never leaves the inbox folder)") from err
        raise


#: The largest inbox file read (a request is a few hundred bytes; a history of receipts
#: a few KB): a bigger one is refused as unreadable, never loaded.
MAX_FILE_BYTES = 4 << 20


def _read(path: Path) -> bytes:
    """A regular file of the inbox, whole: a FIFO, a device or a folder is refused without
    blocking (opened non-blocking, checked with ``fstat``), and so is a file over
    :data:`MAX_FILE_BYTES`."""
    fd = _open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InboxError(f"{path} is not a regular file: refused")
        if info.st_size > MAX_FILE_BYTES:
            raise InboxError(f"{path} holds {info.st_size} bytes, more than an inbox file may "
                             f"({MAX_FILE_BYTES}): refused")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise InboxError(f"{path} grew past {MAX_FILE_BYTES} bytes while read: refused")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> bool:
    """Write ``path`` atomically unless it exists (then ``False``: nothing replaced)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if path exists (a file or a link): never replaces
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def parse_receipt(record: Any) -> dict:
    """Check a verdict the server sent (``query.unlearn`` with a ``receipt`` record)."""
    if not hasattr(record, "keys"):
        raise WireError("receipt", record, "expected a record")
    only_fields(record, RECEIPT_FIELDS, "receipt")
    out = {
        "request_ids": list(str_list("request-ids", require(record, "request-ids", "ids"),
                                     MAX_INBOX_IDS, 64, INBOX_ID_PATTERN)),
        "status": text("status", require(record, "status", "a verdict"), 16,
                       choices=("accepted", "rejected", "honoured", "failed")),
        # Flower run ids are unsigned 64-bit: they travel as decimal strings.
        "run": int(text("run", require(record, "run", "the run id"), 20, pattern=r"[0-9]{1,20}")),
    }
    if "reasons" in record:  # one reason per id (the server merged several verdicts)
        reasons = record["reasons"]
        if (not isinstance(reasons, list) or len(reasons) != len(out["request_ids"])
                or not all(isinstance(r, str) and len(r) <= 600 for r in reasons)):
            raise WireError("reasons", reasons, "expected one reason (a string of at most 600 "
                            "characters) per request id")
        out["reasons"] = list(reasons)
    for key in ("reason", "method", "server-time", "unmeasured"):
        if key in record:
            out[key.replace("-", "_")] = text(key, record[key], 600)
    for key in ("model-sha256", "model-arrays-sha256", "model-before-arrays-sha256"):
        if key in record:
            out[key.replace("-", "_")] = text(key, record[key], 64, pattern=r"[0-9a-f]{64}")
    for key in ("rounds", "comm-bytes", "audit-seq", "version", "round", "deadline-missed"):
        if key in record:
            out[key.replace("-", "_")] = exact_int(key, record[key], lo=0, hi=2**62)
    if "audit-sha256" in record:
        out["audit_sha256"] = text("audit-sha256", record["audit-sha256"], 64,
                                   pattern=r"[0-9a-f]{64}")
    return out


"""What service mode keeps on disk: its state (checkpoint), pending and served requests,
and the published versions (``versions.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord

from ..files import write_json
from ..requests import UnlearningRequest
from .config import DAY_S, ServiceError  # noqa: F401

CHECKPOINT_FILE = "checkpoint.pt"
VERSIONS_FILE = "versions.json"
VERSIONS_DIR = "versions"
STATE_FORMAT = 1

@dataclass
class PendingRequest:
    """An accepted request waiting for an unlearning step."""

    node: int
    request: UnlearningRequest
    round: int
    accepted_at: float
    attempts: int = 0
    next_try: int = 0
    warned: bool = False

    def as_dict(self) -> dict:
        return {"node": self.node, "request": _request_dict(self.request), "round": self.round,
                "accepted_at": self.accepted_at, "attempts": self.attempts,
                "next_try": self.next_try, "warned": self.warned}

    @classmethod
    def from_dict(cls, d: dict) -> PendingRequest:
        return cls(int(d["node"]), _request_from_dict(d["request"]), int(d["round"]),
                   float(d["accepted_at"]), int(d["attempts"]), int(d["next_try"]),
                   bool(d["warned"]))


@dataclass
class ServiceState:
    """What the checkpoint holds (besides the model and the momentum)."""

    round: int = 0
    version: int = 0
    view: dict[int, int] = field(default_factory=dict)
    reports: dict[int, dict] = field(default_factory=dict)
    pending: list[PendingRequest] = field(default_factory=list)
    #: node -> every request honoured for it so far, merged.
    served: dict[int, UnlearningRequest] = field(default_factory=dict)
    served_fully: set[int] = field(default_factory=set)
    #: (node, digest) of every request honoured or failed: a copy sent again is ignored.
    seen: set[tuple[int, str]] = field(default_factory=set)
    seen_inbox: set[str] = field(default_factory=set)
    failed: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    #: Receipts decided but not yet known to be sent (sent again after a resume).
    outbox: list[dict] = field(default_factory=list)
    #: inbox id -> its final verdict (the honoured or failed receipt): sent again when
    #: the node sends the request again (its receipt never arrived).
    verdicts: dict[str, dict] = field(default_factory=dict)
    method: str = ""
    model_keys: list[str] = field(default_factory=list)
    last_version_round: int = 0
    #: False until the start is committed (start version, view): a service killed before
    #: that starts again on its directory instead of resuming.
    started: bool = True
    #: The audit log's last seq when this checkpoint was written, and the records it
    #: commits (written right after it; at resume the ones missing are written).
    audit_seq: int = -1
    due_records: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "round": self.round, "version": self.version,
                "view": {str(k): v for k, v in self.view.items()},
                "reports": {str(k): v for k, v in self.reports.items()},
                "pending": [p.as_dict() for p in self.pending],
                "served": {str(k): _request_dict(r) for k, r in self.served.items()},
                "served_fully": sorted(self.served_fully),
                "seen": sorted([n, d] for n, d in self.seen),
                "seen_inbox": sorted(self.seen_inbox), "failed": self.failed,
                "steps": self.steps, "outbox": self.outbox, "verdicts": self.verdicts,
                "method": self.method,
                "model_keys": self.model_keys, "last_version_round": self.last_version_round,
                "started": self.started, "audit_seq": self.audit_seq,
                "due_records": self.due_records}

    @classmethod
    def from_json(cls, d: dict) -> ServiceState:
        if d.get("format") != STATE_FORMAT:
            raise ServiceError(f"checkpoint format {d.get('format')!r}: this fedunlearn "
                               f"reads format {STATE_FORMAT}")
        return cls(round=int(d["round"]), version=int(d["version"]),
                   view={int(k): int(v) for k, v in d["view"].items()},
                   reports={int(k): v for k, v in d["reports"].items()},
                   pending=[PendingRequest.from_dict(p) for p in d["pending"]],
                   served={int(k): _request_from_dict(r) for k, r in d["served"].items()},
                   served_fully={int(n) for n in d["served_fully"]},
                   seen={(int(n), str(x)) for n, x in d["seen"]},
                   seen_inbox=set(d["seen_inbox"]), failed=list(d["failed"]),
                   steps=list(d["steps"]), outbox=list(d["outbox"]),
                   verdicts=dict(d.get("verdicts", {})), method=d["method"],
                   model_keys=list(d["model_keys"]),
                   last_version_round=int(d["last_version_round"]),
                   started=bool(d.get("started", True)), audit_seq=int(d.get("audit_seq", -1)),
                   due_records=list(d.get("due_records", [])))


@dataclass
class ServiceOutcome:
    """What :meth:`UnlearningService.run` returns."""

    arrays: ArrayRecord = field(repr=False)
    round: int
    version: int
    stopped: str
    steps: list[dict]
    failed: list[dict]
    pending: list[dict]
    resumed_from: int | None
    versions: list[dict]


def _request_dict(r: UnlearningRequest) -> dict:
    return {"scope": r.scope, "partition_id": r.partition_id, "classes": list(r.classes),
            "sample_ids": list(r.sample_ids), "node_id": r.node_id,
            "inbox_ids": list(r.inbox_ids)}


def _request_from_dict(d: dict) -> UnlearningRequest:
    partition = d["partition_id"]  # None: a node without a partition id
    return UnlearningRequest(scope=d["scope"],
                             partition_id=None if partition is None else int(partition),
                             classes=tuple(d["classes"]), sample_ids=tuple(d["sample_ids"]),
                             node_id=int(d["node_id"]), inbox_ids=tuple(d["inbox_ids"]))


def _atomic_json(path: Path, value) -> None:
    write_json(path, value, indent=1, sort_keys=True)


def read_versions(state_dir: str | os.PathLike) -> list[dict]:
    """The versions a service published in ``state_dir`` (oldest first): ``version``,
    ``round``, ``sha256`` (of the file's bytes: ``sha256sum path`` prints it),
    ``arrays_sha256`` (the model's array digest), ``path``, ``kind`` (``start``,
    ``unlearned``, ``trained``,
    ``final``), ``honours`` (the requests it honours: node, scope, inbox ids, digest),
    ``published_at``."""
    path = Path(state_dir) / VERSIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {VERSIONS_FILE} in {state_dir}: not a service state "
                                "directory (service.state-dir / UnlearningService(state_dir=))")
    try:
        versions = json.loads(path.read_text())["versions"]
        if not isinstance(versions, list):
            raise ValueError("'versions' is not a list")
        return versions
    except (ValueError, KeyError, TypeError) as err:  # truncated, edited, garbage
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): "
                         "restore it from a backup") from None


def arrays_digest_of(entry: dict) -> str:
    """A version's array digest: ``arrays_sha256``; a version written before fedunlearn
    named file hashes ``sha256`` has none, and its ``sha256`` is the array digest."""
    return entry.get("arrays_sha256") or entry.get("sha256", "")


def honoured_by(versions: list[dict], request_id: str) -> list[dict]:
    """The versions that honour inbox request ``request_id`` (the first one honoured it;
    later ones keep it honoured)."""
    first = next((v["version"] for v in versions for h in v.get("honours", [])
                  if request_id in h.get("inbox_ids", [])), None)
    return [] if first is None else [v for v in versions if v["version"] >= first]



def _what(r: UnlearningRequest) -> str:
    if r.scope == "class":
        return f"class-wise {list(r.classes)}"
    if r.scope == "instance":
        return f"instance-wise, {len(r.sample_ids)} sample(s)"
    return "client-wise"


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"

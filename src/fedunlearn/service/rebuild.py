"""Service mode's explicit rebuild (``UnlearningService(rebuild=True)``): a state directory
whose checkpoint is missing or unreadable goes on from its last good published version."""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from ..logs import log

from ..audit import audit_path, read_audit
from ..requests import UnlearningRequest, merge_requests
from .config import ServiceError
from .state import CHECKPOINT_FILE, ServiceState, read_versions


class Rebuild:
    """The part of :class:`UnlearningService` that rebuilds its state from ``versions.json``."""

    def rebuild_state(self, arrays: ArrayRecord, verified) -> None:
        """The state of the last good version: its model (file checked against both hashes,
        like every earlier version's), round and number; the requests every kept version
        honours stay served (never trained on again, never served twice); the federation is
        verified anew. ``service.rebuilt`` names what is lost: the rounds trained after
        that version, the requests accepted but honoured by no kept version (their nodes
        send them again at the next query), and the versions past it that could not be
        used."""
        path = self.state_dir / CHECKPOINT_FILE
        unreadable = None
        if path.exists():  # unreadable (load() said so): kept aside, never overwritten
            unreadable = path.with_name(f"{CHECKPOINT_FILE}.unreadable-{int(time.time())}")
            path.replace(unreadable)
        try:
            versions = [v for v in read_versions(self.state_dir) if not v.get("abandoned")]
        except (OSError, ValueError) as err:
            raise ServiceError(f"the service cannot be rebuilt: {err}") from None
        entry, skipped = self._last_good(versions)
        self.state = ServiceState(method=self.method.name, model_keys=list(arrays.keys()),
                                  version=int(entry["version"]), round=int(entry["round"]),
                                  last_version_round=int(entry["round"]))
        self.arrays = ArrayRecord(torch.load(entry["path"], map_location="cpu",
                                             weights_only=True))
        self.momentum = None
        self._check_resume(arrays)
        self._check_versions()  # every version up to it: the proofs receipts name
        if self.note_interrupted:
            self.ledger.interrupted()
        self.verify(verified)
        kept = [v for v in versions if v["version"] <= entry["version"]]
        honoured = self._served_from(kept)
        lost_requests, last_round = _lost(audit_path(self.state_dir),
                                          {d for _, d in self.state.seen})
        self.audit.record(
            "service.rebuilt", from_version=entry["version"], round=entry["round"],
            model_sha256=entry["sha256"],
            reason=("checkpoint unreadable, kept as " + str(unreadable) if unreadable
                    else f"{path} missing"),
            rounds_lost=(None if last_round is None
                         else max(0, last_round - int(entry["round"]))),
            lost_requests=lost_requests, versions_skipped=skipped,
            verdicts_not_resent=sorted(honoured))
        log(WARNING, "[service] rebuilt from version %d (round %d): %s round(s) and %d "
            "pending request(s) lost (asked again at the next query); versions skipped: %s",
            entry["version"], entry["round"],
            "?" if last_round is None else max(0, last_round - int(entry["round"])),
            len(lost_requests), skipped or "none")
        self.checkpoint()

    def _last_good(self, versions: list[dict]) -> tuple[dict, list[int]]:
        """The newest version whose file holds the model its hashes name; a version past it
        that honours a request is a proof that cannot be given up: refused."""
        skipped: list[int] = []
        for entry in reversed(versions):
            try:
                self._check_version_file(int(entry["version"]), entry)
                return entry, skipped[::-1]
            except ServiceError as err:
                if entry.get("honours"):
                    raise ServiceError(
                        f"the service cannot be rebuilt past version {entry['version']}: it "
                        f"honours requests and {err}") from None
                skipped.append(int(entry["version"]))
        raise ServiceError(f"the service cannot be rebuilt: {self.state_dir} lists no "
                           "version whose file can be read")

    def _served_from(self, kept: list[dict]) -> set[str]:
        """Mark every request the kept versions honour as served (by the node of the new
        view that holds its partition where its node id is gone); its inbox ids."""
        view = self.state.view
        by_label = {label: node for node, label in view.items()}
        ids: set[str] = set()
        for honour in (h for v in kept for h in v.get("honours", [])):
            if honour["scope"] == "instance":
                raise ServiceError(
                    "the service cannot be rebuilt: an instance-wise request (inbox ids "
                    f"{honour.get('inbox_ids')}) was honoured, and its sample ids are kept "
                    "only in the checkpoint; restore the checkpoint from a backup")
            node = int(honour["node"])
            if node not in view and honour.get("partition_id") in by_label:
                node = by_label[honour["partition_id"]]
            request = UnlearningRequest(
                scope=honour["scope"], partition_id=honour.get("partition_id"),
                classes=tuple(honour.get("classes", ())), node_id=node,
                inbox_ids=tuple(honour.get("inbox_ids", ())))
            earlier = self.state.served.get(node)
            self.state.served[node] = (request if earlier is None
                                       else merge_requests(earlier, request))
            if honour["scope"] == "client":
                self.state.served_fully.add(node)
            self.state.seen.add((node, honour["digest"]))
            ids.update(request.inbox_ids)
        self.state.seen_inbox.update(ids)
        return ids


def _lost(log_path: Path, honoured: set[str]) -> tuple[list[dict], int | None]:
    """From the audit log (when it can be read): the requests accepted (by digest) but
    honoured by no kept version, nor failed or withdrawn, and the last round a record
    names."""
    if not log_path.exists():
        return [], None
    try:
        records = read_audit(log_path, head=False).records
    except (OSError, ValueError):
        return [], None
    closed = honoured | {r.get("digest") for r in records
                         if r.get("event") in ("request.failed", "request.withdrawn")}
    lost: dict[str, dict] = {}
    for r in records:
        if r.get("event") == "request.accepted" and r.get("digest") not in closed:
            lost.setdefault(r.get("digest"), {"node": r.get("node"), "scope": r.get("scope"),
                                              "digest": r.get("digest")})
    rounds = [r["round"] for r in records if isinstance(r.get("round"), int)]
    return list(lost.values()), max(rounds, default=None)

"""Service mode's state directory: published versions, the per-round checkpoint, and
the checks a resume makes."""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from ..logs import log

from ..arrays import check_model_arrays
from ..audit import audit_path, model_digest
from ..files import file_sha256, save_state_dict, save_state_dict_sha256
from .config import ServiceError
from .state import (
    CHECKPOINT_FILE,
    VERSIONS_DIR,
    VERSIONS_FILE,
    ServiceState,
    _atomic_json,
    arrays_digest_of,
    read_versions,
)


class Storage:
    """The part of :class:`UnlearningService` that writes and reads its state directory."""

    # -- state on disk ----------------------------------------------------------------
    def publish(self, kind: str, honours: list[dict]) -> dict:
        """Write the current model as the next version (atomically) and list it; its
        ``version.published`` record is committed by the checkpoint that follows."""
        self.audit.hold()
        versions = (read_versions(self.state_dir)
                    if (self.state_dir / VERSIONS_FILE).exists() else [])
        number = self._version_number(versions, kind, model_digest(self.arrays))
        path = self.state_dir / VERSIONS_DIR / f"v{number:04d}.pt"
        _, digest = save_state_dict_sha256(path, self.arrays.to_torch_state_dict())
        # sha256: of the file's bytes (sha256sum); arrays_sha256: the array digest.
        entry = {"version": number, "round": self.state.round, "kind": kind,
                 "sha256": digest, "arrays_sha256": model_digest(self.arrays),
                 "path": str(path), "honours": honours,
                 "method": self.method.name if kind == "unlearned" else None,
                 "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.evaluation is not None:  # a crash in it leaves the version published
            entry["metrics"], problem = self.evaluation.measure(self.state.round, self.arrays)
            if problem:
                entry["not_measured"] = {"test": problem}
        versions = sorted([v for v in versions if v["version"] != number] + [entry],
                          key=lambda v: v["version"])
        _atomic_json(self.state_dir / VERSIONS_FILE, {"versions": versions})
        self.state.version = number
        self.state.last_version_round = self.state.round
        self.audit.record("version.published", published_version=number, kind=kind,
                          model_sha256=entry["sha256"],
                          model_arrays_sha256=entry["arrays_sha256"], path=str(path),
                          honours=[{k: h[k] for k in ("node", "scope", "digest", "inbox_ids")}
                                   for h in honours])
        metrics = ", ".join(f"{k} {v:.2f}%" for k, v in entry.get("metrics", {}).items()
                            if isinstance(v, (int, float)))
        log(INFO, "[service] published version %d (%s, round %d%s): %s", number, kind,
            self.state.round, f", {metrics}" if metrics else "", path)
        return entry

    def _version_number(self, versions: list[dict], kind: str, digest: str) -> int:
        """The number a model is published under: the one after the checkpoint's version
        (0 for the start). A number that a run cut short before its checkpoint already
        listed is reused when it holds this very model, else that version is abandoned
        (``version.abandoned``, marked in ``versions.json``, its file kept) and the
        number after it taken: never two models under one number."""
        number = 0 if kind == "start" else self.state.version + 1
        listed = {v["version"]: v for v in versions}
        while number in listed:
            entry = listed[number]
            if entry.get("abandoned"):
                number += 1
            elif arrays_digest_of(entry) == digest and entry.get("kind") == kind:
                return number
            else:
                self._abandon(versions, entry)
                number += 1
        return number

    def _abandon(self, versions: list[dict], entry: dict) -> None:
        number = entry["version"]
        reason = ("published by a run that was cut short before its checkpoint; the "
                  "service went on from the checkpoint's model, no receipt names it")
        if not self.audit.recorded("version.abandoned", published_version=number):
            self.audit.now("version.abandoned", published_version=number,
                           kind=entry.get("kind"), model_sha256=entry.get("sha256"),
                           model_arrays_sha256=arrays_digest_of(entry),
                           path=entry.get("path"), reason=reason)
        entry["abandoned"] = reason
        _atomic_json(self.state_dir / VERSIONS_FILE, {"versions": versions})
        log(WARNING, "[service] version %d (%s) was %s: abandoned, its number is not reused",
            number, entry.get("kind"), reason)

    def remove_unlisted_versions(self) -> None:
        """At resume: a version file past the last listed version was written by a run
        cut short before it listed it; nothing names it, and it is removed."""
        listed = [v["version"] for v in read_versions(self.state_dir)]
        for path in sorted((self.state_dir / VERSIONS_DIR).glob("v*.pt")):
            stem = path.stem[1:]
            if stem.isdigit() and int(stem) > max(listed, default=-1) and path.is_file():
                path.unlink()
                log(WARNING, "[service] removed %s: written by a run cut short before it "
                    "listed the version", path)

    def _last_digest(self) -> str:
        """The array digest of the last version published ("" for none; an abandoned
        one is not published)."""
        versions = [v for v in read_versions(self.state_dir) if not v.get("abandoned")]
        return arrays_digest_of(versions[-1]) if versions else ""

    def checkpoint(self) -> None:
        """Everything the service knows, in one file, replaced atomically; then the audit
        records it commits (held since :meth:`ServiceAudit.hold`), each once."""
        self.state.due_records = self.audit.release()
        head = self.audit.head()
        self.state.audit_seq = head[0] if head is not None else -1
        blob = {"model": self.arrays.to_torch_state_dict(),
                "momentum": (None if self.momentum is None
                             else [torch.from_numpy(a.copy()) for a in self.momentum]),
                "state": json.dumps(self.state.to_json())}
        save_state_dict(self.state_dir / CHECKPOINT_FILE, blob)
        self.audit.write(self.state.due_records)
        self.state.due_records = []

    def load(self):
        """The checkpoint's ``(state, model, momentum)``, or ``None`` for a fresh state
        directory. A directory that holds a service's past (versions, an audit log with
        service records) but no checkpoint is refused, never silently started over: the
        versions its receipts name would be overwritten and the forgotten nodes train
        again. A checkpoint that cannot be read is named in the error."""
        path = self.state_dir / CHECKPOINT_FILE
        if not path.exists():
            self._refuse_leftovers(path)
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            state = ServiceState.from_json(json.loads(blob["state"]))
            momentum = (None if blob["momentum"] is None
                        else [t.numpy() for t in blob["momentum"]])
            return state, ArrayRecord(blob["model"]), momentum
        except ServiceError:
            raise
        except Exception as err:  # truncated, empty, garbage: torch's or pickle's error
            raise ServiceError(
                f"the service checkpoint {path} cannot be read ({type(err).__name__}: "
                f"{str(err)[:200]}): restore it from a backup, or move the state directory "
                "away to start a new service") from None

    def _refuse_leftovers(self, checkpoint) -> None:
        leftovers = [p for p in (self.state_dir / VERSIONS_FILE, self.state_dir / VERSIONS_DIR)
                     if p.exists() and (p.is_file() or any(p.iterdir()))]
        log_path = audit_path(self.state_dir)
        if log_path.exists() and b'"event":"service.started"' in log_path.read_bytes():
            leftovers.append(log_path)
        if leftovers:
            raise ServiceError(
                f"{checkpoint} is missing, but {self.state_dir} holds a service's past "
                f"({', '.join(str(p) for p in leftovers)}): starting over would overwrite the "
                "published versions that receipts name and let forgotten nodes train again; "
                "restore the checkpoint, or move the state directory away to start a new "
                "service")

    def _check_resume(self, arrays: ArrayRecord) -> None:
        s = self.state
        if s.method != self.method.name:
            raise ServiceError(f"{self.state_dir} holds a service of method {s.method!r}; "
                               f"this one is {self.method.name!r}: use another state_dir or "
                               "the same method")
        if list(arrays.keys()) != s.model_keys:
            raise ServiceError(f"the checkpoint in {self.state_dir} is of another model "
                               f"(its keys {s.model_keys[:3]}..., given {list(arrays)[:3]}...)")
        bad = [k for k in s.model_keys
               if tuple(arrays[k].shape) != tuple(self.arrays[k].shape)]
        if bad:
            raise ServiceError(f"the checkpoint in {self.state_dir} is of another model: "
                               f"shapes differ for {bad[:3]} (checkpoint "
                               f"{[tuple(self.arrays[k].shape) for k in bad[:3]]}, given "
                               f"{[tuple(arrays[k].shape) for k in bad[:3]]})")

    def _check_versions(self) -> None:
        """At resume: every version the checkpoint has published is listed in
        ``versions.json`` and its file still holds the model whose hashes the receipts
        name: the file's SHA-256 and the array digest (a proof that went missing or
        changed is found now, not by an auditor later)."""
        try:
            versions = read_versions(self.state_dir)
        except (OSError, ValueError) as err:
            raise ServiceError(f"the service cannot resume: {err}") from None
        listed = {v.get("version"): v for v in versions if isinstance(v, dict)}
        for number in range(self.state.version + 1):
            entry = listed.get(number)
            if entry is None:
                raise ServiceError(f"{self.state_dir / VERSIONS_FILE} does not list version "
                                   f"{number}, which the checkpoint has published: restore it "
                                   "from a backup")
            self._check_version_file(number, entry)

    @staticmethod
    def _check_version_file(number: int, entry: dict) -> None:
        path = Path(entry.get("path", ""))
        try:
            found = {"arrays_sha256": model_digest(ArrayRecord(torch.load(
                path, map_location="cpu", weights_only=True)))}
            if "arrays_sha256" in entry:  # a version written before it holds an array digest
                found["sha256"] = file_sha256(path)
        except Exception as err:  # missing, truncated, garbage
            raise ServiceError(f"version {number}'s file {path} cannot be read "
                               f"({type(err).__name__}): the model its receipts name is "
                               "gone; restore it from a backup") from None
        expected = {"arrays_sha256": arrays_digest_of(entry), "sha256": entry.get("sha256")}
        for key, digest in found.items():
            if digest != expected[key]:
                raise ServiceError(
                    f"version {number}'s file {path} no longer holds the model its receipts "
                    f"name ({key} {str(expected[key])[:12]}, found {digest[:12]}): restore "
                    "it from a backup")

    def _check_model(self, arrays: ArrayRecord) -> None:
        """With a model factory, ``arrays`` must be that model's (names, shapes, floating
        dtypes): checked before anything is written, not by every node at its first
        round."""
        if self.model_fn is not None:
            check_model_arrays(arrays, self.model_fn)

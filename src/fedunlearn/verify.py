"""``fedunlearn verify MODEL``: which records name a saved model, by which hash.

A model file has two hashes (:mod:`.audit`): its **SHA-256**, over the file's bytes (what
``sha256sum MODEL`` prints; ``model_sha256``, ``sha256`` in ``versions.json``), and its
**array digest** (:func:`fedunlearn.audit.model_digest`, over the arrays it holds;
``model_arrays_sha256``, ``arrays_sha256``). :func:`verify_model` recomputes both and
looks for them in the records fedunlearn writes: audit logs (``audit.jsonl``), a
method's ``results.json`` (serve and the harness), a service's ``versions.json`` and an
inbox's receipts (``<inbox>/receipts/*.jsonl``). Records written before fedunlearn named
file hashes so hold the array digest under ``model``, ``model_after`` or
``model_sha256``: they match as array digests.

A record that names this very file (its ``path``) with another hash is a mismatch: the
file was replaced or edited after it was recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import read_audit
from .files import file_sha256

_SUFFIXES = (".json", ".jsonl")
_PATH_KEYS = ("path", "model_path")
_FILE_HASH_KEYS = ("sha256", "model_sha256")


@dataclass
class Match:
    """One record that names the model: where, under which field, by which hash
    (``file``: the SHA-256 of the bytes; ``arrays``: the array digest)."""

    source: str
    field: str
    kind: str


@dataclass
class Verification:
    """What :func:`verify_model` found."""

    path: str
    sha256: str
    arrays_sha256: str | None
    matches: list[Match] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Some record names the model, none names its path with another hash, and no
        audit log searched is broken."""
        return bool(self.matches) and not self.mismatches

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "arrays_sha256": self.arrays_sha256,
                "matches": [m.__dict__ for m in self.matches], "mismatches": self.mismatches,
                "notes": self.notes, "searched": self.searched, "ok": self.ok}

    def text(self) -> str:
        lines = [f"{self.path}",
                 f"  sha256 (file bytes)  {self.sha256}",
                 f"  array digest         {self.arrays_sha256 or '- (not a state dict)'}"]
        if self.matches:
            lines.append(f"matches {len(self.matches)} record field(s):")
            lines += [f"  {m.source}: {m.field} ({'file sha256' if m.kind == 'file' else 'array digest'})"
                      for m in self.matches]
        else:
            lines.append(f"matches no record in {len(self.searched)} file(s) searched")
        lines += [f"MISMATCH: {line}" for line in self.mismatches]
        return "\n".join(lines)


def model_hashes(path: str | os.PathLike) -> tuple[str, str | None, str]:
    """``(sha256 of the file, array digest or None, note)``: the array digest of a torch
    state dict (a file that is not one has none; the note says why)."""
    import torch
    from flwr.app import ArrayRecord

    from .audit import model_digest

    sha = file_sha256(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return sha, model_digest(ArrayRecord(state)), ""
    except Exception as err:  # not a state dict of tensors (a checkpoint with meta, garbage)
        return sha, None, (f"{path} is not a torch state dict of tensors "
                           f"({type(err).__name__}): only its file SHA-256 is compared")


def default_sources(model: Path) -> list[Path]:
    """Where a model's records are when no source is given: its folder and the folder
    above (``<out>/<method>/model.pt``: ``results.json`` and ``<out>/audit.jsonl``; a
    service's ``versions/vNNNN.pt``: ``versions.json`` and ``audit.jsonl``), and
    ``$FEDUNLEARN_AUDIT_LOG`` when set."""
    from .audit import AUDIT_ENV

    out = [model.parent, model.parent.parent]
    env = os.environ.get(AUDIT_ENV, "").strip()
    if env:
        out.append(Path(env).expanduser())
    return out


def record_files(sources: list[Path]) -> list[Path]:
    """The ``.json`` / ``.jsonl`` files of ``sources``: a file as given; a folder's own
    and its subfolders' (one level down: ``<out>/<method>/results.json``,
    ``<inbox>/receipts/*.jsonl``)."""
    found: list[Path] = []
    for source in sources:
        source = Path(source).expanduser()
        if source.is_file():
            found.append(source)
        elif source.is_dir():
            found += [p for pattern in ("*", "*/*") for p in sorted(source.glob(pattern))
                      if p.suffix in _SUFFIXES and p.is_file() and not p.is_symlink()]
        else:
            raise FileNotFoundError(f"{source}: no such file or folder (expected an audit "
                                    "log, a results.json, a versions.json or a folder "
                                    "holding them)")
    unique = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def verify_model(model: str | os.PathLike, sources: list[str | os.PathLike] | None = None
                 ) -> Verification:
    """Recompute ``model``'s file SHA-256 and array digest and find the records that
    name it in :func:`default_sources` and ``sources`` (files or folders)."""
    model = Path(model).expanduser()
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    sha, arrays, note = model_hashes(model)
    out = Verification(str(model), sha, arrays, notes=[note] if note else [])
    given = [p for p in default_sources(model) if p.exists()]
    files = record_files(given + [Path(s) for s in sources or ()])
    for path in files:
        out.searched.append(str(path))
        _search_file(path, model.resolve(), out)
    return out


def _search_file(path: Path, model: Path, out: Verification) -> None:
    try:
        data = path.read_bytes()
    except OSError as err:
        out.notes.append(f"{path}: not read ({err})")
        return
    if path.suffix == ".json":
        try:
            doc = json.loads(data)
        except ValueError:
            out.notes.append(f"{path}: not JSON; skipped")
            return
        _walk(doc, str(path), "", model, out)
        return
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
            _walk(record, _where(path, number, record), "", model, out)
    if records and "prev" in records[0] and any(m.source.startswith(f"{path} ")
                                                for m in out.matches):
        reading = read_audit(path)
        if not reading.intact:
            out.mismatches.append(f"{path}: the audit log's chain is broken "
                                  f"({reading.chain_breaks[0]}); run fedunlearn audit {path}")


def _where(path: Path, number: int, record: dict) -> str:
    if "prev" in record and "seq" in record:
        return (f"{path} line {number} (seq {record.get('seq')}, {record.get('event')}, "
                f"run {record.get('run')})")
    return f"{path} line {number} ({record.get('status', 'record')})"


def _walk(value: Any, source: str, prefix: str, model: Path, out: Verification) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, source, f"{prefix}[{i}]", model, out)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if item == out.sha256:
            out.matches.append(Match(source, name, "file"))
        elif out.arrays_sha256 is not None and item == out.arrays_sha256:
            out.matches.append(Match(source, name, "arrays"))
        else:
            _walk(item, source, name, model, out)
    _check_path(value, source, prefix, model, out)


def _check_path(record: dict, source: str, prefix: str, model: Path,
                out: Verification) -> None:
    """A record naming this file's path with a file hash that is neither of its own."""
    named = next((record[k] for k in _PATH_KEYS if isinstance(record.get(k), str)), None)
    if named is None or Path(named).expanduser().resolve() != model:
        return
    for key in _FILE_HASH_KEYS:
        recorded = record.get(key)
        if isinstance(recorded, str) and recorded not in (out.sha256, out.arrays_sha256):
            where = f"{prefix}.{key}" if prefix else key
            out.mismatches.append(f"{source}: {where} names this file with {recorded[:16]}..., "
                                  f"but its SHA-256 is {out.sha256[:16]}... (the file changed "
                                  "after it was recorded)")


__all__ = ["Match", "Verification", "default_sources", "model_hashes", "record_files",
           "verify_model"]

"""Files written whole or not at all: a temporary file in the target's folder, flushed to
disk, then renamed over the target. A reader (or a job restarted after a crash) sees the
old file or the new one, never half of one.

(Two writers keep their own: the audit log's head, which must not follow links and has
its own permissions, and an inbox request file, which must never replace an existing
one.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A method that could not finish writes its reason here, in place of its results.
FAILED_FILE = "failed.json"


def _create_temporary(path: Path) -> str:
    """A new empty file beside ``path`` (a name no one else has), created with the
    permissions of any file the user creates: 0666 less the umask (typically 0644), as
    ``torch.save`` or ``open`` would give the target. ``tempfile.mkstemp`` would give 0600,
    which the rename would carry over to every model and results file."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}-{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *,
                 digest: Any = None) -> Path:
    """``write(tmp)`` into a temporary file, fsync it, and rename it to ``path``. With
    ``digest`` (e.g. ``hashlib.sha256()``), the bytes written are fed to it, read back
    from the temporary file that becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            if digest is not None:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_ready(value: Any) -> Any:
    """``value`` as strict JSON can hold it: a float that is not finite (NaN, ±inf, numpy's
    included) becomes ``None`` (``null``: not measured, or no number to give), numpy
    scalars and arrays become numbers and lists, tuples and sets become lists, dict keys
    strings; anything else JSON has no type for becomes its string."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_key(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_ready(v) for v in sorted(value, key=repr)]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return json_ready(value.tolist())
    return str(value)


def _key(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it (``3`` -> ``"3"``, ``True`` -> ``"true"``)."""
    if isinstance(key, str):
        return key
    key = json_ready(key)
    return key if isinstance(key, str) else json.dumps(key)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2,
               sort_keys: bool = False) -> Path:
    """``payload`` as strict JSON (RFC 8259: no ``NaN`` or ``Infinity``, which
    ``JSON.parse`` and other strict readers refuse), atomically. Values are converted by
    :func:`json_ready`: a non-finite number is written as ``null``."""
    text = json.dumps(json_ready(payload), indent=indent, sort_keys=sort_keys,
                      allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _torch_bytes(state: Any) -> bytes:
    """``torch.save(state)``'s bytes, the same for the same state: saved to a buffer, the
    archive's inner folder is always ``archive`` (saved to a path it is named after the
    file, here a random temporary name, and the bytes would differ run to run)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return write


def save_state_dict(path: str | os.PathLike, state: Any) -> Path:
    """``torch.save(state)`` atomically (the same state gives the same bytes)."""
    return atomic_write(path, _write_bytes(_torch_bytes(state)))


def save_state_dict_sha256(path: str | os.PathLike, state: Any) -> tuple[Path, str]:
    """``torch.save(state)`` atomically; return the path and the SHA-256 of the file's
    bytes, as written (what ``sha256sum PATH`` prints; the same state, the same hash)."""
    digest = hashlib.sha256()
    path = atomic_write(path, _write_bytes(_torch_bytes(state)), digest=digest)
    return path, digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum PATH`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` leaves in ``folder`` when its
    process is killed mid-write (``.<name>-<random>.tmp``); return what was removed. Call
    it only while no writer is at work there."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

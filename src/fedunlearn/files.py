"""Files written whole or not at all: a temporary file in the target's folder, flushed to
disk, then renamed over the target. A reader (or a job restarted after a crash) sees the
old file or the new one, never half of one.

(Two writers keep their own: the audit log's head, which must not follow links and has
its own permissions, and an inbox request file, which must never replace an existing
one.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A method that could not finish writes its reason here, in place of its results.
FAILED_FILE = "failed.json"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file, fsync it, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2,
               sort_keys: bool = False) -> Path:
    """``payload`` as JSON, atomically (numpy scalars as numbers, sets and tuples as
    lists, anything else as its string)."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, default=_jsonable)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_state_dict(path: str | os.PathLike, state: Any) -> Path:
    """``torch.save(state)`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(state, tmp))


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

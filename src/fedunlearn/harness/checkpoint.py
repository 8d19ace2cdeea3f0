"""Pretrained-model cache: one file per pretraining config, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord


def checkpoint_path(directory: Path, key: str) -> Path:
    return Path(directory) / f"pretrained-{key}.pt"


def save_checkpoint(path: Path, arrays: ArrayRecord, meta: dict) -> None:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temp file, then rename),
    so an interrupted run never leaves a half-written model that a later run loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"state": arrays.to_torch_state_dict(), "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta_path = path.with_suffix(".json")
    meta_tmp = meta_path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(meta_tmp, meta_path)


def load_checkpoint(path: Path) -> tuple[ArrayRecord, dict] | None:
    """The cached model and its metadata, or ``None`` if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return ArrayRecord(blob["state"]), blob.get("meta", {})

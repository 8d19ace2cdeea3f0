"""Pretrained-model cache: one file per pretraining config, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord

from ..files import save_state_dict, write_json


def checkpoint_path(directory: Path, key: str) -> Path:
    return Path(directory) / f"pretrained-{key}.pt"


def save_checkpoint(path: Path, arrays: ArrayRecord, meta: dict) -> None:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temp file, then rename),
    so an interrupted run never leaves a half-written model that a later run loads."""
    path = Path(path)
    save_state_dict(path, {"state": arrays.to_torch_state_dict(), "meta": meta})
    write_json(path.with_suffix(".json"), meta, sort_keys=True)


def load_checkpoint(path: Path) -> tuple[ArrayRecord, dict] | None:
    """The cached model and its metadata, or ``None`` if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return ArrayRecord(blob["state"]), blob.get("meta", {})

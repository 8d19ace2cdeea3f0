"""Loading ``results.json`` files and telling the setting a result belongs to."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ...harness.results import RESULTS_FILE
from .constants import PROTOCOL_FIELDS

def load_results(root: str | Path) -> list[tuple[Path, dict]]:
    """Every readable ``results.json`` under ``root`` (sorted by path)."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
    out = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"report: skipping {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "method" not in data or "unlearned" not in data:
            print(f"report: skipping {path}: not a fedunlearn results file", file=sys.stderr)
            continue
        out.append((path, data))
    return out


def _ints(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, str):
        return tuple(int(p) for p in re.split(r"[,;\s]+", value.strip()) if p)
    return tuple(int(v) for v in value)


def setting_of(result: dict) -> dict[str, Any]:
    """The setting a result belongs to (what changes the Retrain reference)."""
    cfg = result.get("config", {}) or {}
    forget = cfg.get("forget", {}) or {}
    scope = str(forget.get("scope", "client"))
    clients = _ints(forget.get("clients", (0,)))
    num_clients = int(cfg.get("num_clients", 10))
    partitioning = str(cfg.get("partitioning", "iid"))
    setting: dict[str, Any] = {
        "dataset": str(cfg.get("dataset", "?")),
        "model": str(cfg.get("model", "?")),
        "scope": scope,
        "targets": len(clients),
        "num_clients": num_clients,
        "ratio": round(len(clients) / num_clients, 6) if num_clients else float("nan"),
        "clients": ",".join(str(c) for c in clients),
        "classes": ",".join(str(c) for c in _ints(forget.get("classes", ())))
        if scope == "class" else "",
        "fraction": float(forget.get("fraction", 0.1))
        if scope == "instance" and not forget.get("sample_ids") else None,
        "sample_ids": len(_ints(forget.get("sample_ids", ()))) if scope == "instance" else 0,
        "data_of": int(forget.get("data_of", -1)),
        "partitioning": partitioning,
        "alpha": cfg.get("alpha") if partitioning == "dirichlet" else None,
        "backdoor": _backdoor(cfg.get("backdoor")),
    }
    for name in PROTOCOL_FIELDS:
        setting[name] = cfg.get(name)
    return setting


def _backdoor(value: Any) -> str:
    """A planted backdoor, compactly (it changes pretraining, hence the setting); "" if none."""
    if not isinstance(value, dict) or not _ints(value.get("clients", ())):
        return ""
    clients = ",".join(str(c) for c in _ints(value["clients"]))
    extra = ", ".join(f"{k}={value[k]}" for k in ("fraction", "patch_size", "position", "value")
                      if k in value)
    return f"clients {clients} -> label {value.get('target', 0)}" + (f" ({extra})" if extra else "")


def _key(d: dict) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in sorted(d.items()))

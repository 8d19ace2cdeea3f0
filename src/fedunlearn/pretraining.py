"""Pretraining: FedAvg from scratch over every client, or the cached model for the same
pretraining config (keyed by everything that determines it, written atomically)."""

from __future__ import annotations

import datetime as _dt
from logging import INFO

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .strategies.base import PretrainingProtocol, UnlearningContext, UnlearningStrategy
from .training import to_arrays


class PretrainStrategy(PretrainingProtocol, UnlearningStrategy):
    """FedAvg over all clients with the pretraining settings (no requests yet)."""

    name = "pretrain"
    uses_requests = False


def pretrain(grid: Grid, context: UnlearningContext,
             resolved: dict | None = None) -> tuple[ArrayRecord, dict]:
    """The pretrained model and a record of where it came from (``key``, ``path``,
    ``cached``, ``cost``). ``resolved`` adds values known only once the data is loaded
    (e.g. a backdoor's actual trigger) to the cache key."""
    cfg = context.cfg
    key = cfg.pretrain_key(resolved or {})
    path = checkpoint_path(cfg.resolved_checkpoint_dir(), key)
    cached = load_checkpoint(path)
    if cached is not None:
        arrays, meta = cached
        log(INFO, "[pretrain] loaded cached model %s (key %s); skipping pretraining",
            path, key)
        return arrays, {"key": key, "path": str(path), "cached": True,
                        "cost": meta.get("cost", {})}
    log(INFO, "[pretrain] FedAvg from scratch: %d rounds over all %d clients (key %s)",
        cfg.pretrain_rounds, cfg.num_clients, key)
    torch.manual_seed(cfg.seed)
    initial = to_arrays(context.model_factory())
    strategy = PretrainStrategy(context)
    with strategy.cost_phase("pretrain"):
        arrays = strategy.run_phase(grid, initial, strategy.recovery_phase())
    cost = strategy.cost.as_dict()
    cost["round_s"] = strategy.notes.get("training", {}).get("round_s", [])
    meta = {"key": key, "config": cfg.to_dict(), "cost": cost,
            "created": _dt.datetime.now().isoformat(timespec="seconds")}
    save_checkpoint(path, arrays, meta)
    log(INFO, "[pretrain] saved %s", path)
    return arrays, {"key": key, "path": str(path), "cached": False, "cost": cost}

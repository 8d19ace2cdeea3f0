"""Pretraining: FedAvg from scratch over every client, or the cached model for the same
pretraining config (keyed by everything that determines it, written atomically).

When a method of the job needs a training history (:mod:`fedunlearn.history`), the
history is recorded while pretraining runs and stored next to the checkpoint. A cached
checkpoint without a history that covers the need is pretrained again, with recording
(the log says why); a later job finds both.
"""

from __future__ import annotations

import datetime as _dt
from logging import INFO

import torch
from flwr.app import ArrayRecord, Message
from ..logs import log
from flwr.serverapp import Grid

from ..audit import model_digest
from .pretrain_cache import checkpoint_path, load_checkpoint, save_checkpoint
from ..protocol import MODEL_KEY
from ..history import HistoryRecorder, HistorySpec, TrainingHistory, find_history, history_dir
from ..strategies.base import PretrainingProtocol, UnlearningContext, UnlearningStrategy
from ..training import to_arrays
from .methods import build


class PretrainStrategy(PretrainingProtocol, UnlearningStrategy):
    """FedAvg over all clients with the pretraining settings (no requests yet); with a
    ``recorder``, every aggregated round goes into the training history."""

    name = "pretrain"
    uses_requests = False

    def __init__(self, *args, recorder: HistoryRecorder | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recorder

    def observe_replies(self, server_round: int, replies: list[Message]) -> None:
        if self.recorder is None or self.round_start is None:
            return
        parts = self.context.node_partitions
        self.recorder.observe(server_round, self.round_start, [
            (parts[int(m.metadata.src_node_id)], m.content[MODEL_KEY],
             int(m.content["metrics"]["num-examples"]))
            for m in replies if int(m.metadata.src_node_id) in parts])


def pretrain(grid: Grid, context: UnlearningContext, resolved: dict | None = None,
             history: tuple[HistorySpec, list[str]] | None = None,
             directory=None) -> tuple[ArrayRecord, dict]:
    """The pretrained model and a record of where it came from (``key``, ``path``,
    ``cached``, ``cost``; ``history`` when one is needed). ``resolved`` adds values known
    only once the data is loaded (e.g. a backdoor's actual trigger) to the cache key.
    ``history`` is ``(spec, methods that need it)``: the training history found or
    recorded goes into ``context.history``. With ``directory`` (a job of its own, e.g.
    nodes that hold their own data: the config does not say what they hold) nothing is
    loaded from a cache: the model is pretrained and saved there."""
    cfg = context.cfg
    key = cfg.pretrain_key(resolved or {})
    use_cache = directory is None
    directory = cfg.resolved_checkpoint_dir() if directory is None else directory
    path = checkpoint_path(directory, key)
    cached = load_checkpoint(path) if use_cache else None
    spec, who = history if history is not None else (HistorySpec(), [])
    cached, found = _with_history(cached, directory, key, path, spec, who)
    if cached is not None:
        return _from_cache(context, key, path, cached, found)
    return _pretrain_from_scratch(grid, context, directory, key, path, spec)


def _with_history(cached: tuple | None, directory, key: str, path, spec: HistorySpec,
                  who: list[str]) -> tuple[tuple | None, TrainingHistory | None]:
    """``(cached, found)``: the cached checkpoint, ``None`` when it lacks the training
    history ``spec`` asks for (``who`` need it), and that history."""
    found: TrainingHistory | None = None
    if cached is not None and spec:
        found = find_history(directory, key, spec, model_digest(cached[0]))
        if found is None:
            log(INFO, "[pretrain] the cached model %s has no training history with %s, "
                "which %s need(s): pretraining again with recording", path,
                spec.describe(), ", ".join(who))
            cached = None
    return cached, found


def _from_cache(context: UnlearningContext, key: str, path, cached: tuple,
                found: TrainingHistory | None) -> tuple[ArrayRecord, dict]:
    """The cached model and its record; its training history, if any, goes into
    ``context.history``."""
    arrays, meta = cached
    log(INFO, "[pretrain] loaded cached model %s (key %s); skipping pretraining",
        path, key)
    info = {"key": key, "path": str(path), "cached": True, "cost": meta.get("cost", {})}
    if found is not None:
        log(INFO, "[pretrain] loaded its training history %s (%s, %d bytes)",
            found.directory, found.spec.describe(), found.nbytes())
        context.history = found
        info["history"] = _history_info(found, cached=True)
    return arrays, info


def _pretrain_from_scratch(grid: Grid, context: UnlearningContext, directory, key: str,
                           path, spec: HistorySpec) -> tuple[ArrayRecord, dict]:
    """FedAvg from scratch (recording the training history when ``spec`` asks for
    one), the checkpoint saved at ``path``; the model and its record."""
    cfg = context.cfg
    log(INFO, "[pretrain] FedAvg from scratch: %d rounds over all %d clients (key %s)%s",
        cfg.pretrain_rounds, cfg.num_clients, key,
        f"; recording {spec.describe()}" if spec else "")
    torch.manual_seed(cfg.seed)
    initial = to_arrays(context.model_factory())
    recorder = HistoryRecorder(spec, history_dir(directory, key, spec)) if spec else None
    strategy = build(PretrainStrategy, cfg, context, recorder=recorder)
    try:
        with strategy.cost_phase("pretrain"):
            arrays = strategy.run_phase(grid, initial, strategy.recovery_phase())
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    cost = strategy.cost.as_dict()
    cost["round_s"] = strategy.notes.get("training", {}).get("round_s", [])
    meta = {"key": key, "config": cfg.to_dict(), "cost": cost,
            "created": _dt.datetime.now().isoformat(timespec="seconds")}
    save_checkpoint(path, arrays, meta)
    log(INFO, "[pretrain] saved %s", path)
    info = {"key": key, "path": str(path), "cached": False, "cost": cost}
    if recorder is not None:
        recorded = recorder.finish({"pretrain_key": key, "model_arrays_sha256": model_digest(arrays),
                                    "num_clients": cfg.num_clients})
        log(INFO, "[pretrain] saved the training history %s (%s, %d bytes)",
            recorded.directory, spec.describe(), recorded.nbytes())
        context.history = recorded
        info["history"] = _history_info(recorded, cached=False)
    return arrays, info


def _history_info(history: TrainingHistory, cached: bool) -> dict:
    return {"path": str(history.directory), "recorded": history.spec.describe(),
            "bytes": history.nbytes(), "rounds": history.rounds, "cached": cached}

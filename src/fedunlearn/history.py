"""Training history: what happened during federated pretraining, kept for the methods
that need it (FedEraser, FUKD, PGD), bounded in bytes.

A method declares what it needs as a :class:`HistorySpec`; the job's needs are the
union over its methods. Pretraining then records, from the train replies the server
aggregates anyway (nothing extra crosses the network):

* ``updates_every = k``: in rounds 1, 1+k, 1+2k, ... the global model the round started
  from, every client's update ``w_k - M^t`` (floating-point arrays) and its example
  count: one file per stored round (FedEraser);
* ``update_sums``: per client the running sum ``sum_t p_k^t (w_k^t - M^t)`` with
  ``p_k^t = n_k / sum_j n_j`` its FedAvg weight in round t: one file (FUKD);
* ``last_local``: every client's local model of the last round and its FedAvg weight
  then: one file (PGD).

Everything is keyed by **partition id**, not node id, so a cached history serves a
later job whose nodes have new ids. The history lives next to the pretrained checkpoint
in ``history-<pretrain key>-<spec digest>/`` with a ``manifest.json`` (what was
recorded, the rounds, the checkpoint's SHA-256, every file's size). It is written into a
temporary folder and renamed into place, so a crash never leaves a half history that a
later job loads. Its size is estimated from the model, the clients and the rounds
before pretraining and refused over ``history.max-mb``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from .training import to_state

MANIFEST = "manifest.json"
UPDATE_SUMS_FILE = "update_sums.pt"
LAST_LOCAL_FILE = "last_local.pt"
FORMAT = 1


def round_file(rnd: int) -> str:
    return f"round-{rnd:05d}.pt"


@dataclass(frozen=True)
class HistorySpec:
    """What a training history holds (see the module docstring).

    ``updates_every`` 0 means no per-round updates."""

    updates_every: int = 0
    update_sums: bool = False
    last_local: bool = False

    def __post_init__(self) -> None:
        if self.updates_every < 0:
            raise ValueError(f"updates_every={self.updates_every} must be >= 0")

    def __bool__(self) -> bool:
        return bool(self.updates_every or self.update_sums or self.last_local)

    def union(self, other: HistorySpec) -> HistorySpec:
        """Everything either needs (per-round updates at the gcd of both intervals)."""
        every = (math.gcd(self.updates_every, other.updates_every)
                 if self.updates_every and other.updates_every
                 else self.updates_every or other.updates_every)
        return HistorySpec(every, self.update_sums or other.update_sums,
                           self.last_local or other.last_local)

    def covers(self, need: HistorySpec) -> bool:
        """Whether a history recorded with this spec has everything ``need`` asks for
        (rounds 1, 1+k', ... are among 1, 1+k, ... when k divides k')."""
        if need.updates_every and not (self.updates_every
                                       and need.updates_every % self.updates_every == 0):
            return False
        return (self.update_sums or not need.update_sums) and (
            self.last_local or not need.last_local)

    def stored_rounds(self, rounds: int) -> list[int]:
        return list(range(1, rounds + 1, self.updates_every)) if self.updates_every else []

    def describe(self) -> str:
        parts = []
        if self.updates_every:
            parts.append(f"client updates every {self.updates_every} round(s)")
        if self.update_sums:
            parts.append("per-client weighted update sums")
        if self.last_local:
            parts.append("each client's last local model")
        return ", ".join(parts) or "nothing"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()
                              ).hexdigest()[:8]


# -- size -----------------------------------------------------------------------------
def model_float_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's floating-point state (what a history stores per model)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()
               if t.is_floating_point())


def estimate_bytes(spec: HistorySpec, model_bytes: int, num_clients: int,
                   rounds: int) -> dict[str, int]:
    """Estimated bytes of each part of a history (``total`` included).

    ``model_bytes``: the model's floating-point bytes. Per stored round: the global
    model plus one update per client; sums and last models: one model per client."""
    parts = {}
    if spec.updates_every:
        parts["updates"] = len(spec.stored_rounds(rounds)) * (num_clients + 1) * model_bytes
    if spec.update_sums:
        parts["update_sums"] = num_clients * model_bytes
    if spec.last_local:
        parts["last_local"] = num_clients * model_bytes
    parts["total"] = sum(parts.values())
    return parts


def check_bound(spec: HistorySpec, model_bytes: int, num_clients: int, rounds: int,
                max_mb: float, who: Iterable[str] = (), model: str = "") -> dict[str, int]:
    """Raise ``ValueError`` with the estimate when the history would exceed
    ``max_mb`` megabytes; return the estimate otherwise."""
    est = estimate_bytes(spec, model_bytes, num_clients, rounds)
    bound = int(max_mb * 1e6)
    if est["total"] > bound:
        methods = ", ".join(who) or "the job's methods"
        detail = []
        if spec.updates_every:
            n = len(spec.stored_rounds(rounds))
            detail.append(f"{n} stored round(s) x ({num_clients} client updates + the "
                          f"round's global model) = {_fmt(est['updates'])}")
        if spec.update_sums:
            detail.append(f"{num_clients} update sums = {_fmt(est['update_sums'])}")
        if spec.last_local:
            detail.append(f"{num_clients} last local models = {_fmt(est['last_local'])}")
        raise ValueError(
            f"the training history {methods} need(s) ({spec.describe()}) would take "
            f"{_fmt(est['total'])} on disk, over the bound history.max-mb={max_mb:g} "
            f"({_fmt(bound)}): {'; '.join(detail)}, at {_fmt(model_bytes)} per model"
            f"{f' ({model})' if model else ''} over {rounds} pretraining rounds and "
            f"{num_clients} clients. Raise history.max-mb, store fewer rounds (e.g. "
            "federaser.delta_t), or run methods that keep no history")
    return est


def _fmt(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


# -- recording --------------------------------------------------------------------------
class HistoryRecorder:
    """Records a :class:`HistorySpec` from the train replies of pretraining.

    Call :meth:`observe` with each round's starting model and the replies that are
    aggregated, as ``[(partition id, local model, example count)]``; then
    :meth:`finish` writes the history atomically next to the checkpoint."""

    def __init__(self, spec: HistorySpec, directory: Path) -> None:
        self.spec = spec
        self.final_dir = Path(directory)
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(dir=self.final_dir.parent,
                                             prefix=self.final_dir.name + ".tmp"))
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.last: dict[int, dict[str, torch.Tensor]] = {}
        self.last_weights: dict[int, float] = {}
        self.last_round = 0
        self.rounds_seen = 0

    def observe(self, rnd: int, start: ArrayRecord,
                replies: list[tuple[int, ArrayRecord, int]]) -> None:
        if not replies:
            return
        self.rounds_seen = max(self.rounds_seen, rnd)
        total = float(sum(n for _, _, n in replies))
        start_state = to_state(start)
        floats = [k for k, v in start_state.items() if v.is_floating_point()]
        locals_ = {pid: to_state(local) for pid, local, _ in replies}
        if self.spec.updates_every and (rnd - 1) % self.spec.updates_every == 0:
            updates = {pid: {k: state[k] - start_state[k] for k in floats}
                       for pid, state in locals_.items()}
            torch.save({"round": rnd, "global": start_state, "updates": updates,
                        "num_examples": {pid: int(n) for pid, _, n in replies}},
                       self.tmp_dir / round_file(rnd))
        if self.spec.update_sums:
            for pid, _, n in replies:
                acc = self.sums.setdefault(pid, {k: torch.zeros_like(start_state[k])
                                                 for k in floats})
                weight = n / total
                for k in floats:
                    acc[k] += weight * (locals_[pid][k] - start_state[k])
        if self.spec.last_local:
            self.last = locals_
            self.last_weights = {pid: n / total for pid, _, n in replies}
            self.last_round = rnd

    def finish(self, meta: dict) -> TrainingHistory:
        """Write the remaining files and the manifest, then move the folder into place."""
        if self.spec.update_sums:
            torch.save({"sums": self.sums}, self.tmp_dir / UPDATE_SUMS_FILE)
        if self.spec.last_local:
            torch.save({"models": self.last, "weights": self.last_weights,
                        "round": self.last_round}, self.tmp_dir / LAST_LOCAL_FILE)
        files = {p.name: p.stat().st_size for p in sorted(self.tmp_dir.iterdir())}
        manifest = {"format": FORMAT, "spec": self.spec.as_dict(), "rounds": self.rounds_seen,
                    "files": files, "bytes": sum(files.values()), **meta}
        with open(self.tmp_dir / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _replace_dir(self.tmp_dir, self.final_dir)
        return TrainingHistory(self.final_dir)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is replaced as a whole."""
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# -- reading ----------------------------------------------------------------------------
class TrainingHistory:
    """A recorded history on disk; every read is counted in :attr:`bytes_read`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.spec = HistorySpec(**self.manifest["spec"])
        self.bytes_read = 0
        self.files_read: set[str] = set()

    def reader(self) -> TrainingHistory:
        """The same history with its own read counters (one per method)."""
        return TrainingHistory(self.directory)

    @property
    def rounds(self) -> int:
        return int(self.manifest["rounds"])

    def nbytes(self) -> int:
        """Bytes of every file of the history on disk (the manifest included)."""
        return sum(p.stat().st_size for p in self.directory.iterdir())

    def _load(self, name: str) -> dict:
        path = self.directory / name
        if not path.exists():
            raise FileNotFoundError(f"training history {self.directory} has no {name}")
        if name not in self.files_read:
            self.files_read.add(name)
            self.bytes_read += path.stat().st_size
        return torch.load(path, map_location="cpu", weights_only=True)

    def stored_rounds(self, every: int = 1) -> list[int]:
        """Stored rounds 1, 1+every, ... (``every`` a multiple of the recorded one)."""
        if not self.spec.updates_every:
            raise ValueError(f"training history {self.directory} holds no client updates")
        if every % self.spec.updates_every:
            raise ValueError(f"updates stored every {self.spec.updates_every} round(s) "
                             f"cannot serve every {every}")
        return list(range(1, self.rounds + 1, every))

    def round(self, rnd: int) -> tuple[dict[str, torch.Tensor], dict[int, dict], dict[int, int]]:
        """``(global model at the round's start, {partition: update}, {partition: n})``."""
        blob = self._load(round_file(rnd))
        return blob["global"], blob["updates"], blob["num_examples"]

    def update_sums(self) -> dict[int, dict[str, torch.Tensor]]:
        return self._load(UPDATE_SUMS_FILE)["sums"]

    def last_local(self) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, float]]:
        blob = self._load(LAST_LOCAL_FILE)
        return blob["models"], blob["weights"]


def history_dir(checkpoint_dir: Path, pretrain_key: str, spec: HistorySpec) -> Path:
    return Path(checkpoint_dir) / f"history-{pretrain_key}-{spec.digest()}"


def recorded_model_digest(manifest: dict) -> str | None:
    """The array digest (:func:`fedunlearn.audit.model_digest`) of the model a recorded
    training ended at: the manifest's ``model_arrays_sha256`` (``model_sha256`` in
    histories recorded before fedunlearn named file hashes so)."""
    return manifest.get("model_arrays_sha256") or manifest.get("model_sha256")


def find_history(checkpoint_dir: Path, pretrain_key: str, need: HistorySpec,
                 model_arrays_sha256: str | None = None) -> TrainingHistory | None:
    """A complete history for ``pretrain_key`` that covers ``need`` (and, when given,
    was recorded with the checkpoint whose array digest is ``model_arrays_sha256``); the
    smallest such one, or ``None``."""
    found = []
    for path in Path(checkpoint_dir).glob(f"history-{pretrain_key}-*"):
        if not path.is_dir() or not (path / MANIFEST).exists():
            continue  # a temporary or half-removed folder
        try:
            history = TrainingHistory(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if history.manifest.get("format") != FORMAT or not history.spec.covers(need):
            continue
        if (model_arrays_sha256 is not None
                and recorded_model_digest(history.manifest) != model_arrays_sha256):
            continue
        found.append((history.manifest.get("bytes", 0), str(path), history))
    return min(found)[2] if found else None


__all__ = ["HistoryRecorder", "HistorySpec", "TrainingHistory", "check_bound",
           "estimate_bytes", "find_history", "history_dir", "model_float_bytes"]

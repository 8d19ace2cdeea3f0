"""What a per-example analysis of a job needs beside each ``results.json``.

* :func:`split_record`: the data split a job ran on, in every ``results.json``: the seeds
  (``seed``, ``partition_seed``), the forget ids of every accepted request (client-wise:
  the target's training split; class-wise: its samples of the classes; instance-wise:
  the ids) and which Retrain the job's reference is (:func:`reference`).
* :class:`PerExampleOutputs` (run-config ``audit.outputs=true``): ``outputs.npz``, the
  logits of the original model and of the method's model on the forget ids, a fixed
  retain sample (:data:`RETAIN_SAMPLE` ids drawn under the partition seed) and the test
  set, with the ids and labels; with a backdoor also on the **trigger** points: the ASR's
  samples (test samples whose true label is not the target) with the trigger stamped as
  the ASR stamps it (:func:`~.backdoor.asr_ids`, :func:`~.backdoor.triggered`), labelled
  with the backdoor's **target**: the label the poisoned client trained stamped samples
  under, so a margin says how surely a model still follows the trigger (as a forget
  point's margin says how surely it still knows the label it was trained on).

Forget and retain samples are taken from the server's copy of the public training set,
as the data set has them (a backdoor client's samples without its trigger).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..samples import labels_of
from ..metrics import predict
from ..requests import forget_indices
from ..training import load_arrays
from .backdoor import asr_ids, triggered
from .data import federated_data

OUTPUTS_FILE = "outputs.npz"
#: Retained training ids in ``outputs.npz`` (all of them when fewer are retained).
RETAIN_SAMPLE = 500


def forget_ids(cfg, requests: dict, own_data_nodes=()) -> np.ndarray | None:
    """The union of the accepted requests' forget sets (sorted global training ids) in
    the split the run-config assigns (:func:`~fedunlearn.harness.data.federated_data`),
    or ``None`` when a request names data of a node that holds its own
    (``dataset-path``). A record of the experiment's design, built from the run-config
    once the requests were checked: the server checks and bounds the requests with what
    the nodes report, never with this split."""
    if any(n in own_data_nodes for n in requests):
        return None
    data = federated_data(cfg)
    labels = labels_of(data.train)
    parts = [forget_indices(r, data.train_indices(r.partition_id), labels)
             for r in requests.values()]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def retain_sample(data, forget: np.ndarray, split_seed: int,
                  size: int = RETAIN_SAMPLE) -> np.ndarray:
    """``size`` retained training ids (every client's training split minus ``forget``),
    drawn under the split seed alone: the same for every training seed (sorted)."""
    train = np.concatenate([data.train_indices(p) for p in range(data.num_clients())])
    retained = np.setdiff1d(train, forget)
    if len(retained) <= size:
        return retained
    rng = np.random.default_rng(np.random.SeedSequence([int(split_seed), 0xA0D17]))
    return np.sort(rng.choice(retained, size=size, replace=False))


def reference(cfg) -> dict | None:
    """Which Retrain the job's Δ and Avg. Gap are measured against (``None``: no Retrain
    in the job): its budget and rounds."""
    if "retrain" not in cfg.methods:
        return None
    budget = cfg.method_params_for("retrain").get("budget", "pretrain")
    rounds = cfg.pretrain_rounds + (cfg.unlearn_rounds if budget == "matched" else 0)
    return {"method": "retrain", "budget": budget, "rounds": rounds}


def split_record(cfg, forget: np.ndarray | None) -> dict:
    """The ``results.json`` entries that name the data split and the reference."""
    return {"seed": cfg.seed, "partition_seed": cfg.split_seed,
            "forget_ids": None if forget is None else [int(i) for i in forget],
            "reference": reference(cfg)}


class PerExampleOutputs:
    """Writes ``outputs.npz`` for each method of a job; the original model's logits are
    computed once. ``trigger``: the backdoor's patch value (the harness's, ``None``
    without a backdoor), which adds the trigger points."""

    def __init__(self, cfg, new_model, device, forget: np.ndarray | None,
                 trigger=None) -> None:
        if forget is None:
            raise ValueError("audit.outputs=true needs the forget ids, and a request names "
                             "data the server has no copy of (a node with dataset-path); "
                             "set audit.outputs=false for this job")
        data = federated_data(cfg)  # the run-config's split, as for the forget ids
        self.cfg, self.data, self.new_model, self.device = cfg, data, new_model, device
        self.sets = {"forget": (data.train, forget),
                     "retain": (data.train, retain_sample(data, forget, cfg.split_seed)),
                     "test": (data.test, np.arange(len(data.test), dtype=np.int64))}
        if trigger is not None:
            self.sets["trigger"] = (
                triggered(data.test, cfg.backdoor, trigger, data.info.image_size),
                asr_ids(labels_of(data.test), cfg.backdoor))
        self.ids = {name: ids for name, (_, ids) in self.sets.items()}
        self.original: dict[str, np.ndarray] | None = None

    def logits(self, arrays) -> dict[str, np.ndarray]:
        """The model's logits on each sample set (float32), and the labels."""
        model = load_arrays(self.new_model(), arrays).to(self.device)
        out = {}
        for name, (dataset, ids) in self.sets.items():
            logits, labels = predict(model, dataset, ids, device=self.device)
            out[name] = np.asarray(logits, dtype=np.float32)
            out[f"{name}_labels"] = np.asarray(labels, dtype=np.int64)
        if "trigger" in out:  # the label the trigger was trained to give
            out["trigger_labels"] = np.full_like(out["trigger_labels"], self.cfg.backdoor.target)
        return out

    def write(self, path: Path, method: str, original_arrays, arrays) -> Path:
        """``path`` (``outputs.npz``): ``{forget,retain,test}_ids`` and ``_labels`` (and
        ``trigger_*`` with a backdoor), ``original_<set>`` and ``model_<set>`` logits,
        ``seed``, ``partition_seed``, ``method``."""
        if self.original is None:
            self.original = self.logits(original_arrays)
        mine = self.logits(arrays)
        blob: dict[str, np.ndarray] = {"method": np.array(method),
                                       "seed": np.array(self.cfg.seed),
                                       "partition_seed": np.array(self.cfg.split_seed)}
        for name, ids in self.ids.items():
            blob[f"{name}_ids"] = ids
            blob[f"{name}_labels"] = mine[f"{name}_labels"]
            blob[f"original_{name}"] = self.original[name]
            blob[f"model_{name}"] = mine[name]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **blob)
        tmp.replace(path)
        return path

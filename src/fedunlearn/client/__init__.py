"""ClientApp-side logic: answer the unlearning query, train, evaluate.

``flower_apps/client_app.py`` only wires these handlers to Flower's decorators, so they
can be unit-tested with hand-built messages.

A node learns which partition it holds from its node-config (``partition-id``,
``num-partitions``; the simulation engine sets both). It asks to be forgotten when

* its node-config has ``forget-scope`` (a real SuperNode: ``forget-scope``,
  ``forget-classes``, ``forget-sample-ids``, ``forget-fraction``), or
* its partition id is in the run-config's ``forget.clients`` (simulation).

The forget data never leaves the client: for training and evaluation the server sends
back the node's *accepted* request (scope, classes, ids) and the client filters locally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..backdoor import PoisonTransform, patch_size_for, poisoned_ids, trigger_value
from ..config import ExperimentConfig, parse_int_list
from ..data import FederatedData, build_federated_data
from ..metrics import membership_features, predict
from ..models import create_model
from ..requests import NODE_RECORD, REQUEST_RECORD, UnlearningRequest, forget_indices
from ..training import load_arrays, resolve_device, to_arrays, train_local

TRAIN_REQUEST_PREFIX = "forget."


@lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(items))


def experiment_config(context: Context) -> ExperimentConfig:
    return _config(tuple(sorted(context.run_config.items())))


def federated_data(cfg: ExperimentConfig) -> FederatedData:
    return build_federated_data(
        cfg.dataset, cfg.num_clients, partitioning=cfg.partitioning, alpha=cfg.alpha,
        val_fraction=cfg.val_fraction, seed=cfg.seed, root=cfg.data_root,
        download=cfg.data_download,
    )


@dataclass
class NodeView:
    """What one node needs: its config, the data and which partition it holds."""

    cfg: ExperimentConfig
    data: FederatedData
    partition_id: int

    @classmethod
    def from_context(cls, context: Context) -> NodeView:
        cfg = experiment_config(context)
        nc = context.node_config
        if "partition-id" not in nc:
            raise ValueError(
                "node-config has no 'partition-id': start the SuperNode with "
                "--node-config \"partition-id=<i> num-partitions=<n>\""
            )
        partition_id = int(nc["partition-id"])
        num_partitions = int(nc.get("num-partitions", cfg.num_clients))
        if num_partitions != cfg.num_clients:
            raise ValueError(
                f"node-config num-partitions={num_partitions} but the run expects "
                f"federation.num-clients={cfg.num_clients}"
            )
        data = federated_data(cfg)
        if not 0 <= partition_id < data.num_clients():
            raise ValueError(
                f"node-config partition-id={partition_id} outside 0..{data.num_clients() - 1}"
            )
        return cls(cfg=cfg, data=data, partition_id=partition_id)

    def train_indices(self) -> np.ndarray:
        return self.data.train_indices(self.partition_id)

    def labels(self) -> np.ndarray:
        return np.asarray(self.data.train.targets)

    def poison_transform(self) -> PoisonTransform | None:
        """The backdoor this node plants when it trains, if it is a backdoor client."""
        bd = self.cfg.backdoor
        if self.partition_id not in bd.clients:
            return None
        ids = poisoned_ids(self.train_indices(), self.labels(), bd,
                           seed=self.cfg.seed + 104_729 + self.partition_id)
        return PoisonTransform(ids, patch_size_for(bd, self.data.info.image_size),
                               bd.position, trigger_value(bd, self.data.train), bd.target)

    def new_model(self):
        info = self.data.info
        return create_model(self.cfg.model, num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size)


# ---------------------------------------------------------------------------------------
# query.unlearn
# ---------------------------------------------------------------------------------------
def own_request(view: NodeView, node_config) -> UnlearningRequest | None:
    """The request this node makes, from its node-config or the run-config."""
    cfg, pid = view.cfg, view.partition_id
    if "forget-scope" in node_config:
        scope = str(node_config["forget-scope"]).strip().lower()
        classes = parse_int_list(node_config.get("forget-classes", ""), "forget-classes")
        ids = parse_int_list(node_config.get("forget-sample-ids", ""), "forget-sample-ids")
        fraction = float(node_config.get("forget-fraction", cfg.forget.fraction))
        data_of = int(node_config.get("forget-data-of", -1))
    elif pid in cfg.forget.clients:
        f = cfg.forget
        scope, classes, ids, fraction, data_of = f.scope, f.classes, f.sample_ids, f.fraction, f.data_of
    else:
        return None
    if scope == "instance" and not ids:
        ids = tuple(sample_fraction(view.train_indices(), fraction, seed=cfg.seed + pid))
    return UnlearningRequest(scope=scope, partition_id=data_of if data_of >= 0 else pid,
                             classes=tuple(classes), sample_ids=tuple(ids))


def sample_fraction(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A deterministic random ``fraction`` of ``indices`` (sorted; empty if 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"forget fraction {fraction} must be in [0, 1]")
    n = int(round(fraction * len(indices)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.asarray(indices), size=n, replace=False))


def handle_query(msg: Message, context: Context) -> Message:
    """Answer ``query.unlearn``: the partition this node holds and its request, if any."""
    view = NodeView.from_context(context)
    content = RecordDict({NODE_RECORD: ConfigRecord({
        "partition-id": view.partition_id, "num-partitions": view.data.num_clients()})})
    try:
        request = own_request(view, context.node_config)
    except ValueError as err:
        # Report the problem instead of failing the node: the server rejects it by name.
        content[REQUEST_RECORD] = ConfigRecord(
            {"scope": "invalid", "partition-id": view.partition_id, "error": str(err)})
    else:
        if request is not None:
            content[REQUEST_RECORD] = request.to_config_record()
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------
def request_from_config(config: ConfigRecord, partition_id: int) -> UnlearningRequest | None:
    """The node's accepted request as the server echoed it in a train/evaluate config."""
    scope = config.get(TRAIN_REQUEST_PREFIX + "scope")
    if not scope:
        return None
    classes = config.get(TRAIN_REQUEST_PREFIX + "classes", [])
    ids = config.get(TRAIN_REQUEST_PREFIX + "sample-ids", [])
    return UnlearningRequest(scope=str(scope), partition_id=partition_id,
                             classes=tuple(int(c) for c in classes),
                             sample_ids=tuple(int(i) for i in ids))


def request_to_config(request: UnlearningRequest) -> dict:
    """Config entries that tell a node what to leave out (inverse of the above)."""
    out = {TRAIN_REQUEST_PREFIX + "scope": request.scope}
    if request.classes:
        out[TRAIN_REQUEST_PREFIX + "classes"] = [int(c) for c in request.classes]
    if request.sample_ids:
        out[TRAIN_REQUEST_PREFIX + "sample-ids"] = [int(i) for i in request.sample_ids]
    return out


def split_local(view: NodeView, request: UnlearningRequest | None) -> tuple[np.ndarray, np.ndarray]:
    """(retained, forget) global ids of this node's training split."""
    train = view.train_indices()
    if request is None:
        return train, np.zeros(0, dtype=np.int64)
    forget = forget_indices(request, train, view.labels())
    return np.setdiff1d(train, forget), forget


@dataclass
class _Job:
    """What a train/evaluate message asks of this node, unpacked."""

    view: NodeView
    config: ConfigRecord
    retained: np.ndarray
    forget: np.ndarray
    device: torch.device
    model: torch.nn.Module

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> _Job:
        view = NodeView.from_context(context)
        config = msg.content["config"]
        retained, forget = split_local(view, request_from_config(config, view.partition_id))
        device = resolve_device(view.cfg.device)
        model = load_arrays(view.new_model(), msg.content["arrays"]).to(device)
        return cls(view, config, retained, forget, device, model)


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's retained training data."""
    job = _Job.from_message(msg, context)
    view, config, retained, device, model = job.view, job.config, job.retained, job.device, job.model
    stats = train_local(
        model, view.data.train, retained,
        epochs=int(config["local-epochs"]), batch_size=view.cfg.batch_size,
        lr=float(config["lr"]), momentum=view.cfg.momentum, device=device,
        seed=int(config.get("seed", 0)) * 1000 + view.partition_id,
        clip_norm=float(config.get("clip-norm", 0.0)),
        transform=view.poison_transform(),
    )
    metrics = MetricRecord({
        "num-examples": stats.num_examples,
        "train-loss": 0.0 if math.isnan(stats.loss) else stats.loss,
        "samples-processed": stats.samples_processed,
    })
    return Message(RecordDict({"arrays": to_arrays(model.cpu()), "metrics": metrics}),
                   reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Report retain/forget accuracy and MIA features on this node's own data."""
    job = _Job.from_message(msg, context)
    view, config, device, model = job.view, job.config, job.device, job.model
    retained, forget = job.retained, job.forget
    max_members = int(config.get("max-members", 200))
    rng = np.random.default_rng(view.cfg.seed + 7919 * view.partition_id)

    metrics: dict = {"num-examples": int(retained.size)}
    for name, ids in (("retain", retained), ("forget", forget)):
        logits, labels = predict(model, view.data.train, ids, device=device)
        metrics[f"{name}-correct"] = int((logits.argmax(1) == labels).sum()) if len(ids) else 0
        metrics[f"{name}-total"] = int(len(ids))
        if len(ids):
            feats = membership_features(logits, labels)
            if name == "retain" and len(feats) > max_members:
                feats = feats[rng.choice(len(feats), size=max_members, replace=False)]
            metrics[f"{name}-features"] = [float(v) for v in feats.reshape(-1)]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


__all__ = [
    "NodeView", "experiment_config", "federated_data", "handle_evaluate", "handle_query",
    "handle_train", "own_request", "request_from_config", "request_to_config",
    "sample_fraction", "split_local", "to_arrays",
]

"""The harness's nodes: a :class:`~fedunlearn.client.NodeView` over partition
``partition-id`` of the run-config's public data set (or, with node-config
``dataset-path``, over the node's own folder), with the run-config's model, its planned
request (``forget.*``) and its backdoor.

``flower_apps/client_app.py`` passes :func:`harness_view` to every fedunlearn handler.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from flwr.app import Context

from ..client.node import NodeView, sample_fraction
from ..samples import labels_of
from ..client.plugin import build_view, node_dataset
from .backdoor import PoisonTransform, patch_size_for, poisoned_ids, trigger_value
from .config import ExperimentConfig
from .data import DATASET_SHAPES, federated_data
from .models import create_model


@lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(items))


def experiment_config(context: Context) -> ExperimentConfig:
    """The run's :class:`ExperimentConfig` (parsed once per run-config)."""
    return _config(tuple(sorted(context.run_config.items())))


def harness_view(context: Context) -> NodeView:
    """The harness's node: partition ``partition-id`` of the run-config's data set
    (built once per run, node-config and run-config in this process)."""
    items = tuple(sorted(context.run_config.items()))
    # One tuple per run-config for every node's key (each node's context holds a copy
    # of the run-config: 10,000 nodes' keys held 10,000 equal tuples, 4 kB each).
    if items not in _RUN_CONFIGS and len(_RUN_CONFIGS) >= 64:
        _RUN_CONFIGS.clear()
    items = _RUN_CONFIGS.setdefault(items, items)
    key = (int(context.run_id), tuple(sorted(context.node_config.items())), items)
    view = _VIEWS.get(key)
    if view is None:
        cfg = _config(items)
        view = _build(context, cfg)
        # Room for every node of this run (a bound below it rebuilt each node's view on
        # every message beyond 4,096 nodes); a long-lived process's other runs go first.
        if len(_VIEWS) >= max(MAX_VIEWS, cfg.num_clients):
            _VIEWS.clear()
        _VIEWS[key] = view
    return view


def _build(context: Context, cfg: ExperimentConfig) -> NodeView:
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
    if "dataset-path" in nc:
        return local_view(context, cfg)
    data = federated_data(cfg)
    if not 0 <= partition_id < data.num_clients():
        raise ValueError(
            f"node-config partition-id={partition_id} outside 0..{data.num_clients() - 1}"
        )
    info = data.info

    def new_model():
        return create_model(cfg.model, num_classes=info.num_classes,
                            in_channels=info.in_channels, image_size=info.image_size)

    train_ids, labels = data.train_indices(partition_id), labels_of(data.train)
    return NodeView(dataset=data.train, train_ids=train_ids,
                    val_ids=data.val_indices(partition_id), label_array=labels,
                    model_fn=new_model, num_classes=info.num_classes,
                    partition_id=partition_id, batch_size=cfg.batch_size,
                    momentum=cfg.momentum, seed=cfg.seed, device=cfg.device,
                    partitions=data.num_clients(), reports_partition=True,
                    transform=_poison(cfg, data, partition_id, train_ids, labels),
                    forget_spec=planned_request(cfg, partition_id, train_ids),
                    forget_fraction=cfg.forget.fraction,
                    model_key=(cfg.model, info.num_classes, info.in_channels,
                               info.image_size))


def planned_request(cfg: ExperimentConfig, partition_id: int, train_ids):
    """The run-config's ``forget.*`` for this partition (``None`` if it asks for
    nothing); an instance-wise fraction's ids drawn here under the split seed
    (``partition-seed``), so that the forget set is part of the data split."""
    spec = cfg.forget
    if partition_id not in spec.clients:
        return None
    if spec.scope == "instance" and not spec.sample_ids:
        ids = sample_fraction(train_ids, spec.fraction, seed=cfg.split_seed + partition_id)
        spec = dataclasses.replace(spec, sample_ids=tuple(int(i) for i in ids))
    return spec


def _poison(cfg: ExperimentConfig, data, partition_id: int, train_ids, labels
            ) -> PoisonTransform | None:
    """The backdoor this node plants when it trains, if it is a backdoor client."""
    bd = cfg.backdoor
    if partition_id not in bd.clients:
        return None
    ids = poisoned_ids(train_ids, labels, bd, seed=cfg.split_seed + 104_729 + partition_id)
    return PoisonTransform(ids, patch_size_for(bd, data.info.image_size), bd.position,
                           trigger_value(bd, data.train), bd.target)


def local_view(context: Context, cfg: ExperimentConfig) -> NodeView:
    """A harness node that holds its own data (node-config ``dataset-path``): the
    run-config's model (``model`` on ``dataset.name``'s shape) trained on the folder's
    samples. Like a plugin node, it reports no partition, and its requests come from its
    inbox or node-config, checked on the node; the run-config's ``forget.*`` and backdoor
    do not apply to it."""
    key = (int(context.run_id), int(context.node_id), str(context.node_config["dataset-path"]),
           cfg.dataset, cfg.model)
    if key in _LOCAL_VIEWS:
        return _LOCAL_VIEWS[key]
    classes, channels, size = DATASET_SHAPES[cfg.dataset]

    def new_model():
        return create_model(cfg.model, num_classes=classes, in_channels=channels,
                            image_size=size)

    view = build_view(context, new_model, node_dataset, None, None, classes, None, None,
                      cfg.batch_size, cfg.momentum, cfg.seed, cfg.device)
    path = context.node_config["dataset-path"]
    if len(view.dataset):
        shape = tuple(view.dataset[0][0].shape)
        if shape != (channels, size, size):
            raise ValueError(f"dataset-path {path}: samples of shape {shape}, but the run's "
                             f"model takes {cfg.dataset}'s ({channels}, {size}, {size}); "
                             "give the node data of the run's data set's shape")
    if view.label_array.size and int(view.label_array.max()) >= classes:
        raise ValueError(f"dataset-path {path}: label {int(view.label_array.max())} outside "
                         f"{cfg.dataset}'s label set 0..{classes - 1}")
    if len(_LOCAL_VIEWS) >= 8:
        _LOCAL_VIEWS.clear()
    _LOCAL_VIEWS[key] = view
    return view


_LOCAL_VIEWS: dict[tuple, NodeView] = {}
_VIEWS: dict[tuple, NodeView] = {}
_RUN_CONFIGS: dict[tuple, tuple] = {}
#: The node views this process keeps at least (more where a run has more clients).
MAX_VIEWS = 4096

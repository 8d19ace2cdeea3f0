"""Add fedunlearn to a Flower user's own ClientApp: :func:`attach`.

Flower mods cannot add message types (a ClientApp looks the handler up before any mod
runs), so :func:`attach` registers fedunlearn's handlers on the user's ``ClientApp``:

* ``query.unlearn``: the node's request (from its inbox or node-config), checked by the
  node against its own data, and counts about that data (never the data);
* ``train.<action>`` for every client action (``train.retained``: local training without
  the forget set; PUF's ``train.pseudo_gradient``; the data holder's methods, ...), and
  the plain ``train`` only when the app has no ``@app.train()`` of its own;
* ``evaluate.unlearn``: forget / retained accuracy and membership features on the
  node's own data, and the validation accuracy recovery's stopping rule needs.

The user hands over what only they know: a model factory, their training data (any
map-style dataset yielding ``(x, y)``), optionally a validation set, their labels, and
their own ``train`` function. Sample ids in requests are positions in the training set,
or the data owner's own id per sample (``sample_ids``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..inbox import INBOX_KEY
from ..protocol import DEFAULT_ACTION, QUERY_UNLEARN
from .actions import action_handler, list_actions
from .evaluate import handle_evaluate
from .node import NodeView, _labels
from .query import handle_query


def attach(app: ClientApp, *, model_fn: Callable[[], Any],
           data: Any, val_data: Any = None, labels: Any = None,
           num_classes: int | None = None, train_fn: Callable | None = None,
           sample_ids: Any = None, batch_size: int = 32, momentum: float = 0.9,
           seed: int = 0, device: str = "auto",
           inbox: Callable[[Context], str] | None = None) -> ClientApp:
    """Register fedunlearn's handlers on ``app``; return ``app``.

    Parameters
    ----------
    app : flwr.clientapp.ClientApp
        The user's ClientApp (its own handlers stay as they are).
    model_fn : callable
        ``model_fn()`` builds a fresh model (the user's ``Net``).
    data : Dataset or callable
        The node's training set (map-style, ``dataset[i] -> (x, y)``), or
        ``data(context) -> Dataset`` or ``-> (train, val)``, called once per run on the
        node (e.g. ``lambda ctx: load_local(ctx.node_config["dataset-path"])``).
    val_data : Dataset, optional
        The node's validation set (recovery's stopping rule validates on it).
    labels : sequence of int or callable, optional
        The label of every training (then validation) sample; default: the dataset's
        ``targets`` attribute, else read from the samples.
    num_classes : int, optional
        The size of the label set (default: the largest label + 1).
    train_fn : callable, optional
        ``train_fn(model, loader, epochs, lr, device) -> loss`` (Flower quickstart's
        ``train``); default: fedunlearn's SGD (``batch_size``, ``momentum``).
    sample_ids : sequence of int or callable, optional
        The data owner's id of each training sample (default: its position).
    inbox : callable, optional
        ``inbox(context) -> folder``: the node's request inbox when its node-config has
        no ``inbox`` (e.g. a per-node folder in a simulation).
    """
    if not isinstance(app, ClientApp):
        raise TypeError(f"attach() takes the user's flwr ClientApp, got {type(app).__name__}")
    if not callable(model_fn):
        raise TypeError("model_fn must be a callable that builds a fresh model")
    view_for = _cached_view(model_fn, data, val_data, labels, num_classes, train_fn,
                            sample_ids, batch_size, momentum, seed, device)
    _register_handlers(app, view_for, inbox)
    return app


def _cached_view(model_fn, data, val_data, labels, num_classes, train_fn, sample_ids,
                 batch_size, momentum, seed, device) -> Callable[[Context], NodeView]:
    """``view_for(context)``: the node's :class:`NodeView` (:func:`build_view`), built
    once per run and node and kept until another one is asked for."""
    cache: dict = {}

    def view_for(context: Context) -> NodeView:
        key = (int(context.run_id), int(context.node_id))
        if key not in cache:
            cache.clear()
            cache[key] = build_view(context, model_fn, data, val_data, labels, num_classes,
                                    train_fn, sample_ids, batch_size, momentum, seed, device)
        return cache[key]

    return view_for


def _register_handlers(app: ClientApp, view_for: Callable[[Context], NodeView],
                       inbox: Callable[[Context], str] | None) -> None:
    """Register a ``train.<action>`` handler per client action (the plain ``train``
    only when the app has no ``@app.train()`` of its own), ``query.unlearn`` and
    ``evaluate.unlearn`` on ``app``."""
    registered = getattr(app, "_registered_funcs", {})
    for action in list_actions():
        if action == DEFAULT_ACTION and "train.default" in registered:
            continue  # the user's own @app.train() serves plain train messages
        app.train(action)(action_handler(action, view_for))
    category, name = QUERY_UNLEARN.split(".")

    @app.query(name)
    def unlearn_query(msg: Message, context: Context) -> Message:
        if inbox is not None and INBOX_KEY not in context.node_config:
            context.node_config[INBOX_KEY] = str(inbox(context))
        return handle_query(msg, context, view_for)

    @app.evaluate("unlearn")
    def evaluate_unlearn(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, view_for)


def node_dataset(context: Context):
    """``(train, val)`` from this node's node-config ``dataset-path`` (Flower's examples'
    convention), with optional ``image-column`` / ``label-column``: pass it as
    ``attach(app, data=node_dataset, ...)``. See :mod:`fedunlearn.client.local_data`."""
    from .local_data import load_local_dataset

    nc = context.node_config
    if "dataset-path" not in nc:
        raise ValueError("node-config has no 'dataset-path': start the SuperNode with "
                         "--node-config \"dataset-path='/path/to/data'\"")
    return load_local_dataset(str(nc["dataset-path"]), str(nc.get("image-column", "")),
                              str(nc.get("label-column", "")))


def build_view(context, model_fn, data, val_data, labels, num_classes, train_fn,
               sample_ids, batch_size, momentum, seed, device) -> NodeView:
    """The node's :class:`NodeView` over the user's data."""
    from torch.utils.data import ConcatDataset

    train = data(context) if callable(data) and not hasattr(data, "__getitem__") else data
    if isinstance(train, tuple):
        if len(train) != 2:
            raise ValueError("data(context) must return a Dataset or (train, val)")
        train, val_data = train
    _check_dataset("data", train)
    n_train = len(train)
    if val_data is not None:
        _check_dataset("val_data", val_data)
        dataset = ConcatDataset([train, val_data])
        n_val = len(val_data)
    else:
        dataset, n_val = train, 0
    if labels is None:
        label_array = _labels(train)
        if n_val:
            label_array = np.concatenate([label_array, _labels(val_data)])
    else:
        label_array = np.asarray(labels(context) if callable(labels) else labels, dtype=np.int64)
    if label_array.shape != (n_train + n_val,):
        raise ValueError(f"labels: expected one label per sample ({n_train + n_val}: training "
                         f"then validation), got shape {label_array.shape}")
    if n_train + n_val and label_array.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    classes = int(num_classes) if num_classes else int(label_array.max(initial=-1)) + 1
    if classes < 1:
        raise ValueError("num_classes must be >= 1")
    ids = None
    if sample_ids is not None:
        ids = np.asarray(sample_ids(context) if callable(sample_ids) else sample_ids,
                         dtype=np.int64)
        if ids.shape != (n_train,) or len(np.unique(ids)) != n_train:
            raise ValueError(f"sample_ids: expected {n_train} distinct ids, one per "
                             "training sample")
    partition = _partition_id(context)
    return NodeView(dataset=dataset, train_ids=np.arange(n_train, dtype=np.int64),
                    val_ids=np.arange(n_train, n_train + n_val, dtype=np.int64),
                    label_array=label_array, model_fn=model_fn, num_classes=classes,
                    partition_id=partition, node_key=node_key(context),
                    batch_size=int(batch_size), momentum=float(momentum), seed=int(seed),
                    device=device, train_fn=train_fn, sample_ids=ids)


def _partition_id(context: Context) -> int | None:
    """The node-config's ``partition-id`` (a simulation's node), or ``None``: a node with
    private data has none, and its requests bind to the node itself."""
    value = context.node_config.get("partition-id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"node-config partition-id={value!r}: expected a non-negative "
                         "integer, or no partition-id at all (a node with private data)")
    return int(value)


def node_key(context: Context) -> int:
    """A stable number seeding the random draws of a node without a partition id: the
    first 32 bits of the SHA-256 of its node-config ``dataset-path``, else of its
    ``inbox``, else of its node id (the same across runs and restarts while the
    SuperNode keeps its node-config)."""
    nc = context.node_config
    source = next((f"{k}={nc[k]}" for k in ("dataset-path", INBOX_KEY) if k in nc),
                  f"node-id={int(context.node_id)}")
    return int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)


def _check_dataset(name: str, dataset) -> None:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name}: expected a map-style dataset (with __getitem__ and "
                        f"__len__) yielding (x, y), got {type(dataset).__name__}")


__all__ = ["attach", "build_view", "node_dataset", "node_key"]

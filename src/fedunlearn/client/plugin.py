"""Add fedunlearn to a Flower user's own ClientApp: :func:`attach`.

Flower mods cannot add message types (a ClientApp looks the handler up before any mod
runs), so :func:`attach` registers fedunlearn's handlers on the user's ``ClientApp``:

* ``query.unlearn``: the node's request (from its inbox or node-config), checked by the
  node against its own data, and counts about that data (never the data);
* ``train.<action>`` for every client action (``train.retained``: local training without
  the forget set; PUF's ``train.pseudo_gradient``; the data holder's methods, ...); the
  plain ``train`` stays the app's own ``@app.train()`` (registered before or after);
* ``evaluate.unlearn``: forget / retained accuracy and membership features on the
  node's own data, and the validation accuracy recovery's stopping rule needs;

and a mod in front of the plain ``train`` handler that keeps the node's forgotten data
out of all later training (:mod:`.forget_guard`).

The user hands over what only they know: a model factory, their training data as
their app holds it (a dataset yielding ``(x, y)``, a DataLoader, a Hugging Face /
``flwr-datasets`` dataset with dict samples: :mod:`.user_data`), optionally a validation
set, their labels, and their own ``train`` function, which gets batches in their
format. Sample ids in requests are positions in the training set, or the data owner's own
id per sample (``sample_ids``).
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
from .forget_guard import forget_guard, install_guard
from .node import NodeView
from .query import handle_query
from .user_data import check_labels, split_returned, user_data


def attach(app: ClientApp, *, model_fn: Callable[[], Any],
           data: Any, val_data: Any = None, labels: Any = None,
           num_classes: int | None = None, train_fn: Callable | None = None,
           sample_ids: Any = None, batch_size: int = 32, momentum: float = 0.9,
           seed: int = 0, device: str = "auto",
           inbox: Callable[[Context], str] | None = None, image_key: str | None = None,
           label_key: str | None = None, train_handler: bool = False) -> ClientApp:
    """Register fedunlearn's handlers on ``app``; return ``app``.

    Parameters
    ----------
    app : flwr.clientapp.ClientApp
        The user's ClientApp (its own handlers stay as they are).
    model_fn : callable
        ``model_fn()`` builds a fresh model (the user's ``Net``).
    data : Dataset, DataLoader or callable
        The node's training set: a map-style dataset yielding ``(x, y)``; a
        ``DataLoader`` over one (Flower's ``load_data``; its ``batch_size``,
        ``collate_fn`` and ``drop_last`` are kept for ``train_fn``); or a dataset with
        dict samples (a Hugging Face / ``flwr-datasets`` partition). Or
        ``data(context)`` returning one of these, ``(train, val)`` (Flower's
        ``(trainloader, testloader)``: the second is the node's validation set) or a
        ``DatasetDict`` (``train``, and ``validation``/``val``/``test`` as validation),
        called once per run on the node.
    val_data : Dataset or DataLoader, optional
        The node's validation set (recovery's stopping rule validates on it).
    labels : sequence of int or callable, optional
        The label of every training (then validation) sample; default: the label
        column of dict samples, the dataset's ``targets`` attribute, else the samples.
    num_classes : int, optional
        The size of the label set (default: the ``ClassLabel``'s number of classes,
        else the largest label + 1).
    train_fn : callable, optional
        ``train_fn(model, loader, epochs, lr, device) -> loss`` (Flower quickstart's
        ``train``); default: fedunlearn's SGD (``batch_size``, ``momentum``).
    sample_ids : sequence of int or callable, optional
        The data owner's id of each training sample (default: its position).
    inbox : callable, optional
        ``inbox(context) -> folder``: the node's request inbox when its node-config has
        no ``inbox`` (e.g. a per-node folder in a simulation).
    image_key, label_key : str, optional
        The image and label keys of dict samples (e.g. ``"img"``, ``"label"``); default:
        the dataset's ``Image``/array and ``ClassLabel`` features, else the one array
        and the one integer of its first sample (an error names the columns when that is
        ambiguous). ``train_fn`` gets the user's own batches (e.g. ``batch["img"]``);
        fedunlearn's own loops read ``(x, y)`` through these keys.
    train_handler : bool
        Register fedunlearn's own plain ``train`` handler too (``train_fn`` or its SGD
        over the node's data), for an app with no ``@app.train()`` of its own: recovery
        sends plain ``train`` messages to the nodes with nothing to forget. Default
        ``False``: the app's own ``@app.train()`` serves them, registered before or after
        this call.
    """
    _check_now(app, model_fn, data, val_data, labels, image_key, label_key)
    view_for = _cached_view(model_fn, data, val_data, labels, num_classes, train_fn,
                            sample_ids, batch_size, momentum, seed, device, image_key,
                            label_key)
    install_guard(app, forget_guard(view_for, inbox))  # first: fedunlearn's handlers get it
    _register_handlers(app, view_for, inbox, train_handler)
    return app


def _check_now(app, model_fn, data, val_data, labels, image_key, label_key) -> None:
    """``attach()``'s arguments, and the checks :func:`build_view` makes on the node, made
    when ``attach()`` is called where they can be (``data`` a dataset, not
    ``data(context)``): errors come at import."""
    if not isinstance(app, ClientApp):
        raise TypeError(f"attach() takes the user's flwr ClientApp, got {type(app).__name__}")
    if not callable(model_fn):
        raise TypeError("model_fn must be a callable that builds a fresh model")
    for name, key in (("image_key", image_key), ("label_key", label_key)):
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{name}: expected a column name (str), got {type(key).__name__}")
    if _is_factory(data):
        return
    train, val = split_returned(data, val_data)
    train = user_data(train, "data", image_key, label_key)
    n_val = 0
    if val is not None:
        n_val = len(user_data(val, "val_data", image_key or train.image_key,
                              label_key or train.label_key))
    if labels is not None and not callable(labels):
        check_labels(labels, len(train), n_val)


def _cached_view(model_fn, data, val_data, labels, num_classes, train_fn, sample_ids,
                 batch_size, momentum, seed, device, image_key,
                 label_key) -> Callable[[Context], NodeView]:
    """``view_for(context)``: the node's :class:`NodeView` (:func:`build_view`), built
    once per run and node and kept until another one is asked for."""
    cache: dict = {}

    def view_for(context: Context) -> NodeView:
        key = (int(context.run_id), int(context.node_id))
        if key not in cache:
            cache.clear()
            cache[key] = build_view(context, model_fn, data, val_data, labels, num_classes,
                                    train_fn, sample_ids, batch_size, momentum, seed, device,
                                    image_key, label_key)
        return cache[key]

    return view_for


def _register_handlers(app: ClientApp, view_for: Callable[[Context], NodeView],
                       inbox: Callable[[Context], str] | None, train_handler: bool) -> None:
    """Register a ``train.<action>`` handler per client action (the plain ``train`` only
    with ``train_handler``: else the app's own ``@app.train()`` serves it, registered
    before or after this call), ``query.unlearn`` and ``evaluate.unlearn`` on ``app``."""
    if train_handler and "train.default" in getattr(app, "_registered_funcs", {}):
        raise ValueError("attach(train_handler=True): the app already has its own "
                         "@app.train(); leave train_handler out to keep it")
    for action in list_actions():
        if action == DEFAULT_ACTION and not train_handler:
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
               sample_ids, batch_size, momentum, seed, device, image_key=None,
               label_key=None) -> NodeView:
    """The node's :class:`NodeView` over the user's data (see :mod:`.user_data`)."""
    from torch.utils.data import ConcatDataset

    train, val_data = split_returned(data(context) if _is_factory(data) else data, val_data)
    train = user_data(train, "data", image_key, label_key)
    val = None
    if val_data is not None:  # the training set's keys, unless named
        val = user_data(val_data, "val_data", image_key or train.image_key,
                        label_key or train.label_key)
    n_train, n_val = len(train), len(val) if val is not None else 0
    dataset = ConcatDataset([train.samples, val.samples]) if val is not None else train.samples
    if labels is None:
        label_array = train.labels()
        if val is not None:
            label_array = np.concatenate([label_array, val.labels()])
        if label_array.size and label_array.min() < 0:
            raise ValueError(f"data: labels must be non-negative class indices, found "
                             f"{int(label_array.min())}")
    else:
        label_array = check_labels(labels(context) if callable(labels) else labels,
                                   n_train, n_val)
    classes = int(num_classes) if num_classes else (
        train.class_count() or int(label_array.max(initial=-1)) + 1)
    if classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {classes}")
    if label_array.size and label_array.max() >= classes:
        raise ValueError(f"{'labels' if labels is not None else 'data'}: label "
                         f"{int(label_array.max())} is not a class index for "
                         f"num_classes={classes} (0..{classes - 1})")
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
                    device=device, train_fn=train_fn, sample_ids=ids, user_train=train)


def _is_factory(data) -> bool:
    """``data`` is ``data(context)``, not a dataset (nor a DataLoader)."""
    return callable(data) and not hasattr(data, "__getitem__") and not hasattr(data, "__iter__")


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


__all__ = ["attach", "build_view", "node_dataset", "node_key"]

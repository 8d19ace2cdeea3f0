"""Forgotten data stays out of the node's later training: its forget list and a mod.

Once the server has honoured a request, the node's data owner holds an ``honoured``
receipt in the node's inbox (:mod:`fedunlearn.inbox`). Training that comes later is the
user's own: Flower's ``FedAvg`` sends plain ``train`` messages to the user's
``@app.train()`` handler, which loads the node's whole training set. The mod built here
(:func:`forget_guard`, installed by :func:`fedunlearn.client.attach`) stands in front
of that handler, the way Flower's client-side DP mods stand in front of it:

* on a node whose client-wise request was honoured it answers every ``train`` message
  with an error reply saying why (Flower's strategies skip error replies); nothing of
  the node's data trains again;
* on a node with an honoured class- or instance-wise request it answers ``train`` with
  fedunlearn's retained-data training (the ``train.retained`` action: the user's own
  ``train_fn`` over the samples the node keeps), so the user's handler and ``train_fn``
  never see a forgotten sample; fedunlearn's own ``train.retained`` leaves them out too;
* on any other node, and for every other message type, it passes the message on.

The node's **forget list** (:func:`forget_list`) is read from durable state at every
guarded message, never from memory: the inbox's honoured requests (their receipts) and
a request in the node-config (``forget-scope``, ...). A node-config request has no
receipt the node could check, so it is the node's standing instruction: it is applied
from the node's start, before and after a server honours it. Both survive a restart
of the SuperNode and of the ServerApp. An inbox the node cannot read fails closed: the
node refuses to train and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from ..inbox import INBOX_KEY
from ..protocol import CONFIG_KEY, LOCAL_EPOCHS, LR, METRICS_KEY, MODEL_KEY, NUM_EXAMPLES
from .actions import handle_action
from .node import NodeView, inbox_sample_ids, node_inbox, own_request

GUARDED = ("train", "train.retained")
"""The message types the guard stands in front of: the user's plain ``train`` and
fedunlearn's retained-data training."""
NODE_CONFIG_SOURCE = "node-config"


@dataclass(frozen=True)
class ForgetList:
    """What this node must never train on again.

    ``client``: its whole training set (a client-wise request); otherwise ``positions``,
    the training-set positions of the forgotten samples. ``sources``: the inbox request
    ids (and ``node-config``) it comes from."""

    client: bool = False
    positions: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.client and not self.positions

    def what(self) -> str:
        return ", ".join(self.sources) or "-"


def forget_list(view: NodeView | Callable[[], NodeView], node_config) -> ForgetList:
    """The node's forget list from its inbox (requests with an ``honoured`` receipt) and
    its node-config request (see the module docstring). ``view`` may be a function that
    builds the view: it is called only when a class- or instance-wise request needs the
    node's data (a node that forgets nothing never loads it here)."""
    honoured, sources = [], []
    if INBOX_KEY in node_config:
        entries, _ = node_inbox(node_config).entries()
        honoured = [e.request for e in entries if e.status == "honoured"]
        sources = [r.id for r in honoured]
    if any(r.scope == "client" for r in honoured):
        return ForgetList(client=True, sources=tuple(sources))
    if not honoured and "forget-scope" not in node_config:
        return ForgetList()
    view = view() if callable(view) else view
    forget = _inbox_positions(view, honoured)
    if "forget-scope" in node_config:
        config = {k: v for k, v in node_config.items() if k != INBOX_KEY}
        request = own_request(view, config, run_config_requests=False)
        sources.append(NODE_CONFIG_SOURCE)
        if request is not None and request.scope == "client":
            return ForgetList(client=True, sources=tuple(sources))
        if request is not None:
            forget = np.union1d(forget, _positions(view, request.classes, request.sample_ids))
    return ForgetList(positions=tuple(int(i) for i in forget), sources=tuple(sources))


def _inbox_positions(view: NodeView, requests) -> np.ndarray:
    classes = {c for r in requests if r.scope == "class" for c in r.classes}
    ids: set[int] = set()
    for request in (r for r in requests if r.scope == "instance"):
        if request.sample_ids and view.sample_ids is not None:
            positions, _ = view.positions_of(request.sample_ids)  # ids no longer held: gone
            ids.update(int(p) for p in positions)
        else:
            ids.update(inbox_sample_ids(view, request))
    return _positions(view, classes, ids)


def _positions(view: NodeView, classes, ids) -> np.ndarray:
    train = np.asarray(view.train_ids, dtype=np.int64)
    by_class = train[np.isin(view.labels()[train], np.asarray(sorted(classes), dtype=np.int64))]
    return np.union1d(by_class, np.intersect1d(train, np.asarray(sorted(ids), dtype=np.int64)))


def forget_guard(view_for: Callable[[Context], NodeView],
                 inbox: Callable[[Context], str] | None = None) -> Callable:
    """A Flower mod ``guard(msg, context, call_next)`` that keeps the node's forget list
    out of its ``train`` / ``train.retained`` messages (see the module docstring).
    ``inbox(context)``: the inbox folder when the node-config names none (as in
    :func:`fedunlearn.client.attach`)."""

    def guard(msg: Message, context: Context, call_next) -> Message:
        mtype = msg.metadata.message_type
        if mtype not in GUARDED:
            return call_next(msg, context)
        if inbox is not None and INBOX_KEY not in context.node_config:
            context.node_config[INBOX_KEY] = str(inbox(context))
        try:
            forget = forget_list(lambda: view_for(context), context.node_config)
        except (ValueError, OSError) as err:
            return refusal(msg, f"fedunlearn could not read this node's forget list ({err}); "
                                "it trains on nothing until it can")
        if forget.empty:
            return call_next(msg, context)
        if forget.client:
            return refusal(msg, "fedunlearn: this node's data was forgotten client-wise "
                                f"(request(s) {forget.what()} honoured): it trains no more. "
                                "Keep it out on the server: ExcludeForgotten(strategy, "
                                "output_dir=<serve()'s output_dir>)")
        if mtype != "train":  # fedunlearn's own train.retained: its own reply format
            return handle_action("retained", msg, context, view_for, exclude=forget.positions)
        msg, problem = _with_training_config(msg, context)
        if problem:
            return refusal(msg, problem)
        return _as_quickstart_reply(handle_action("retained", msg, context, view_for,
                                                  exclude=forget.positions))

    guard.__name__ = "fedunlearn_forget_guard"
    return guard


def _with_training_config(msg: Message, context: Context) -> tuple[Message, str]:
    """A plain ``train`` message as fedunlearn's retained training reads it: ``lr`` from
    the train config (required), ``local-epochs`` from it, else the run-config's
    ``local-epochs`` (Flower quickstart's), else 1."""
    sent = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    if LR not in sent:
        return msg, (f"fedunlearn trains this node on the data it keeps with your train_fn and "
                     f"needs {LR!r} in the train config (e.g. FedAvg.start(..., train_config="
                     f"ConfigRecord({{'{LR}': 0.01}}))); got keys {sorted(sent)}")
    config = ConfigRecord(dict(sent))
    if LOCAL_EPOCHS not in config:
        epochs = context.run_config.get(LOCAL_EPOCHS, 1)
        config[LOCAL_EPOCHS] = int(epochs) if isinstance(epochs, int) else 1
    content = RecordDict({k: v for k, v in msg.content.items() if k != CONFIG_KEY})
    content[CONFIG_KEY] = config
    return Message(content, metadata=msg.metadata), ""


def _as_quickstart_reply(reply: Message) -> Message:
    """The reply to a plain ``train`` message with the metrics of Flower quickstart's
    handler (``train_loss``, ``num-examples``): Flower's ``FedAvg`` refuses a round whose
    replies carry different metric names, and this one stands beside the user's own."""
    metrics = reply.content[METRICS_KEY]
    content = RecordDict({MODEL_KEY: reply.content[MODEL_KEY], METRICS_KEY: MetricRecord({
        "train_loss": float(metrics["train-loss"]),
        NUM_EXAMPLES: int(metrics[NUM_EXAMPLES])})})
    return Message(content, metadata=reply.metadata)


def refusal(msg: Message, reason: str) -> Message:
    """An error reply to ``msg`` with ``reason`` (Flower's strategies skip it)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def install_guard(app, guard: Callable) -> None:
    """Put ``guard`` in front of the app's plain ``train`` handler, in either order of
    registration: Flower bakes an app's mods into each handler when it is registered, so
    a handler registered before this call is wrapped here, and ``guard`` joins the app's
    mods for every handler registered after it (fedunlearn's ``train.retained`` and a
    later ``@app.train()`` included)."""
    registered = app._registered_funcs
    handler = registered.get("train.default")
    if handler is not None and not getattr(handler, "_fedunlearn_guarded", False):
        def guarded(msg: Message, context: Context) -> Message:
            return guard(msg, context, handler)

        guarded._fedunlearn_guarded = True
        registered["train.default"] = guarded
    if guard not in app._mods:
        app._mods.append(guard)


__all__ = ["ForgetList", "GUARDED", "forget_guard", "forget_list", "install_guard", "refusal"]

"""ClientApp-side logic: answer the unlearning query, run client actions, evaluate.

:func:`attach` registers these handlers on a user's ClientApp over the user's data;
``flower_apps/client_app.py`` wires them for the experiment harness (every registered
action in one loop, each handler given :func:`fedunlearn.harness.node.harness_view`), so
they can be unit-tested with hand-built messages.

* :mod:`.node` — what a node knows: config, data, partition, its own request;
* :mod:`.query` — ``query.unlearn``;
* :mod:`.actions` — ``train`` and ``train.<action>``: one module per action;
* :mod:`.evaluate` — ``evaluate``.

The forget data never leaves the client: for training and evaluation the server sends
back the node's *accepted* request (scope, classes, ids) and the client filters locally.
"""

from __future__ import annotations

from flwr.app import Context, Message

from ..requests import request_from_config, request_to_config
from .actions import (ActionJob, ActionResult, action_handler, handle_action, list_actions,
                      register_action)
from .evaluate import handle_evaluate
from .node import NodeView, own_request, sample_fraction, split_local
from .plugin import attach, node_dataset
from .query import handle_query


def handle_train(msg: Message, context: Context, view_for=None) -> Message:
    """The plain ``train`` message: the default action (local training)."""
    return handle_action("default", msg, context, view_for)


__all__ = [
    "ActionJob", "ActionResult", "NodeView", "action_handler", "attach", "node_dataset",
    "handle_action", "handle_evaluate", "handle_query", "handle_train",
    "list_actions", "own_request", "register_action", "request_from_config",
    "request_to_config", "sample_fraction", "split_local",
]

"""Flower ClientApp: wires Flower's message handlers to :mod:`fedunlearn.client`.

Every client action registered in :mod:`fedunlearn.client.actions` is reachable as
message type ``train.<action>`` (``default``, local training, as plain ``train``); a new
action module needs no change here.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedunlearn.client import action_handler, handle_evaluate, handle_query, list_actions
from fedunlearn.harness.node import harness_view

app = ClientApp()

for _action in list_actions():
    app.train(_action)(action_handler(_action, harness_view))


@app.query("unlearn")
def unlearn_query(msg: Message, context: Context) -> Message:
    """Answer the server's ``query.unlearn``: which partition this node holds and its
    unlearning request, if it has one."""
    return handle_query(msg, context, harness_view)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context, harness_view)


@app.evaluate("unlearn")
def evaluate_unlearn(msg: Message, context: Context) -> Message:
    """fedunlearn's measurement (``evaluate.unlearn``): the same handler."""
    return handle_evaluate(msg, context, harness_view)

"""Flower ClientApp: wires Flower's message handlers to :mod:`fedunlearn.client`."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedunlearn.client import handle_evaluate, handle_query, handle_train

app = ClientApp()


@app.query("unlearn")
def unlearn_query(msg: Message, context: Context) -> Message:
    """Answer the server's ``query.unlearn``: which partition this node holds and its
    unlearning request, if it has one."""
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)

"""``query.unlearn``: the partition this node holds and its unlearning request, if any."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from ..requests import NODE_RECORD, REQUEST_RECORD
from .node import NodeView, own_request


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

"""Test helpers: hand-built Flower messages and contexts, a fake Grid."""

from __future__ import annotations

import time

from flwr.app import Context, Message, Metadata, RecordDict

from fedunlearn.launch import default_run_config


def run_config(**overrides) -> dict:
    """The app's run-config defaults with ``overrides`` (``forget_scope`` -> ``forget.scope``)."""
    rc = default_run_config()
    for key, value in overrides.items():
        rc[key.replace("__", ".").replace("_", "-")] = value
    return rc


def context(partition_id: int, rc: dict, node_id: int | None = None, **node_config) -> Context:
    nc = {"partition-id": partition_id, "num-partitions": int(rc["federation.num-clients"])}
    nc.update(node_config)
    return Context(run_id=1, node_id=node_id if node_id is not None else 100 + partition_id,
                   node_config=nc, state=RecordDict(), run_config=rc)


def incoming(content: RecordDict, message_type: str, dst_node_id: int = 1,
             src_node_id: int = 0) -> Message:
    """A message as a ClientApp receives it (metadata set, as in a running app)."""
    md = Metadata(run_id=1, message_id="m", src_node_id=src_node_id, dst_node_id=dst_node_id,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600,
                  message_type=message_type)
    return Message(content, metadata=md)


def reply_from(node_id: int, content: RecordDict, message_type: str = "query.unlearn") -> Message:
    """A reply as the server receives it from ``node_id``."""
    return incoming(content, message_type, dst_node_id=0, src_node_id=node_id)


class FakeGrid:
    """Just enough of ``flwr.serverapp.Grid`` for configure_train tests."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)

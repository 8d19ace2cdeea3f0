"""Test helpers: hand-built Flower messages and contexts, a fake Grid."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedunlearn.launch import default_run_config
from fedunlearn.harness.node import harness_view


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


# -- methods through the real ClientApp ---------------------------------------------------
NUM = 4
RC = run_config(**{"federation.num-clients": NUM, "dataset.name": "synthetic"})
NODE = {n: n - 10 for n in range(10, 10 + NUM)}  # node id -> partition


def train_msg(models: dict[str, ArrayRecord], config: dict, mtype: str,
              request=None) -> Message:
    """A train message as a ClientApp receives it, with ``request`` echoed."""
    from fedunlearn.requests import request_to_config

    cfg = ConfigRecord({"lr": 0.01, "local-epochs": 1, "clip-norm": 0.0, "seed": 3, **config})
    if request is not None:
        cfg.update(request_to_config(request))
    return incoming(RecordDict({**models, "config": cfg}), mtype)


class RecordingGrid:
    """A Grid whose nodes answer with the real ClientApp; it keeps what crossed it."""

    def __init__(self, app, rc: dict, nodes: dict[int, int]):
        self.app, self.rc, self.nodes = app, rc, nodes
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            dst = msg.metadata.dst_node_id
            inbound = incoming(msg.content, msg.metadata.message_type, dst_node_id=dst)
            reply = self.app(inbound, context(self.nodes[dst], self.rc, node_id=dst))
            self.replies.append(reply)
            out.append(reply)
        return list(reversed(out))  # arrival order is not send order


def make_context(rc: dict, requests: dict):
    """A server-side context for the synthetic 4-node federation of :data:`NODE`."""
    from fedunlearn.client import NodeView
    from fedunlearn.harness.config import ExperimentConfig
    from fedunlearn.metrics import flops_per_sample
    from fedunlearn.layers import example_input_for
    from fedunlearn.harness.data import federated_data
    from fedunlearn.harness.methods import HarnessContext

    cfg = ExperimentConfig.from_run_config(rc)
    view = harness_view(context(0, rc))
    info = federated_data(cfg).info
    flops = flops_per_sample(view.new_model(), (info.in_channels, info.image_size,
                                                 info.image_size), info.num_classes)
    return HarnessContext(cfg=cfg, requests=requests, node_partitions=dict(NODE),
                          model_factory=view.new_model,
                          example_input=example_input_for(info.in_channels, info.image_size),
                          flops_per_sample=flops["train"],
                          forward_flops_per_sample=flops["forward"])


def bytes_of(messages) -> int:
    """Bytes of every ArrayRecord of ``messages``."""
    from fedunlearn.metrics import arrayrecord_nbytes

    return sum(arrayrecord_nbytes(r) for m in messages for r in m.content.array_records.values())



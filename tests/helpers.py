"""Test helpers: hand-built Flower messages and contexts, and the in-process grid the
tests run their federations on (:class:`RecordingGrid`, a :class:`fedunlearn.engine.LocalGrid`;
the ``local_grid`` fixture of ``tests/conftest.py`` builds it)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedunlearn.engine import LocalGrid
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


# -- the in-process grid -------------------------------------------------------------------
GRID_RUN_ID = 1
"""The run id of the tests' grids (the one the ``server_identity`` fixture gives the server):
it fixes the node ids LocalGrid draws, so :data:`NODE` names the nodes of every such grid."""


def node_ids(num_nodes: int, run_id: int = GRID_RUN_ID) -> list[int]:
    """The node ids a :class:`LocalGrid` of ``num_nodes`` nodes and ``run_id`` gives its
    nodes, by partition (``node_ids(n)[p]`` holds partition ``p``)."""
    grid = LocalGrid(None, num_nodes, {}, run_id=run_id)  # ids only: no message is sent
    by_partition = {int(c.node_config["partition-id"]): n for n, c in grid.contexts.items()}
    return [by_partition[p] for p in range(num_nodes)]


class RecordingGrid(LocalGrid):
    """fedunlearn's in-process grid (:class:`fedunlearn.engine.LocalGrid`: the real ClientApp
    on each node's own Context, node-config and state kept across messages), keeping what
    crossed it: ``sent`` (the server's messages) and ``replies`` (the nodes' replies, error
    replies included), both in send order.

    ``arrival="reversed"`` (the default) hands each batch's replies back in reverse send
    order, as a SuperLink may (arrival order is not send order); ``"sent"`` keeps
    LocalGrid's order. ``tamper(node, reply)`` may replace a node's reply before the server
    (and ``replies``) sees it: a hostile node. The run id defaults to :data:`GRID_RUN_ID`,
    so the nodes are those of :func:`node_ids`. Membership can change while a job runs:
    add or remove a node's Context in ``contexts`` (a message to a node no longer there
    gets Flower's ``NODE_UNAVAILABLE`` error reply)."""

    def __init__(self, client_app, num_nodes: int, run_config, node_configs=None, *,
                 run_id: int = GRID_RUN_ID, arrival: str = "reversed",
                 tamper=None) -> None:
        if arrival not in ("reversed", "sent"):
            raise ValueError(f"arrival={arrival!r}: expected 'reversed' or 'sent'")
        super().__init__(client_app, num_nodes, run_config, node_configs, run_id)
        self.arrival, self.tamper = arrival, tamper
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        if self.tamper is not None:
            replies = [self.tamper(int(r.metadata.src_node_id), r) for r in replies]
        self.replies.extend(replies)
        return replies[::-1] if self.arrival == "reversed" else replies

    @property
    def partitions(self) -> dict[int, int]:
        """Node id -> the partition its node-config names, for the nodes connected now."""
        return {n: int(c.node_config["partition-id"]) for n, c in self.contexts.items()}

    def node_id(self, partition: int) -> int:
        """The node holding ``partition`` (the only one)."""
        (node,) = [n for n, p in self.partitions.items() if p == partition]
        return node

    def messages_to(self, node: int, category: str | None = None) -> list[Message]:
        """What was sent to ``node`` (of ``category``: ``train``, ``evaluate``, ...)."""
        return [m for m in self.sent if int(m.metadata.dst_node_id) == node
                and (category is None or m.metadata.message_type.split(".")[0] == category)]


# -- methods through the real ClientApp ---------------------------------------------------
NUM = 4
RC = run_config(**{"federation.num-clients": NUM, "dataset.name": "synthetic"})
NODE_ID = node_ids(NUM)
"""``NODE_ID[p]``: the node holding partition ``p`` on the tests' 4-node grids."""
NODE = {n: p for p, n in enumerate(NODE_ID)}  # node id -> partition


def train_msg(models: dict[str, ArrayRecord], config: dict, mtype: str,
              request=None) -> Message:
    """A train message as a ClientApp receives it, with ``request`` echoed."""
    from fedunlearn.requests import request_to_config

    cfg = ConfigRecord({"lr": 0.01, "local-epochs": 1, "clip-norm": 0.0, "seed": 3, **config})
    if request is not None:
        cfg.update(request_to_config(request))
    return incoming(RecordDict({**models, "config": cfg}), mtype)


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


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """The benchmark script ``bench/<name>.py`` imported as a module (as a user runs it:
    the scripts import each other by plain name from ``bench/``)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))

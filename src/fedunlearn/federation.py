"""Federation checks: which nodes are there, which partition each holds, what they ask.

Everything the server learns about the federation before it trains: the nodes that
connected (:func:`wait_for_nodes`), the partition each one holds, checked once and kept
for the job (:func:`check_partitions`), and the unlearning requests, each bound to the
node that sent it and validated against that verified map (:func:`collect_valid_requests`).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from .data import FederatedData
from .requests import (NODE_RECORD, QUERY_UNLEARN, REQUEST_RECORD, UnlearningRequest,
                       validate_request)

NODE_STALL_S = 60.0
REPLY_TIMEOUT_S = 3600.0


def wait_for_nodes(grid: Grid, want: int) -> list[int]:
    """Wait until ``federation.num-clients`` nodes are connected.

    Gives up once no new node has connected for ``NODE_STALL_S`` seconds (a
    simulation has all its nodes at once; a deployment's nodes keep arriving)."""
    start = last_change = time.monotonic()
    last_log, seen = -1e9, -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        now = time.monotonic()
        if len(nodes) != seen:
            seen, last_change = len(nodes), now
        if now - last_change > NODE_STALL_S:
            raise RuntimeError(
                f"only {len(nodes)} of federation.num-clients={want} nodes connected "
                f"(none joined in the last {NODE_STALL_S:.0f}s): in simulation pass "
                f"--federation-config \"num-supernodes={want}\" (fedunlearn-run does), "
                f"on a deployment start {want} SuperNodes")
        if now - last_log >= 10:
            log(INFO, "Waiting for nodes: %d of %d connected after %.0fs (simulation: "
                "num-supernodes must equal federation.num-clients)", len(nodes), want,
                now - start)
            last_log = now
        time.sleep(1.0)


def query(grid: Grid, nodes: list[int]) -> list[Message]:
    """Send ``query.unlearn`` to ``nodes``; every node answers with the partition it
    holds and its unlearning request, if it has one."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=QUERY_UNLEARN)
                for n in nodes]
    return list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))


def check_partitions(replies, num_clients: int) -> dict[int, int]:
    """node id -> partition id from ``query.unlearn`` replies.

    Raises ``RuntimeError`` unless every partition ``0..num_clients-1`` is held by exactly
    one node: a partition held twice would keep training on data that is being forgotten,
    a missing one would silently shrink the federation.
    """
    node_partitions: dict[int, int] = {}
    problems: list[str] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            problems.append(f"node {node} failed to answer: {msg.error.reason}")
        elif NODE_RECORD not in msg.content:
            problems.append(f"node {node} did not say which partition it holds")
        else:
            node_partitions[node] = int(msg.content[NODE_RECORD]["partition-id"])
    holders: dict[int, list[int]] = {}
    for node, partition in sorted(node_partitions.items()):
        holders.setdefault(partition, []).append(node)
    for partition, nodes in sorted(holders.items()):
        if len(nodes) > 1:
            problems.append(f"partition {partition} is held by several nodes {nodes}")
        if not 0 <= partition < num_clients:
            problems.append(f"node {nodes[0]} holds partition {partition}, outside "
                            f"0..{num_clients - 1} (federation.num-clients={num_clients})")
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        problems.append(f"no node holds partition(s) {missing}")
    if problems:
        raise RuntimeError("the federation's partitions are inconsistent: "
                           + "; ".join(problems)
                           + ". Give each SuperNode a distinct node-config partition-id "
                           "in 0..num-partitions-1.")
    return node_partitions


def collect_valid_requests(replies, data: FederatedData,
                           verified: dict[int, int] | None = None
                           ) -> tuple[dict[int, UnlearningRequest], list[dict]]:
    """Validate the requests in ``query.unlearn`` replies.

    ``verified`` is the node -> partition map checked before pretraining; when given, a
    request is checked against it only: a node outside it, or one that now claims
    another partition than the one it was verified with, is rejected.

    Returns ``(accepted, rejected)``: node id -> request, and one
    ``{"node_id", "reason"}`` per rejected request (each also logged).
    """
    node_partitions: dict[int, int] = {}
    raw: list[tuple[int, dict]] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            log(WARNING, "node %d failed to answer the unlearning query: %s", node,
                msg.error.reason)
            continue
        if NODE_RECORD in msg.content:
            node_partitions[node] = int(msg.content[NODE_RECORD]["partition-id"])
        if REQUEST_RECORD in msg.content:
            raw.append((node, dict(msg.content[REQUEST_RECORD])))
    claims = node_partitions
    if verified is not None:
        node_partitions = dict(verified)
    labels = np.asarray(data.train.targets)
    accepted: dict[int, UnlearningRequest] = {}
    rejected: list[dict] = []
    for node, record in raw:
        reason = None
        if node not in node_partitions:
            reason = ("the node is not in the verified federation (it joined after the "
                      "partition check or under a new id)" if verified is not None
                      else "the node did not say which partition it holds")
        elif node in claims and claims[node] != node_partitions[node]:
            reason = (f"the node now claims partition {claims[node]}, but it was verified "
                      f"holding partition {node_partitions[node]}")
        elif "error" in record:
            reason = f"the node could not build its request: {record['error']}"
        else:
            try:
                request = UnlearningRequest.from_config_record(record, node_id=node)
            except ValueError as err:
                reason = str(err)
            else:
                reason = validate_request(request, node_partitions[node], node_partitions,
                                          data.train_indices, labels, data.info.num_classes)
        if reason is None:
            accepted[node] = request
            log(INFO, "Unlearning request accepted from node %d: %s", node, request.describe())
        else:
            rejected.append({"node_id": node, "reason": reason})
            log(WARNING, "Unlearning request REJECTED from node %d: %s", node, reason)
    return accepted, rejected

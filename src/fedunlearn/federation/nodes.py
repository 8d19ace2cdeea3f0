"""Which nodes are there and which partition each holds: checked once, before any
training."""


import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from ..logs import log
from flwr.serverapp import Grid

from ..parsing import WireError
from ..protocol import reply_timeout
from ..replies import parse_node_record
from ..requests import QUERY_CONFIG, QUERY_UNLEARN, RUN_CONFIG_REQUESTS, WANT_REQUEST

NODE_STALL_S = 60.0

MALFORMED_REPLY = 1001
"""``Error.code`` of a reply the server refused as malformed (Flower's own codes are < 100)."""



def run_id_of(grid) -> int:
    """The Flower run id, or 0 when the grid has none (a test double)."""
    try:
        return int(grid.run.run_id)
    except Exception:  # a grid without a run: tests
        return 0


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


def query(grid: Grid, nodes: list[int], run_config_requests: bool = True,
          want_request: bool = True) -> list[Message]:
    """Send ``query.unlearn`` to ``nodes``; every node answers with the partition it
    holds and (with ``want_request``) its unlearning request, if it has one.
    ``run_config_requests`` says whether a node may ask through the run-config's
    ``forget.*`` (simulations only)."""
    config = ConfigRecord({RUN_CONFIG_REQUESTS: bool(run_config_requests),
                           WANT_REQUEST: bool(want_request)})
    messages = [Message(RecordDict({QUERY_CONFIG: config}), dst_node_id=n,
                        message_type=QUERY_UNLEARN)
                for n in nodes]
    return list(grid.send_and_receive(messages, timeout=reply_timeout(grid)))


def check_partitions(replies, num_clients: int) -> dict[int, int]:
    """node id -> partition id from ``query.unlearn`` replies: the verified view.

    Raises ``RuntimeError`` unless every partition ``0..num_clients-1`` is held by exactly
    one node: a partition held twice would keep training on data that is being forgotten
    (and nobody can tell which holder is genuine), a missing one would silently shrink
    the federation. A node that fails to answer, sends a malformed record or claims a
    partition outside the range is left out of the view (and named in the error if a
    partition ends up missing).
    """
    claims: dict[int, int] = {}
    left_out: list[str] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            left_out.append(f"node {node} failed to answer: {msg.error.reason}")
            continue
        try:
            partition = parse_node_record(msg.content)
        except WireError as err:
            left_out.append(f"node {node} sent a malformed node record: {err}")
            continue
        if not 0 <= partition < num_clients:
            left_out.append(f"node {node} holds partition {partition}, outside "
                            f"0..{num_clients - 1} (federation.num-clients={num_clients})")
            continue
        claims[node] = partition
    holders: dict[int, list[int]] = {}
    for node, partition in sorted(claims.items()):
        holders.setdefault(partition, []).append(node)
    problems = [f"partition {p} is held by several nodes {nodes}"
                for p, nodes in sorted(holders.items()) if len(nodes) > 1]
    missing = sorted(set(range(num_clients)) - set(holders))
    if missing:
        problems.append(f"no node holds partition(s) {missing}")
    if problems:
        raise RuntimeError("the federation's partitions are inconsistent: "
                           + "; ".join(problems + left_out)
                           + ". Give each SuperNode a distinct node-config partition-id "
                           "in 0..num-partitions-1.")
    for line in left_out:
        log(WARNING, "Left out of the federation: %s", line)
    return claims



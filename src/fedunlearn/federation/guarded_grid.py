"""The server's only door to the nodes (:class:`GuardedGrid`): the verified view, and
every reply checked before a strategy sees it."""


from bisect import bisect_left
from collections.abc import Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from ..logs import log
from flwr.serverapp import Grid

from ..arrays import records
from ..parsing import WireError
from ..protocol import NUM_EXAMPLES, REPLY_TIMEOUT_S
from ..replies import check_evaluate_metrics, check_train_reply, parse_evaluate_reply
from ..requests import forget_indices, request_from_config
from .nodes import MALFORMED_REPLY, NODE_STALL_S  # noqa: F401

#: On the plugin path, a train reply counts for at most this many times the median
#: training set of the other nodes (their first reports). It bounds an inflated weight, not
#: a crafted model: bench/hostile_weight.py measured that even 1x leaves a node sending
#: its own model in control of FedAvg(M) (docs/deployment.md#a-hostile-node), so the
#: factor leaves room for honestly unequal nodes and robust aggregators do the rest.
WEIGHT_CAP_FACTOR = 10


class GuardedGrid(Grid):
    """Flower's grid seen through the server's verified view of the federation.

    Before :meth:`verify` it only forwards. Afterwards:

    * :meth:`get_node_ids` returns the connected nodes of the view; a node outside it
      (late, restarted under a new id, impostor) is logged and audited once
      (``node.excluded``) and takes no part, so a forgotten client that reconnects
      cannot bring its data back into training or into the metrics;
    * messages to a node outside the view are not sent; replies from nodes that were not
      asked, or second replies, are dropped;
    * every train reply is checked against the model that was sent
      (:func:`~fedunlearn.replies.check_train_reply`: names, shapes, dtypes, finite values,
      the metric keys, ``num-examples`` at most the node's training split) and every
      evaluate reply against what the node can hold (:func:`check_evaluate`); a malformed
      reply becomes an error reply (code :data:`MALFORMED_REPLY`), so strategies count
      the node as failed for that round.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    audit : AuditLog, optional
        Where ``node.excluded`` and ``reply.refused`` events go.
    """

    def __init__(self, grid: Grid, audit=None, reply_timeout: float = REPLY_TIMEOUT_S) -> None:
        if not (isinstance(reply_timeout, (int, float)) and 0 < reply_timeout < float("inf")):
            raise ValueError(f"reply_timeout={reply_timeout!r}: expected seconds > 0")
        self.inner = grid
        self.audit = audit
        self.reply_timeout = float(reply_timeout)
        self.verified: dict[int, int] = {}
        #: The federation's data as the server knows it (the harness's partitions), if any.
        self.data = None
        self._reports: dict[int, dict] = {}
        #: node id -> the training-set size it first reported: a later report never
        #: raises the bound on its replies' weight.
        self._first_sizes: dict[int, int] = {}
        self._excluded: set[int] = set()
        self._departed: set[int] = set()
        self._pushed: dict[str, Message] = {}

    @property
    def reports(self) -> dict[int, dict]:
        """node id -> what the node reported about its own data (reply bounds)."""
        return self._reports

    @reports.setter
    def reports(self, reports: Mapping[int, dict]) -> None:
        self._reports = dict(reports)
        for node, report in self._reports.items():
            size = report.get("num-train") if isinstance(report, dict) else None
            if isinstance(size, int) and not isinstance(size, bool):
                self._first_sizes.setdefault(int(node), size)

    def verify(self, node_partitions: Mapping[int, int], data=None) -> None:
        """Fix the view: ``node_partitions`` (from :func:`check_partitions`) for the rest
        of the job; ``data`` bounds what replies may report."""
        self.verified = dict(node_partitions)
        self.data = data

    # -- the Grid interface ---------------------------------------------------------------
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        nodes = list(self.inner.get_node_ids())
        if not self.verified:
            return nodes
        connected = set(nodes)
        for node in sorted(connected - set(self.verified) - self._excluded):
            self._excluded.add(node)
            reason = ("not in the verified federation (joined after the partition check, "
                      "restarted under a new node id, or claims a partition another node "
                      "holds): it takes no part in this job")
            log(WARNING, "Node %d is %s", node, reason)
            if self.audit is not None:
                self.audit.record("node.excluded", node=node, reason=reason)
        self._follow(connected)
        return [n for n in nodes if n in self.verified]

    def _follow(self, connected: set[int]) -> None:
        """Membership follows the SuperLink, round by round: a verified node that is not
        connected has departed (a failed node while it is away); one that is connected
        again under its own id is asked again."""
        for node in sorted(set(self.verified) - connected - self._departed):
            self._departed_now(node, "no longer connected")
        for node in sorted(self._departed & connected):
            self._departed.discard(node)
            log(WARNING, "Node %d (partition %s) is connected again under its id: it is "
                "asked again from now on", node, self.verified.get(node))
            if self.audit is not None:
                self.audit.record("node.rejoined", node=node, partition=self.verified.get(node))

    def _departed_now(self, node: int, how: str) -> None:
        if node in self._departed:
            return
        self._departed.add(node)
        log(WARNING, "Node %d (partition %s) left the federation (%s): it is a failed node "
            "in every round and evaluation while it is away; back under its id, it is asked "
            "again; a node that comes back under a new id takes no part in this job", node,
            self.verified.get(node), how)
        if self.audit is not None:
            self.audit.record("node.departed", node=node, partition=self.verified.get(node),
                              how=how)

    @property
    def departed(self) -> list[int]:
        """Verified nodes that are away now (no longer connected; a node connected again
        under its id leaves this list)."""
        return sorted(self._departed)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        allowed = self._allowed(messages)
        ids = list(self.inner.push_messages(allowed))
        self._pushed.update({mid: msg for mid, msg in zip(ids, allowed) if mid})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out, caps = [], self._weight_caps()
        for reply in self.inner.pull_messages(message_ids):
            sent = self._pushed.pop(reply.metadata.reply_to_message_id, None)
            out.append(self.checked(reply, sent, caps=caps) if sent is not None else reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send, wait, check. Every message asked of a verified node gets exactly one
        reply: the node's (checked), or an error reply naming why there is none (the node
        left the federation, or no reply within the timeout); an error the SuperLink
        sends on a node's behalf counts as that node's."""
        allowed = self._allowed(messages)
        out: list[Message] = []
        if self.verified:
            self._follow(set(self.inner.get_node_ids()))
            gone = [m for m in allowed if int(m.metadata.dst_node_id) in self._departed]
            allowed = [m for m in allowed if int(m.metadata.dst_node_id) not in self._departed]
            out += [_no_reply(m, "the node left the federation") for m in gone]
        timeout = self.reply_timeout if timeout is None else min(timeout, self.reply_timeout)
        sent = {int(m.metadata.dst_node_id): m for m in allowed}
        replies = list(self.inner.send_and_receive(allowed, timeout=timeout)) if allowed else []
        by_id = {m.metadata.message_id: m for m in allowed if m.metadata.message_id}
        seen: set[int] = set()
        caps = self._weight_caps()
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            origin = by_id.get(reply.metadata.reply_to_message_id)
            if origin is not None and int(origin.metadata.dst_node_id) != src:
                # An error the SuperLink sends for a node (e.g. it stopped answering).
                src = int(origin.metadata.dst_node_id)
                reason = (reply.error.reason if reply.has_error()
                          else "a reply from another node")
                reply = _no_reply(origin, f"the SuperLink answered for it: {reason}")
            if src not in sent or src in seen:
                log(WARNING, "Dropped a reply from node %d: %s", src,
                    "a second reply" if src in seen else "it was not asked")
                continue
            seen.add(src)
            out.append(self.checked(reply, sent[src], caps=caps))
        for node in sorted(set(sent) - seen):  # a straggler fails this message only
            out.append(_no_reply(sent[node], f"no reply within {timeout:g} s"))
        if self.verified and allowed:  # who left while this exchange ran
            connected = set(self.inner.get_node_ids())
            for node in sorted(set(sent) - connected):
                self._departed_now(node, "no longer connected")
        return out

    # -- checks ---------------------------------------------------------------------------
    def _allowed(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if not self.verified:
            return messages
        out = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node in self.verified:
                out.append(msg)
            else:
                log(WARNING, "Not sending %s to node %d: it is not in the verified federation",
                    msg.metadata.message_type, node)
        return out

    def checked(self, reply: Message, sent: Message, *, caps: "WeightCaps | None" = None
                ) -> Message:
        """``reply`` if well-formed, else an error reply naming what is wrong. ``caps``:
        this exchange's :meth:`_weight_caps` (built here when not given)."""
        if reply.has_error():
            return reply
        node = int(reply.metadata.src_node_id)
        category = sent.metadata.message_type.split(".")[0]
        try:
            if category == "train":
                check_train_reply(reply, sent, self._train_size(node))
                reply = self._capped(reply, node,
                                     self._weight_caps() if caps is None else caps)
            elif category == "evaluate":
                self.check_evaluate(reply, sent, node)
        except WireError as err:
            reason = f"malformed {sent.metadata.message_type} reply: {err}"
            log(WARNING, "Node %d: %s; counted as a failed node this round", node, reason)
            if self.audit is not None:
                self.audit.record("reply.refused", node=node,
                                  partition=self.verified.get(node),
                                  message_type=sent.metadata.message_type, reason=reason)
            return Message(Error(code=MALFORMED_REPLY, reason=reason),
                           metadata=reply.metadata)
        return reply

    def check_evaluate(self, reply: Message, sent: Message, node: int) -> None:
        """An evaluate reply: the retain/forget counts (exactly the sizes the server
        derives from the node's partition and accepted request) and membership features
        of :func:`~fedunlearn.replies.parse_evaluate_reply`; for an evaluation of another
        ``split`` (e.g. ``"val"``, the recovery stopping rule's), counts that are
        non-negative ints with ``correct <= total`` and finite numbers."""
        config = sent.content.config_records.get("config", ConfigRecord())
        if "split" not in config:  # the retain/forget measurement
            parse_evaluate_reply(reply, max_members=_int_or_none(config.get("max-members")),
                                 expected_totals=self._expected_totals(node, config))
        else:
            check_evaluate_metrics(reply)

    def _train_size(self, node: int) -> int | None:
        """The most a train reply of ``node`` may weigh (``num-examples``): its partition's
        size where the server knows the data (the harness), else what the node reported
        about its training set, never more than its first report."""
        if self.data is not None and node in self.verified:
            return int(self.data.train_indices(self.verified[node]).size)
        if node in self.reports and "num-train" in self.reports[node]:
            size = int(self.reports[node]["num-train"])
            return min(size, self._first_sizes.get(node, size))
        return None

    def weight_cap(self, node: int) -> int | None:
        """On the plugin path (the server knows no data), the most a reply of ``node``
        counts for in an aggregate: :data:`WEIGHT_CAP_FACTOR` times the median training
        set the other verified nodes first reported (``None``: no cap: the data is known,
        or fewer than two other nodes reported)."""
        return self._weight_caps().cap(node)

    def _weight_caps(self) -> "WeightCaps":
        """The caps of every node, from one sort of the verified nodes' first reports:
        built once per exchange, so checking its n replies is O(n log n)."""
        if self.data is not None:
            return WeightCaps({})
        return WeightCaps({n: s for n, s in self._first_sizes.items() if n in self.verified})

    def _capped(self, reply: Message, node: int, caps: "WeightCaps") -> Message:
        """``reply`` with its ``num-examples`` lowered to :meth:`weight_cap` when above it
        (recorded as ``reply.capped``): no single node outweighs the rest."""
        cap = caps.cap(node)
        metrics = next(iter(records(reply.content, MetricRecord).values()), None)
        if cap is None or metrics is None or metrics.get(NUM_EXAMPLES, 0) <= cap:
            return reply
        claimed = int(metrics[NUM_EXAMPLES])
        content = RecordDict(dict(reply.content.items()))
        for key, record in records(reply.content, MetricRecord).items():
            content[key] = MetricRecord({**dict(record), NUM_EXAMPLES: cap})
        log(WARNING, "Node %d's train reply weighs %d examples, more than %d x the median of "
            "the other nodes: counted as %d (against a node that also sends a crafted model, "
            "give the recovery a robust aggregator, e.g. aggregation=FedMedian(...))", node,
            claimed, WEIGHT_CAP_FACTOR, cap)
        if self.audit is not None:
            self.audit.record("reply.capped", node=node, partition=self.verified.get(node),
                              num_examples=claimed, counted=cap)
        return Message(content, metadata=reply.metadata)

    def _expected_totals(self, node: int, config) -> dict[str, int] | None:
        if node not in self.verified:
            return None
        partition = self.verified[node]
        report = self.reports.get(node)
        if report is not None and "num-train" in report:
            # What the node reported: its training split and its accepted request's counts
            # (a plugin node's label may be its node id: not a partition to parse).
            request = request_from_config(config, None)
            if request is None:
                return {"retain-total": report["num-train"], "forget-total": 0}
            if "num-forget" in report:
                return {"retain-total": report["num-retained"],
                        "forget-total": report["num-forget"]}
            return None
        if self.data is None:
            return None
        train = self.data.train_indices(partition)
        request = request_from_config(config, partition)
        forget = 0 if request is None else int(
            forget_indices(request, train, np.asarray(self.data.train.targets)).size)
        return {"retain-total": int(train.size) - forget, "forget-total": forget}


class WeightCaps:
    """Every node's :meth:`GuardedGrid.weight_cap` from one sort: ``sizes`` maps the
    verified nodes to their first reported training-set sizes. A node's cap is
    :data:`WEIGHT_CAP_FACTOR` times the median of the others' sizes (the mean of the two
    middle ones for an even count), ``None`` where fewer than two others reported; the
    others are the sorted sizes less one copy of the node's own (equal sizes are
    interchangeable), so each cap is an index lookup."""

    def __init__(self, sizes: Mapping[int, int]) -> None:
        self._sizes = dict(sizes)
        self._sorted = sorted(self._sizes.values())

    def cap(self, node: int) -> int | None:
        """The most a reply of ``node`` counts for, or ``None`` (no cap)."""
        count = len(self._sorted)
        skip = count  # the index of the node's own size in the sorted list, if it has one
        if node in self._sizes:
            skip, count = bisect_left(self._sorted, self._sizes[node]), count - 1
        if count < 2:
            return None

        def other(i: int) -> int:  # the i-th smallest size of the others
            return self._sorted[i if i < skip else i + 1]

        median = other(count // 2) if count % 2 else \
            (other(count // 2 - 1) + other(count // 2)) / 2
        return max(1, int(WEIGHT_CAP_FACTOR * median))


def _no_reply(sent: Message, why: str) -> Message:
    """The error reply standing for a node's missing one (it failed this message)."""
    node = int(sent.metadata.dst_node_id)
    log(WARNING, "Node %d failed %s: %s", node, sent.metadata.message_type, why)
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=why), reply_to=sent)


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_deployment(grid) -> bool:
    """Whether the ServerApp runs on a real SuperLink rather than in a simulation.

    In flwr 1.41 a deployment's ServerApp process (``flwr-serverapp``, started by the
    SuperLink's SuperExec) talks to the SuperLink through an ``HttpGrid``; the simulation
    engine (``flwr-simulation``) runs the ServerApp in a thread with an ``InMemoryGrid``.
    Any other grid (a test double) counts as a simulation."""
    from flwr.superlink.grid import HttpGrid  # noqa: PLC0415 (only needed here)

    while isinstance(grid, GuardedGrid):
        grid = grid.inner
    return isinstance(grid, HttpGrid)

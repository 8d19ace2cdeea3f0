"""What a train reply must carry to be aggregated, and the reply reduced to what
FedAvg aggregates."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from ..arrays import decoded, records
from ..protocol import COST_METRICS, MODEL_KEY, NUM_EXAMPLES


class ReplyChecks:
    """The reply checks of :class:`~fedunlearn.strategies.UnlearningStrategy`."""

    def order_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in a fixed order (by partition, then node id), whatever their arrival
        order, so float sums and everything after them are reproducible."""
        parts = self.context.node_partitions
        return sorted(replies, key=lambda m: (parts.get(int(m.metadata.src_node_id), -1),
                                              int(m.metadata.src_node_id)))

    def reply_problem(self, msg: Message) -> str | None:
        """Why a train reply cannot be aggregated (``None``: it can).

        A reply must carry exactly one ArrayRecord (``arrays``) with the keys and shapes
        of the model sent, and one MetricRecord (any name, as Flower's FedAvg accepts)
        with a positive, finite ``num-examples`` (the aggregation weight, as in Flower).
        fedunlearn's cost metrics (``samples-processed``, ``forward-samples``) are
        optional; any other metric (a user's ``train_loss``) must be a finite number."""
        content = msg.content
        array_records, metric_records = records(content, ArrayRecord), records(content, MetricRecord)
        if len(array_records) != 1 or MODEL_KEY not in array_records:
            return f"expected one ArrayRecord {MODEL_KEY!r}, got {sorted(array_records)}"
        if len(metric_records) != 1:
            return f"expected one MetricRecord, got {sorted(metric_records)}"
        metrics = next(iter(metric_records.values()))
        if NUM_EXAMPLES not in metrics:
            return (f"the reply's metrics have no {NUM_EXAMPLES!r} (keys: "
                    f"{sorted(metrics)[:8]}): Flower's FedAvg weights every reply by it")
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                        v == v and abs(v) != float("inf")):
                    return f"metric {key}={value!r} is not a finite number"
            if key in (NUM_EXAMPLES, *COST_METRICS) and not (
                    isinstance(value, int) and value >= 0):
                return f"metric {key}={value!r} is not a non-negative integer"
        if metrics[NUM_EXAMPLES] <= 0:
            return f"{NUM_EXAMPLES} is 0: nothing to aggregate"
        sent = self.round_start
        if sent is not None:
            got = content[MODEL_KEY]
            if set(got) != set(sent):
                return "the model's keys differ from the model sent"
            bad = [k for k in sent if tuple(got[k].shape) != tuple(sent[k].shape)]
            if bad:
                return f"array shapes differ from the model sent: {bad[:3]}"
        return None


def normalized(msg: Message, keep: frozenset[str] = frozenset()) -> Message:
    """A checked train reply reduced to what FedAvg aggregates (the model,
    ``num-examples`` and the metrics in ``keep``: those every reply of the round has), so
    replies with different metric names (a plugin node's own handler and fedunlearn's
    actions in one round) pass Flower's consistency check."""
    if msg.has_error():
        return msg
    metrics = next(iter(records(msg.content, MetricRecord).values()))
    kept = {k: metrics[k] for k in sorted(keep) if k in metrics and k != NUM_EXAMPLES}
    content = RecordDict({MODEL_KEY: decoded(msg.content[MODEL_KEY]),
                          "metrics": MetricRecord({NUM_EXAMPLES: int(metrics[NUM_EXAMPLES]),
                                                   **kept})})
    return Message(content, metadata=msg.metadata)


def shared_metrics(replies: list[Message]) -> frozenset[str]:
    """The metric names every (non-error) reply carries with a plain number."""
    keys = None
    for msg in replies:
        if msg.has_error():
            continue
        metrics = next(iter(records(msg.content, MetricRecord).values()))
        names = {k for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = names if keys is None else keys & names
    return frozenset(keys or ())



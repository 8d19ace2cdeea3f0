"""Forgotten nodes stay out of the training that follows unlearning: a strategy wrapper.

Once :func:`fedunlearn.serve` has honoured a node's client-wise request, the model no
longer holds that node's data, and its data owner holds a receipt saying so. A Flower
strategy that goes on training afterwards (``FedAvg(...).start(grid, outcome.arrays,
...)``) samples every connected node, the forgotten one included. Like Flower's
differential-privacy wrappers, :class:`ExcludeForgotten` wraps any strategy and adds
one rule: a node whose client-wise request the audit log records as honoured is never
sent a train or evaluate message, and a reply from it is never aggregated::

    strategy = ExcludeForgotten(FedAvg(fraction_train=0.5), output_dir="unlearning")
    result = strategy.start(grid, outcome.arrays, num_rounds=10)

The wrapped strategy samples from a view of the grid without those nodes; the audit
log (``<output_dir>/audit.jsonl``, :mod:`fedunlearn.forgotten`) is re-read whenever it
changes, so a ServerApp that restarts keeps them out, and so does one that serves new
requests between rounds. Class- and instance-wise targets keep training; their own
ClientApp trains them on their retained data only (the mod that
:func:`fedunlearn.client.attach` installs). Its replies carry fedunlearn's metric names,
so in a round that mixes them with your handler's replies the wrapper passes on the
metrics every reply shares (``num-examples`` at least): Flower's ``FedAvg`` refuses a
round whose MetricRecords differ in their keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from ..logs import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..forgotten import ForgottenNodes


class _WithoutNodes:
    """A grid that does not show ``hidden`` nodes; everything else is ``grid``'s."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        self._grid, self._hidden = grid, set(hidden)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if int(n) not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._grid, name)


class ExcludeForgotten(Strategy):
    """Wrap ``strategy`` so that nodes forgotten client-wise never train again.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        Any Flower strategy (``FedAvg``, ``FedProx``, a DP wrapper, ...): it trains as
        it would, over the nodes that were not forgotten.
    output_dir : path
        The ``output_dir`` of :func:`fedunlearn.serve` (or service mode's state folder):
        its audit log names the nodes whose client-wise request was honoured.
    """

    def __init__(self, strategy: Strategy, output_dir: str | os.PathLike) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy={strategy!r}: expected a Flower strategy "
                            "(flwr.serverapp.strategy.Strategy, e.g. FedAvg(...))")
        self.strategy = strategy
        self.forgotten = ForgottenNodes(output_dir)
        self._announced: frozenset[int] | None = None
        self._mixed_noted = False

    # -- which nodes stay out -------------------------------------------------------------
    def kept_out(self) -> set[int]:
        """The node ids kept out now (logged whenever the set changes)."""
        nodes = self.forgotten.nodes()
        if self._announced != frozenset(nodes):
            self._announced = frozenset(nodes)
            if nodes:
                named = ", ".join(f"{n} ({r.get('method', '?')}, run {r.get('run', '?')})"
                                  for n, r in sorted(nodes.items()))
                log(INFO, "ExcludeForgotten: keeping out node(s) whose client-wise request "
                    "was honoured: %s (from %s)", named, self.forgotten.path)
            else:
                log(INFO, "ExcludeForgotten: %s records no honoured client-wise request; "
                    "no node is kept out", self.forgotten.path)
        return set(nodes)

    def _visible(self, grid: Grid, hidden: set[int]) -> _WithoutNodes:
        view = _WithoutNodes(grid, hidden)
        need = int(getattr(self.strategy, "min_available_nodes", 0) or 0)
        left = len(view.get_node_ids())
        if hidden and need > left:
            log(WARNING, "ExcludeForgotten: %s needs min_available_nodes=%d but %d node(s) "
                "remain once the forgotten are kept out; it waits for more to connect",
                type(self.strategy).__name__, need, left)
        return view

    def _dropped(self, messages: Iterable[Message], hidden: set[int], what: str) -> list:
        """``messages`` less those addressed to a forgotten node (each logged)."""
        return _without(messages, hidden, "dst_node_id", f"{what} message to forgotten "
                        "node %s not sent")

    def _accepted(self, replies: Iterable[Message], what: str) -> list[Message]:
        """``replies`` less those from a forgotten node (each logged)."""
        return _without(replies, self.kept_out(), "src_node_id", f"{what} reply from "
                        "forgotten node %s dropped")

    # -- Flower's Strategy ----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        hidden = self.kept_out()
        messages = self.strategy.configure_train(server_round, arrays, config,
                                                 self._visible(grid, hidden))
        return self._dropped(messages, hidden, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._shared_metrics(self._accepted(replies, "train"))
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        hidden = self.kept_out()
        messages = self.strategy.configure_evaluate(server_round, arrays, config,
                                                    self._visible(grid, hidden))
        return self._dropped(messages, hidden, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round,
                                                self._accepted(replies, "evaluate"))

    def summary(self) -> None:
        log(INFO, "\t├──> ExcludeForgotten: nodes forgotten client-wise in %s stay out",
            self.forgotten.path)
        self.kept_out()
        self.strategy.summary()

    def _shared_metrics(self, replies: list[Message]) -> list[Message]:
        """``replies`` with each MetricRecord cut to the keys every reply has, when they
        differ (the guard's retained-data replies beside the user's handler's)."""
        ok = [m for m in replies if not m.has_error() and len(m.content.metric_records) == 1]
        keysets = [set(next(iter(m.content.metric_records.values())).keys()) for m in ok]
        if not keysets or all(k == keysets[0] for k in keysets):
            return replies
        shared = set.intersection(*keysets)
        if not self._mixed_noted:
            self._mixed_noted = True
            log(INFO, "ExcludeForgotten: replies carry different metrics (nodes trained on "
                "their retained data by fedunlearn beside your train handler); aggregating "
                "the shared ones: %s", sorted(shared))
        checked, out = {id(m) for m in ok}, []
        for msg in replies:
            if id(msg) in checked:
                content = RecordDict()
                for name, record in msg.content.items():
                    if isinstance(record, MetricRecord):
                        record = MetricRecord({k: v for k, v in record.items() if k in shared})
                    content[name] = record
                msg = Message(content, metadata=msg.metadata)
            out.append(msg)
        return out


def _without(messages: Iterable[Message], hidden: set[int], side: str, note: str) -> list:
    """``messages`` whose ``metadata.<side>`` is not in ``hidden``; each one left out is
    logged with ``note`` (``%s``: the node)."""
    out = []
    for msg in messages:
        node = getattr(msg.metadata, side)
        if int(node) in hidden:
            log(WARNING, "ExcludeForgotten: " + note, node)
            continue
        out.append(msg)
    return out


__all__ = ["ExcludeForgotten"]

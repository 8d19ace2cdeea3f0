"""The Flower strategy that aggregates an unlearning method's rounds.

An unlearning method decides *who* trains on *what* in a round (its roles, client
actions and per-node configs); a Flower :class:`~flwr.serverapp.strategy.Strategy`
decides how the replies become the next model. By default that is Flower's ``FedAvgM``
with the phase's server momentum (0.5 for recovery, 0 for pretraining and Retrain); any
other Flower strategy can take its place, the way Flower's differential-privacy wrappers
take any strategy::

    NoT(Recovery(rounds=11), model_fn=Net, aggregation=FedAdam(...))

The default ``FedAvgM`` selects nodes as Flower's ``FedAvg`` does, with the recovery's
:class:`~fedunlearn.strategies.settings.NodeSelection` (``Recovery(fraction_train=...)``),
over the nodes the method lets train, drawn from the round's seed; by default all train.

The given strategy is copied afresh for every phase (a new server optimizer each time).
In each round it is asked ``configure_train`` over the nodes the method lets train (a
grid that shows only them): the nodes it samples (its ``fraction_train``) take part, and
the keys it adds to the round's config (FedProx's ``proximal-mu``, a DP wrapper's
clipping norm) reach them. Its ``aggregate_train`` then combines the replies the method
checked (one model and ``num-examples`` each).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy

from .. import protocol as P
from .settings import NodeSelection


def _like(arrays: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array in the dtype of the same array of ``sent``."""
    if all(arrays[k].dtype == sent[k].dtype for k in arrays if k in sent):
        return arrays
    out = ArrayRecord()
    for key in arrays:
        value = arrays[key].numpy()
        if key in sent and arrays[key].dtype != sent[key].dtype:
            value = value.astype(sent[key].numpy().dtype)
        out[key] = Array(value)
    return out


class AggregationError(RuntimeError):
    """The aggregating strategy cannot run a round with the nodes that may train."""


class PhaseFedAvgM(FedAvgM):
    """Flower's ``FedAvgM`` (server learning rate 1) for one phase: its reference point
    is the model the phase starts from, and its momentum may be restored (service mode's
    checkpoint)."""

    def __init__(self, server_momentum: float, arrays: ArrayRecord | None = None,
                 momentum: list | None = None,
                 selection: NodeSelection = NodeSelection()) -> None:
        super().__init__(fraction_train=selection.fraction_train,
                         min_train_nodes=selection.min_train_nodes,
                         min_available_nodes=selection.min_available_nodes,
                         server_learning_rate=1.0, server_momentum=server_momentum)
        self.current_arrays = arrays
        self.momentum_vector = None if momentum is None else [a.copy() for a in momentum]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Only the reference point: the unlearning method builds the messages."""
        if self.current_arrays is None:
            self.current_arrays = arrays
        return []


class _Participants:
    """A grid that shows only the nodes a method lets train this round."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes, self._asked = grid, list(nodes), 0

    def get_node_ids(self) -> list[int]:
        self._asked += 1
        if self._asked > 2:  # FedAvg's sampling asks twice; a third ask means it waits
            # for more nodes to connect, and none will come
            raise AggregationError(
                f"the recovery strategy waits for more nodes than the {len(self._nodes)} "
                f"that may train ({self._nodes}); lower its min_available_nodes / "
                "min_train_nodes")
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def check_template(aggregation, selection: NodeSelection, is_method: bool) -> None:
    """Refuse an ``aggregation=`` that is no Flower strategy (``is_method``: it is a
    fedunlearn method), or one given with a non-default ``Recovery`` node selection: the
    user's strategy selects the nodes itself, so the setting has one place."""
    if aggregation is None:
        return
    if not isinstance(aggregation, Strategy) or is_method:
        raise TypeError(f"aggregation={aggregation!r}: expected a Flower strategy "
                        "(flwr.serverapp.strategy.FedAdam(...), FedMedian(...), ...)")
    if not selection.everyone:
        name = type(aggregation).__name__
        raise ValueError(
            f"Recovery(fraction_train={selection.fraction_train}, min_train_nodes="
            f"{selection.min_train_nodes}, min_available_nodes="
            f"{selection.min_available_nodes}) with aggregation={name}(...): the strategy "
            f"you give selects the nodes itself; give these to it ({name}(fraction_train="
            "..., min_train_nodes=..., min_available_nodes=...)) and leave Recovery's at "
            "their defaults")


class Aggregation:
    """One phase's aggregating strategy (see the module docstring)."""

    def __init__(self, strategy: Strategy, builds_messages: bool) -> None:
        self.strategy = strategy
        self._builds_messages = builds_messages

    @classmethod
    def for_phase(cls, template: Strategy | None, server_momentum: float,
                  arrays: ArrayRecord | None = None, momentum: list | None = None,
                  selection: NodeSelection = NodeSelection()) -> Aggregation:
        """A fresh copy of ``template``, or ``FedAvgM`` with ``server_momentum`` and
        ``selection`` (whose reference point and momentum may be given) when there is
        none."""
        if template is None:
            return cls(PhaseFedAvgM(server_momentum, arrays, momentum, selection),
                       builds_messages=False)
        return cls(copy.deepcopy(template), builds_messages=True)

    def prepare(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                grid: Grid, nodes: list[int]) -> tuple[list[int], ConfigRecord]:
        """The nodes that train this round and their config, after the strategy's own
        ``configure_train`` over ``nodes``."""
        if not nodes:
            return nodes, config
        self._check_enough(nodes)
        if not self._builds_messages:
            self.strategy.configure_train(server_round, arrays, config, grid)
            return self._sampled(nodes, int(config.get(P.SEED, server_round))), config
        theirs = list(self.strategy.configure_train(
            server_round, arrays, ConfigRecord(dict(config)), _Participants(grid, nodes)))
        sampled = sorted({int(m.metadata.dst_node_id) for m in theirs} & set(nodes))
        merged = ConfigRecord(dict(config))
        key = getattr(self.strategy, "configrecord_key", "config")
        for msg in theirs[:1]:
            if key in msg.content.config_records:
                for k, v in msg.content.config_records[key].items():
                    if k not in merged:
                        merged[k] = v
        return sampled, merged

    def _check_enough(self, nodes: list[int]) -> None:
        need = max(int(getattr(self.strategy, "min_available_nodes", 0) or 0),
                   int(getattr(self.strategy, "min_train_nodes", 0) or 0))
        if need > len(nodes):
            name = (type(self.strategy).__name__ if self._builds_messages
                    else "FedAvgM (Recovery's node selection)")
            raise AggregationError(
                f"the recovery strategy {name} needs at least "
                f"{need} nodes (min_available_nodes / min_train_nodes) and only "
                f"{len(nodes)} may train ({nodes}); lower them")

    def _sampled(self, nodes: list[int], seed: int) -> list[int]:
        """The default ``FedAvgM``'s nodes: ``max(int(n * fraction_train),
        min_train_nodes)`` of them, as Flower's ``FedAvg`` samples, drawn from ``seed``;
        all of them (in their order, no draw) when that is every node."""
        s = self.strategy
        size = max(int(len(nodes) * s.fraction_train), s.min_train_nodes)
        if size >= len(nodes):
            return nodes
        chosen = set(random.Random(seed).sample(sorted(nodes), size))
        return [n for n in nodes if n in chosen]

    def aggregate(self, server_round: int, replies: list[Message],
                  sent: ArrayRecord | None = None
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate, in the dtypes of the model ``sent`` (Flower's
        ``FedOpt`` family computes in float64; the nodes train the model's own dtypes)."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and sent is not None:
            arrays = _like(arrays, sent)
        return arrays, metrics

    def momentum(self) -> list | None:
        """The server momentum after the last round (default ``FedAvgM`` only)."""
        vector = getattr(self.strategy, "momentum_vector", None)
        return None if vector is None else [a.copy() for a in vector]

    def reference(self) -> ArrayRecord | None:
        """The default ``FedAvgM``'s current model (``None`` for other strategies)."""
        return getattr(self.strategy, "current_arrays", None) if not self._builds_messages \
            else None

    def set_reference(self, arrays: ArrayRecord) -> None:
        """Move the default ``FedAvgM``'s current model (a method that edits the
        aggregate, e.g. writes frozen parameters back)."""
        if isinstance(self.strategy, PhaseFedAvgM) and self.strategy.server_opt:
            self.strategy.current_arrays = arrays

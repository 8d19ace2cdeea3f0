"""Record a training history around a user's own Flower strategy: :class:`HistoryKeeper`.

FedEraser, FUKD and PGD unlearn from what happened while the model trained (the client
updates of stored rounds, per-client update sums, the last local models; see
:mod:`fedunlearn.history`). On the plugin path the user trains with their own strategy
(Flower's ``FedAvg`` or any other); wrapping it in a :class:`HistoryKeeper` records
what those methods need from the train replies that strategy aggregates anyway
(nothing extra crosses the network), bounded in bytes before the first round::

    methods = [FedEraser(recovery, model_fn=Net), PGD(recovery, model_fn=Net)]
    keeper = HistoryKeeper(FedAvg(), methods=methods, directory="history", max_mb=200)
    result = keeper.start(grid, ArrayRecord(Net().state_dict()), num_rounds=30)
    outcome = serve(grid, result.arrays, methods, output_dir="out", history=keeper)

The history is keyed by node id (a node that rejoins under a new id is a new client to
it) and names the SHA-256 of the model it ended with: :func:`fedunlearn.serve` refuses
the history methods up front when it is asked to unlearn from a different model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from .logs import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .audit import model_digest
from .history import HistoryRecorder, HistorySpec, TrainingHistory, check_bound
from .protocol import NUM_EXAMPLES
from .strategies.base import UnlearningStrategy
from .training import to_state

#: ``manifest.json`` value of ``keyed_by`` for a history recorded by a HistoryKeeper.
KEYED_BY_NODE = "node-id"


class HistoryKeeper(Strategy):
    """A Flower strategy that trains exactly as ``strategy`` does and records a training
    history from the train replies it aggregates.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The user's training strategy (``FedAvg(...)`` or any other); every call is
        passed to it unchanged.
    methods : sequence of UnlearningStrategy
        The methods the history is for (their needs are united); e.g.
        ``[FedEraser(recovery, params={"delta_t": 2}), FUKD(...), PGD(...)]``.
    spec : HistorySpec, optional
        What to record, when given directly (united with ``methods``' needs).
    directory : path
        Where the history goes (a folder, written atomically when training ends; an
        existing history there is replaced).
    max_mb : float
        The size bound: :meth:`start` refuses, before the first round, a history whose
        estimate (model size x clients x stored rounds) exceeds it.
    """

    def __init__(self, strategy: Strategy, *, methods: Sequence[UnlearningStrategy] = (),
                 spec: HistorySpec | None = None, directory: str | os.PathLike,
                 max_mb: float = 100.0) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy={strategy!r}: expected a Flower Strategy "
                            "(e.g. flwr.serverapp.strategy.FedAvg())")
        if isinstance(strategy, UnlearningStrategy):
            raise TypeError(f"strategy={strategy.name}: wrap the strategy that trains the "
                            "model (e.g. FedAvg), not an unlearning strategy")
        need = spec if spec is not None else HistorySpec()
        names = []
        for method in methods:
            if not isinstance(method, UnlearningStrategy):
                raise TypeError(f"methods: {method!r} is not a fedunlearn strategy")
            need = need.union(type(method).history_needs(method.params))
            if type(method).history_needs(method.params):
                names.append(method.name)
        if not need:
            raise ValueError("HistoryKeeper: nothing to record: none of the methods "
                             f"{[m.name for m in methods]} keeps a training history "
                             "(FedEraser, FUKD and PGD do) and no spec was given")
        if not (isinstance(max_mb, (int, float)) and max_mb > 0):
            raise ValueError(f"max_mb={max_mb!r} must be a number > 0")
        self.strategy = strategy
        self.spec = need
        self.methods = names
        self.directory = Path(directory).expanduser().resolve()
        self.max_mb = float(max_mb)
        self.history: TrainingHistory | None = None
        self.estimate: dict[str, int] = {}
        self._recorder: HistoryRecorder | None = None
        self._round_start: ArrayRecord | None = None
        self._skipped: set[int] = set()

    def __getattr__(self, name: str):
        # Attributes of the wrapped strategy (e.g. FedAvg's weighted_by_key) read through.
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # -- the Flower Strategy interface, passed through ----------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._recorder is not None and self._round_start is not None:
            self._observe(server_round, replies)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> HistoryKeeper: recording %s for %s into %s (bound %g MB)",
            self.spec.describe(), ", ".join(self.methods) or "the given spec",
            self.directory, self.max_mb)
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, **kwargs) -> Result:
        """Train with the wrapped strategy (Flower's ``Strategy.start`` loop) and record
        the history; it is written when the last round ends (:attr:`history`)."""
        if self.history is not None or self._recorder is not None:
            raise RuntimeError(f"HistoryKeeper: a history was already recorded into "
                               f"{self.directory}; one keeper records one training run "
                               "(build a new keeper, with a new directory, for another)")
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds!r} must be an int >= 1")
        nodes = len(list(grid.get_node_ids()))
        model_bytes = sum(t.numel() * t.element_size() for t in to_state(initial_arrays).values()
                          if t.is_floating_point())
        self.estimate = check_bound(self.spec, model_bytes, max(nodes, 1), num_rounds,
                                    self.max_mb, who=self.methods, model="the given arrays")
        self._recorder = HistoryRecorder(self.spec, self.directory)
        try:
            result = super().start(grid, initial_arrays, num_rounds, timeout, **kwargs)
            if self._recorder.rounds_seen == 0:
                raise RuntimeError("HistoryKeeper: no round had a train reply to record "
                                   "(every node failed or none was selected)")
            final = result.arrays if len(result.arrays) else initial_arrays
            self.history = self._recorder.finish({
                "keyed_by": KEYED_BY_NODE, "model_arrays_sha256": model_digest(final),
                "num_clients": nodes, "strategy": type(self.strategy).__name__,
                "skipped_nodes": sorted(self._skipped)})
        except BaseException:
            self._recorder.abort()
            raise
        log(INFO, "HistoryKeeper: saved the training history %s (%s, %d bytes; estimate "
            "%d)", self.history.directory, self.spec.describe(), self.history.nbytes(),
            self.estimate["total"])
        return result

    def _observe(self, server_round: int, replies: list[Message]) -> None:
        weight_key = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES)
        keys = set(self._round_start.keys())
        observed = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                continue
            arrays = list(msg.content.array_records.values())
            weights = [m[weight_key] for m in msg.content.metric_records.values()
                       if weight_key in m]
            if len(arrays) != 1 or set(arrays[0].keys()) != keys or len(weights) != 1 \
                    or not isinstance(weights[0], int) or weights[0] < 1:
                if node not in self._skipped:
                    log(WARNING, "HistoryKeeper: round %d: the reply of node %d is not one "
                        "model with an integer '%s' >= 1; it is not recorded",
                        server_round, node, weight_key)
                self._skipped.add(node)
                continue
            observed.append((node, arrays[0], int(weights[0])))
        self._recorder.observe(server_round, self._round_start, observed)


__all__ = ["HistoryKeeper", "KEYED_BY_NODE"]

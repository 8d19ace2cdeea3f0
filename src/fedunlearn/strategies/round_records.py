"""What a round leaves behind: the failure of a round with no usable reply, and the
histories :meth:`~fedunlearn.strategies.UnlearningStrategy.start` returns in Flower's
``Result`` (aggregated train metrics, server-side evaluation by ``evaluate_fn``)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord

from .context import UnlearningFailed
from .settings import Phase


@dataclass
class PlayedRound:
    """What one round left: the aggregate (``None``: no usable reply), its metrics, the
    messages sent (none: no node could take part) and the replies."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    messages: list[Message]
    replies: list[Message]


class RoundRecords:
    """The round-record part of :class:`~fedunlearn.strategies.UnlearningStrategy`."""

    def _no_usable_reply(self, phase: Phase, rnd: int, messages: list[Message],
                         replies: list[Message]) -> UnlearningFailed:
        asked = sorted(int(m.metadata.dst_node_id) for m in messages)
        answered = {int(m.metadata.src_node_id) for m in replies}
        silent = [n for n in asked if n not in answered]
        why = list(getattr(self, "round_problems", []))
        if silent:
            why.append(f"node(s) {silent} did not answer")
        return UnlearningFailed(
            f"[{self.phase}] {phase.name} round {rnd}: no usable reply from nodes {asked} "
            f"({'; '.join(why) or 'no reply'}); the method stops here and returns no model")

    def _record_round(self, phase: Phase, rnd: int, arrays: ArrayRecord,
                      metrics: MetricRecord | None) -> None:
        """The round's aggregated train metrics, and the server-side evaluation of
        :meth:`start`'s ``evaluate_fn`` (Flower's ``Result`` histories, keyed by the
        recovery round)."""
        if phase.name != self.recovery_phase().name:
            return
        if metrics is not None:
            self.train_metrics[rnd] = metrics
        if self._evaluate_fn is not None:
            self._evaluate(rnd, arrays)

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> None:
        value = self._evaluate_fn(rnd, arrays)
        if value is None:
            return
        if not isinstance(value, MetricRecord):
            raise TypeError(f"evaluate_fn(server_round, arrays) returned "
                            f"{type(value).__name__}; Flower's convention is a MetricRecord "
                            "or None")
        self.evaluate_metrics[rnd] = value


"""What a method costs (:class:`CostMeter`, one per phase), and the metering every
strategy does (:class:`Metered`): bytes of every ArrayRecord both ways, FLOPs of trained
and forward-only samples, server-side FLOPs, storage kept between rounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from ..arrays import records
from ..metrics import arrayrecord_nbytes
from ..protocol import FORWARD_SAMPLES, NUM_EXAMPLES, SAMPLES_PROCESSED


@dataclass
class CostMeter:
    """What a phase cost: rounds, bytes both ways, FLOPs, wall time, extra storage.

    FLOPs = trained samples x FLOPs of one forward + backward pass + forward-only samples
    x FLOPs of one forward pass + server-side extra FLOPs."""

    rounds: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    samples_processed: int = 0
    forward_samples: int = 0
    flops_per_sample: int = 0
    forward_flops_per_sample: int = 0
    storage_bytes: int = 0
    wall_s: float = 0.0
    extra_flops: int = 0
    messages_down: int = 0
    messages_up: int = 0
    #: Of ``samples_processed``, those estimated as ``num-examples x local-epochs`` for
    #: replies that did not count their own (a user's train handler).
    estimated_samples: int = 0

    @property
    def comm_bytes(self) -> int:
        return self.bytes_down + self.bytes_up

    @property
    def flops(self) -> int:
        return (self.samples_processed * self.flops_per_sample
                + self.forward_samples * self.forward_flops_per_sample + self.extra_flops)

    @property
    def flops_partial(self) -> bool:
        """``flops`` leaves out work done on the nodes: samples were trained or run
        forward there, but their per-sample FLOPs were unknown (no model factory and
        example input to count them with), so only server-side arithmetic is counted."""
        return bool((self.samples_processed and not self.flops_per_sample)
                    or (self.forward_samples and not self.forward_flops_per_sample))

    def add(self, other: CostMeter) -> None:
        """Add ``other``'s counts (storage: the larger of the two; both are peaks)."""
        for f in ("rounds", "bytes_down", "bytes_up", "samples_processed", "forward_samples",
                  "extra_flops", "messages_down", "messages_up", "estimated_samples"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.wall_s += other.wall_s
        self.storage_bytes = max(self.storage_bytes, other.storage_bytes)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "comm_bytes": self.comm_bytes,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "messages_down": self.messages_down, "messages_up": self.messages_up,
                "flops": self.flops, "train_samples": self.samples_processed,
                "forward_samples": self.forward_samples, "server_flops": self.extra_flops,
                "wall_s": round(self.wall_s, 3), "storage_bytes": self.storage_bytes,
                **({"estimated_train_samples": self.estimated_samples}
                   if self.estimated_samples else {})}


class Metered:
    """The metering part of :class:`~fedunlearn.strategies.UnlearningStrategy`."""

    @property
    def meter(self) -> CostMeter:
        """The cost meter of the phase that is running."""
        if self._cost_phase not in self.costs:
            self.costs[self._cost_phase] = CostMeter(
                flops_per_sample=self.context.flops_per_sample,
                forward_flops_per_sample=self.context.forward_flops_per_sample)
        return self.costs[self._cost_phase]

    @property
    def cost(self) -> CostMeter:
        """Total over phases."""
        total = CostMeter(flops_per_sample=self.context.flops_per_sample,
                          forward_flops_per_sample=self.context.forward_flops_per_sample)
        for meter in self.costs.values():
            total.add(meter)
        return total

    def cost_dict(self) -> dict:
        """Totals plus ``phases``: one breakdown per phase, in the order they ran."""
        out = self.cost.as_dict()
        out["phases"] = {name: m.as_dict() for name, m in self.costs.items()}
        return out

    @contextmanager
    def cost_phase(self, name: str) -> Iterator[CostMeter]:
        """Meter everything inside under phase ``name`` (its wall time too)."""
        previous, self._cost_phase = self._cost_phase, name
        start = time.perf_counter()
        meter = self.meter
        try:
            yield meter
        finally:
            meter.wall_s += time.perf_counter() - start
            self._cost_phase = previous

    def meter_down(self, content: RecordDict) -> None:
        self.meter.bytes_down += sum(arrayrecord_nbytes(r)
                                     for r in records(content, ArrayRecord).values())
        self.meter.messages_down += 1

    def meter_up(self, msg: Message) -> None:
        """Bytes of every ArrayRecord of a reply, and the samples it processed."""
        if msg.has_error():
            return
        content = msg.content
        metric_records = records(content, MetricRecord).values()
        self.meter.bytes_up += sum(arrayrecord_nbytes(r)
                                   for r in records(content, ArrayRecord).values())
        self.meter.messages_up += 1
        epochs = self._asked_epochs.pop(int(msg.metadata.src_node_id), None)
        if epochs is not None and not any(
                SAMPLES_PROCESSED in m or FORWARD_SAMPLES in m
                for m in metric_records):
            # A reply that does not count its own work (the user's train handler): it
            # trained its num-examples for the local epochs it was asked to.
            n = next((m[NUM_EXAMPLES] for m in metric_records
                      if isinstance(m.get(NUM_EXAMPLES), int)), 0)
            self.meter.samples_processed += max(n, 0) * epochs
            self.meter.estimated_samples += max(n, 0) * epochs
        for metrics in metric_records:
            processed = metrics.get(SAMPLES_PROCESSED, 0)
            forward = metrics.get(FORWARD_SAMPLES, 0)
            self.meter.samples_processed += processed if isinstance(processed, int) else 0
            self.meter.forward_samples += forward if isinstance(forward, int) else 0


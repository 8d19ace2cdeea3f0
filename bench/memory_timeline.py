"""Where an in-process job's memory goes: its PSS at the round loop's points.

One ``fedunlearn-run`` job in this process (``synthetic`` data, 20 training samples per
client, the digits-sized CNN, ``--rounds`` pretraining rounds and one FT round, as
``bench/scale.py`` runs it), its proportional set size sampled every 50 ms and marked
when the grid is handed a delivery (``push``), when a round's replies reach the
strategy (``aggregate``) and when it has aggregated them. Prints the marks, the peak and
the mark it fell after, and the process's peak resident set (RSS: shared libraries
counted whole, so unlike PSS it does not move with what other processes map)::

    python bench/memory_timeline.py --clients 2000
    python bench/memory_timeline.py --clients 2000 --batch-clients 0   # per message

With ``--tracemalloc``, also the 15 lines that hold the most Python-allocated memory at
the second aggregation (slower; the PSS marks then include tracemalloc's own memory).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path


def pss_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Timeline:
    """PSS marks and the peak (with the mark it followed), sampled by a thread."""

    def __init__(self) -> None:
        self.start, self.label = time.time(), "start"
        self.marks: list[tuple[float, str, float]] = []
        self.peak, self.peak_label = 0.0, ""
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            value = pss_mb()
            if value > self.peak:
                self.peak, self.peak_label = value, self.label
            time.sleep(0.05)

    def mark(self, label: str) -> None:
        self.label = label
        self.marks.append((time.time() - self.start, label, pss_mb()))


def instrument(timeline: Timeline, snapshot: bool) -> None:
    """Mark the grid's deliveries and the strategies' aggregations."""
    from fedunlearn import engine
    from fedunlearn.strategies.base import UnlearningStrategy

    aggregate, push, seen = UnlearningStrategy.aggregate_train, engine.LocalGrid.push_messages, [0]

    def marked_aggregate(self, server_round, replies):
        replies = list(replies)
        timeline.mark(f"aggregate {self.phase} round {server_round} ({len(replies)} replies)")
        seen[0] += 1
        if snapshot and seen[0] == 2:
            print_snapshot()
        out = aggregate(self, server_round, replies)
        timeline.mark(f"aggregated {self.phase} round {server_round}")
        return out

    def marked_push(self, messages):
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        timeline.mark(f"push {len(messages)} {kind}")
        return push(self, messages)

    UnlearningStrategy.aggregate_train = marked_aggregate
    engine.LocalGrid.push_messages = marked_push


def print_snapshot() -> None:
    import tracemalloc

    for stat in tracemalloc.take_snapshot().statistics("lineno")[:15]:
        print(f"  {stat.size / 2**20:8.1f} MB {stat.count:9d} blocks  {stat.traceback}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2, help="pretraining rounds")
    p.add_argument("--batch-clients", type=int, default=32, help="0: per message")
    p.add_argument("--tracemalloc", action="store_true")
    args = p.parse_args()
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start()
    timeline = Timeline()
    import flwr  # noqa: F401
    import torch  # noqa: F401
    timeline.mark("import torch, flwr")
    from fedunlearn import launch
    timeline.mark("import fedunlearn")
    instrument(timeline, args.tracemalloc)
    n = args.clients
    with tempfile.TemporaryDirectory(prefix="fu-memory-") as tmp:
        rc = launch.main([
            "--engine", "local", "--batch-clients", str(args.batch_clients), "method=ft",
            "unlearn.rounds=1", f"pretrain.rounds={args.rounds}", "eval.every=100000",
            "dataset.name=synthetic", f"dataset.size={20 * n}", f"federation.num-clients={n}",
            f"output-dir={tmp}/out", f"checkpoint-dir={tmp}/ck", "eval.mia-max-members=200"])
    timeline.mark("end")
    print("\n  time (s)  PSS (MB)  point")
    for at, label, value in timeline.marks:
        print(f"  {at:8.1f}  {value:8.0f}  {label}")
    print(f"peak {timeline.peak:.0f} MB, after: {timeline.peak_label} (job exit {rc}); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

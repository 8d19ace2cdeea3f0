"""The harness builds each node's view once per run, however many nodes the run has:
a bound below the run's size rebuilt every view on every message (beyond 4,096 nodes,
about 0.2 ms and two train/validation splits per message at 10,000 nodes)."""

from __future__ import annotations

import fedunlearn.harness.node as harness_node
from fedunlearn.harness.node import harness_view

from .helpers import context, run_config


def test_a_run_larger_than_the_bound_keeps_every_nodes_view(monkeypatch):
    monkeypatch.setattr(harness_node, "MAX_VIEWS", 3)
    monkeypatch.setattr(harness_node, "_VIEWS", {})
    rc = run_config(**{"federation.num-clients": 8, "dataset.name": "synthetic"})
    first = [harness_view(context(p, rc)) for p in range(8)]
    again = [harness_view(context(p, rc)) for p in range(8)]
    assert all(a is b for a, b in zip(first, again))
    assert [v.partition_id for v in again] == list(range(8))
    # Another run's views replace these once the process holds a run's worth of them.
    other = run_config(**{"federation.num-clients": 8, "dataset.name": "synthetic",
                          "seed": 5})
    harness_view(context(0, other))
    assert len(harness_node._VIEWS) == 1
    assert harness_view(context(0, rc)) is not first[0]

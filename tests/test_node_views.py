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


def test_the_nodes_of_a_run_share_one_copy_of_its_run_config(monkeypatch):
    """Each node's context holds its own copy of the run-config; the views' keys hold one
    (at 10,000 nodes, one tuple of the run-config per node was 40 MB)."""
    monkeypatch.setattr(harness_node, "_VIEWS", {})
    rc = run_config(**{"federation.num-clients": 4, "dataset.name": "synthetic"})
    views = [harness_view(context(p, dict(rc))) for p in range(4)]
    assert [v.partition_id for v in views] == [0, 1, 2, 3]
    configs = {id(key[2]) for key in harness_node._VIEWS}
    assert len(harness_node._VIEWS) == 4 and len(configs) == 1

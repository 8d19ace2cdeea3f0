"""The plugin path's bound on a train reply's weight (:meth:`GuardedGrid.weight_cap`):
built once per exchange from one sort, it must give every node exactly the cap of the
definition, 10x the median of the other verified nodes' first reports, which the brute
force below computes the slow way (one sort per node)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedunlearn.federation import GuardedGrid
from fedunlearn.federation.guarded_grid import WEIGHT_CAP_FACTOR

from .helpers import incoming, reply_from


def brute_force_cap(sizes: dict[int, int], node: int) -> int | None:
    """The definition: sort the others' sizes, take their median (the mean of the two
    middle ones for an even count), no cap with fewer than two others."""
    others = sorted(s for n, s in sizes.items() if n != node)
    if len(others) < 2:
        return None
    median = others[len(others) // 2] if len(others) % 2 else \
        (others[len(others) // 2 - 1] + others[len(others) // 2]) / 2
    return max(1, int(WEIGHT_CAP_FACTOR * median))


def plugin_grid(sizes: dict[int, int], inner=None, strangers: dict[int, int] | None = None
                ) -> GuardedGrid:
    """A guarded grid on the plugin path (no data known): ``sizes`` the verified nodes'
    first reports, ``strangers`` reports of nodes outside the verified view."""
    grid = GuardedGrid(inner)
    grid.verify({node: p for p, node in enumerate(sorted(sizes))})
    grid.reports = {n: {"num-train": s} for n, s in {**(strangers or {}), **sizes}.items()}
    return grid


def random_sizes(rng: random.Random, count: int) -> dict[int, int]:
    """Sizes with many ties (a few distinct values) or spread out, odd and even counts."""
    top = rng.choice([1, 3, 5, 1000, 10**9])
    return {100 + i: rng.randint(0, top) for i in range(count)}


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 6, 7, 20, 101])
def test_every_nodes_cap_equals_the_brute_force_median_of_the_others(count):
    rng = random.Random(count)
    for _ in range(30):
        sizes = random_sizes(rng, count)
        strangers = {900 + i: rng.randint(0, 10**6) for i in range(rng.randint(0, 3))}
        grid = plugin_grid(sizes, strangers=strangers)
        # Verified nodes, a node that never reported, strangers (their reports not counted).
        for node in [*sizes, 555, *strangers]:
            assert grid.weight_cap(node) == brute_force_cap(sizes, node), (sizes, node)


def test_the_small_federations_and_ties_give_the_documented_caps():
    assert plugin_grid({1: 50}).weight_cap(1) is None  # one node: no others
    assert plugin_grid({1: 50, 2: 70}).weight_cap(1) is None  # one other: no cap
    assert plugin_grid({1: 50, 2: 70}).weight_cap(3) == WEIGHT_CAP_FACTOR * 60
    three = plugin_grid({1: 7, 2: 7, 3: 10**6})
    assert [three.weight_cap(n) for n in (1, 2, 3)] == [
        int(WEIGHT_CAP_FACTOR * (7 + 10**6) / 2)] * 2 + [WEIGHT_CAP_FACTOR * 7]
    assert plugin_grid({1: 0, 2: 0, 3: 0}).weight_cap(1) == 1  # never below one example
    assert plugin_grid({1: 3, 2: 4}).weight_cap(9) == int(WEIGHT_CAP_FACTOR * 3.5)


def test_the_cap_is_off_where_the_server_knows_the_data():
    grid = plugin_grid({1: 5, 2: 5, 3: 5})
    grid.verify(grid.verified, data=object())
    assert grid.weight_cap(1) is None


def model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))})


def train_sent(node: int) -> Message:
    return incoming(RecordDict({"arrays": model(), "config": ConfigRecord({"lr": 0.1})}),
                    "train", dst_node_id=node, src_node_id=0)


class ClaimingGrid:
    """Every node replies claiming its whole reported training set as its weight."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes

    def get_node_ids(self):
        return list(self.sizes)

    def send_and_receive(self, messages, timeout=None):
        return [reply_from(int(m.metadata.dst_node_id), RecordDict({
            "arrays": model(), "metrics": MetricRecord({
                "num-examples": self.sizes[int(m.metadata.dst_node_id)]})}),
            message_type="train") for m in messages]


def test_one_exchange_counts_each_reply_at_most_its_cap():
    rng = random.Random(0)
    sizes = {10 + i: rng.choice([16, 16, 20, 25, 1]) for i in range(300)}
    sizes.update({10: 10**6, 11: 10**5})  # two nodes that claim far more than the rest
    grid = plugin_grid(sizes, ClaimingGrid(sizes))
    out = list(grid.send_and_receive([train_sent(n) for n in sizes]))
    assert not any(m.has_error() for m in out)
    counted = {int(m.metadata.src_node_id): m.content["metrics"]["num-examples"] for m in out}
    expected = {n: min(s, brute_force_cap(sizes, n)) for n, s in sizes.items()}
    assert counted == expected
    assert counted[10] < sizes[10] and counted[11] < sizes[11]

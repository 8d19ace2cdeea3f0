"""Fuzz: hostile request and reply records through the server's parsing and validation.

Several hundred generated malformed records (wrong types, NaN/infinity, huge and
duplicated lists, unknown scopes and fields, missing keys, mismatched arrays) go through
exactly what the ServerApp runs on what nodes send: :func:`collect_valid_requests`
(query replies), :func:`check_partitions` (partition claims) and
:meth:`GuardedGrid.checked` (train and evaluate replies). No exception may escape, and
every record must be rejected with a reason that names the field. Pure parsing: no
Flower process, no training; it runs in seconds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.federation import (MALFORMED_REPLY, GuardedGrid, check_partitions,
                                   collect_valid_requests)
from fedunlearn.requests import NODE_RECORD, REQUEST_RECORD, UnlearningRequest
from fedunlearn.harness.data import federated_data

from .helpers import incoming, reply_from, run_config

NUM = 4
VERIFIED = {10 + p: p for p in range(NUM)}
INF, NAN = float("inf"), float("nan")


@pytest.fixture(scope="module")
def data():
    return federated_data(ExperimentConfig.from_run_config(run_config(
        **{"federation.num-clients": NUM})))


def query_reply(node: int, partition, request: dict | None) -> Message:
    content = RecordDict({NODE_RECORD: ConfigRecord({"partition-id": partition,
                                                     "num-partitions": NUM})})
    if request is not None:
        content[REQUEST_RECORD] = ConfigRecord(request)
    return reply_from(node, content)


# -- request records ----------------------------------------------------------------------
def bad_values(data) -> dict[str, list]:
    """Per field, values that must each make a request of node 10 (partition 0) invalid,
    whatever else the record holds. Only values a Flower ConfigRecord can carry."""
    own = int(data.train_indices(0)[0])
    other = int(data.train_indices(1)[0])
    return {
        "scope": ["", "everything", "CLIENT", "x" * 5000, 0, 1.5, True, b"client",
                  ["client"], NAN, "invalid\x00", "class "],
        "partition-id": [INF, -INF, NAN, 1.5, 0.0, -1, 2**62, "0", "abc", True, False, [0],
                         b"\x00", 1, 3, 9],
        "classes": [[INF], [NAN], [3.7], [True], "12", "3", [3, 3], [-1], [42], [1.0],
                    b"\x01", [2**50], [], list(range(20_000)), [10**30 % 2**62]],
        "sample-ids": ["12", [INF], [1.5], [True], [own, own], [-5], [10**15], [],
                       [other], list(range(200_000)), [own] * 1000, "0,1", b"\x00"],
        "inbox-ids": [["../../etc/passwd"], [""], ["a" * 100], [1], "abc", ["x", "x"],
                      [True], ["-leading"], ["ok"] * 65],
        "foo": [1, "x", [1, 2]],
        "error": ["boom", 0],
    }


def base_records(data) -> list[dict]:
    own = int(data.train_indices(0)[0])
    return [{"scope": "client", "partition-id": 0},
            {"scope": "class", "partition-id": 0, "classes": [3]},
            {"scope": "instance", "partition-id": 0, "sample-ids": [own]}]


def generated_requests(data, n: int, seed: int = 0) -> list[dict]:
    """``n`` records: a valid one with one to three fields replaced by bad values (and
    sometimes a required field removed)."""
    rng = random.Random(seed)
    pool = bad_values(data)
    fields = sorted(pool)
    out = []
    for _ in range(n):
        record = dict(rng.choice(base_records(data)))
        for field in rng.sample(fields, rng.randint(1, 3)):
            record[field] = rng.choice(pool[field])
        if rng.random() < 0.1:
            record.pop(rng.choice(["scope", "partition-id"]), None)
        out.append(record)
    return out


def valid_records_still_pass(data):
    accepted, rejected = collect_valid_requests(
        [query_reply(10, 0, r) for r in base_records(data)[:1]], data, verified=VERIFIED)
    assert list(accepted) == [10] and rejected == []


def test_fuzzed_request_records_are_all_rejected_with_a_reason(data):
    valid_records_still_pass(data)
    records = generated_requests(data, 300)
    # Every single-field corruption, too (a systematic sweep next to the random one).
    for field, values in bad_values(data).items():
        for value in values:
            for base in base_records(data):
                records.append({**base, field: value})
    assert len(records) >= 500
    fields = set(bad_values(data)) | {"scope", "partition-id", "request"}
    for record in records:
        reply = query_reply(10, 0, record)
        accepted, rejected = collect_valid_requests([reply], data, verified=VERIFIED)
        assert accepted == {}, f"accepted a malformed record: {record!r:.300}"
        assert len(rejected) == 1 and rejected[0]["node_id"] == 10
        reason = rejected[0]["reason"]
        assert reason and len(reason) < 1200, reason[:2000]
        names_field = any(f in reason for f in fields)
        names_check = any(k in reason for k in ("label set", "belongs to", "names no",
                                                 "forget set", "training split",
                                                 "could not build"))
        assert names_field or names_check, (record, reason)


def test_non_wire_values_are_rejected_by_the_parser():
    """Values a ConfigRecord cannot carry still never crash the parser."""
    for record in [None, [], "scope", {"scope": None, "partition-id": 0},
                   {"scope": "class", "partition-id": 0, "classes": [1, "a"]},
                   {"scope": "class", "partition-id": 0, "classes": {"a": 1}},
                   {"scope": "instance", "partition-id": 0, "sample-ids": [[1]]},
                   {"scope": "client", "partition-id": np.int64(0)},
                   {"scope": "client", "partition-id": 10**100}]:
        with pytest.raises(ValueError, match="malformed request record"):
            UnlearningRequest.from_config_record(record)


def test_the_million_copy_list_is_rejected_quickly(data):
    """A list of a million copies of one id: refused on its length before any scan,
    and never re-sent to the node."""
    import time

    own = int(data.train_indices(0)[0])
    reply = query_reply(10, 0, {"scope": "instance", "partition-id": 0,
                                "sample-ids": [own] * 1_000_000})
    start = time.perf_counter()
    accepted, rejected = collect_valid_requests([reply], data, verified=VERIFIED)
    assert time.perf_counter() - start < 2.0
    assert accepted == {} and "(1000000 items)" in rejected[0]["reason"]
    assert "at most 100000" in rejected[0]["reason"]


def test_fuzzed_partition_claims_never_crash_the_check(data):
    for value in [INF, NAN, 1.5, "0", True, [0], -1, 2**62, b"0", "", NAN]:
        honest = [query_reply(10 + p, p, None) for p in range(NUM)]
        # As an extra node, a malformed claim is left out and the job goes on ...
        assert check_partitions(honest + [query_reply(99, value, None)], NUM) == VERIFIED
        # ... as the only holder of a partition, the job stops with the reason.
        with pytest.raises(RuntimeError, match="partition-id="):
            check_partitions(honest[1:] + [query_reply(10, value, None)], NUM)
        # A request from a node whose claim is malformed is rejected, not raised.
        accepted, rejected = collect_valid_requests(
            [query_reply(10, value, {"scope": "client", "partition-id": 0})], data)
        assert accepted == {} and "malformed node record" in rejected[0]["reason"]
    # A node record that is not a ConfigRecord, or misses its field.
    odd = reply_from(12, RecordDict({NODE_RECORD: MetricRecord({"partition-id": 2})}))
    missing = reply_from(13, RecordDict({NODE_RECORD: ConfigRecord({"num-partitions": 4})}))
    with pytest.raises(RuntimeError, match="ConfigRecord.*partition-id is missing|"
                                           "partition-id is missing.*ConfigRecord"):
        check_partitions([query_reply(10, 0, None), query_reply(11, 1, None), odd, missing],
                         NUM)


# -- replies ------------------------------------------------------------------------------
def model_record() -> ArrayRecord:
    return ArrayRecord({"conv.weight": Array(np.ones((2, 3), dtype=np.float32)),
                        "conv.bias": Array(np.zeros(2, dtype=np.float32)),
                        "norm.steps": Array(np.array([4], dtype=np.int64))})


def train_sent(node: int) -> Message:
    return incoming(RecordDict({"arrays": model_record(),
                                "config": ConfigRecord({"lr": 0.1})}), "train",
                    dst_node_id=node, src_node_id=0)


def good_train_content() -> dict:
    return {"arrays": model_record(),
            "metrics": {"num-examples": 10, "train-loss": 0.5, "samples-processed": 10,
                        "forward-samples": 0}}


def train_reply(node: int, arrays, metrics, extra: dict | None = None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        content["metrics"] = metrics if isinstance(metrics, MetricRecord) else MetricRecord(metrics)
    for key, record in (extra or {}).items():
        content[key] = record
    return reply_from(node, content, message_type="train")


def bad_train_replies(node: int) -> list[tuple[str, Message]]:
    good = good_train_content()
    out = []
    for key, values in {"num-examples": [INF, NAN, 1.5, -1, 10**9, 2**64],
                        "train-loss": [INF, NAN, -INF],
                        "samples-processed": [-1, INF, 2.5],
                        "forward-samples": [-3, NAN]}.items():
        for value in values:
            metrics = dict(good["metrics"], **{key: value})
            out.append((key, train_reply(node, model_record(), metrics)))
    # Only the aggregation weight is required; other metrics must be finite numbers.
    metrics = {k: v for k, v in good["metrics"].items() if k != "num-examples"}
    out.append(("num-examples", train_reply(node, model_record(), metrics)))
    out.append(("metrics", train_reply(node, model_record(), dict(good["metrics"], extra=NAN))))
    out.append(("metrics", train_reply(node, model_record(),
                                       {f"m{i}": 1.0 for i in range(70)} | {"num-examples": 1})))
    out.append(("metric records", train_reply(node, model_record(), None)))
    out.append(("metric records", train_reply(node, model_record(), good["metrics"],
                                              {"more": MetricRecord({"x": 1})})))
    out.append(("array records", train_reply(node, None, good["metrics"])))
    out.append(("array records", train_reply(node, model_record(), good["metrics"],
                                             {"second": model_record()})))
    nan = model_record()
    nan["conv.weight"] = Array(np.full((2, 3), np.nan, dtype=np.float32))
    inf = model_record()
    inf["conv.bias"] = Array(np.array([INF, 0], dtype=np.float32))
    shape = model_record()
    shape["conv.weight"] = Array(np.ones((3, 2), dtype=np.float32))
    dtype = model_record()
    dtype["conv.weight"] = Array(np.ones((2, 3), dtype=np.float64))
    names = ArrayRecord({"other": Array(np.ones(1, dtype=np.float32))})
    order = ArrayRecord({k: model_record()[k] for k in ["conv.bias", "conv.weight",
                                                        "norm.steps"]})
    corrupt = model_record()
    broken = corrupt["conv.weight"]
    corrupt["conv.weight"] = Array(dtype=broken.dtype, shape=broken.shape, stype=broken.stype,
                                   data=b"\x93NUMPY garbage")
    for arrays in (nan, inf, shape, dtype, names, order, corrupt):
        out.append(("arrays", train_reply(node, arrays, good["metrics"])))
    return out


def evaluate_sent(node: int, config: dict) -> Message:
    return incoming(RecordDict({"arrays": model_record(), "config": ConfigRecord(config)}),
                    "evaluate", dst_node_id=node, src_node_id=0)


def bad_evaluate_metrics(data) -> list[tuple[str, dict]]:
    train = int(data.train_indices(0).size)
    good = {"num-examples": train, "retain-correct": train - 1, "retain-total": train,
            "forget-correct": 0, "forget-total": 0, "retain-features": [0.1, 0.2, 0.3] * 4}
    out = []
    for key in ("retain-correct", "retain-total", "forget-correct", "forget-total"):
        for value in (INF, NAN, -1, 1.5, 10**13):
            out.append((key, dict(good, **{key: value})))
        out.append((key, {k: v for k, v in good.items() if k != key}))
    out.append(("retain-correct", dict(good, **{"retain-correct": train + 1})))
    out.append(("retain-total", dict(good, **{"retain-total": train - 1,
                                              "retain-correct": 0})))
    out.append(("forget-total", dict(good, **{"forget-total": 5, "forget-correct": 0})))
    for features in ([0.1] * 7, [NAN, 0.1, 0.2], [INF] * 3, [0.1] * (3 * (train + 1)),
                     [0.5] * 3 * 250):
        out.append(("retain-features", dict(good, **{"retain-features": features})))
    out.append(("forget-features", dict(good, **{"forget-features": [0.1, 0.2, 0.3]})))
    out.append(("retain-features", dict(good, **{"retain-features": 0.5})))
    return out


def test_fuzzed_replies_are_failed_nodes_with_a_reason(data, server_identity):
    grid = GuardedGrid(grid=None)
    grid.verify(VERIFIED, data)
    checked = 0
    # Train replies, against the model that was sent; num-examples at most the node's
    # training split.
    sent = train_sent(10)
    good = good_train_content()
    ok = grid.checked(train_reply(10, model_record(), good["metrics"]), sent)
    assert not ok.has_error()
    for field, reply in bad_train_replies(10):
        result = grid.checked(reply, sent)
        assert result.has_error(), f"accepted a malformed train reply ({field})"
        assert result.error.code == MALFORMED_REPLY
        assert field in result.error.reason, (field, result.error.reason)
        assert result.metadata.src_node_id == 10
        checked += 1
    # Evaluate replies: counts exactly as the server derives them, features in threes.
    sent = evaluate_sent(10, {"max-members": 200})
    for field, metrics in bad_evaluate_metrics(data):
        reply = reply_from(10, RecordDict({"metrics": MetricRecord(metrics)}),
                           message_type="evaluate")
        result = grid.checked(reply, sent)
        assert result.has_error(), f"accepted a malformed evaluate reply ({field})"
        assert field in result.error.reason, (field, result.error.reason)
        checked += 1
    no_metrics = reply_from(10, RecordDict({"other": MetricRecord({"x": 1})}),
                            message_type="evaluate")
    assert "metrics is missing" in grid.checked(no_metrics, sent).error.reason
    # Any other evaluation (e.g. a validation split): counts and finite numbers.
    val = evaluate_sent(10, {"split": "val"})
    for metrics in ({"val-correct": 5, "val-total": 4}, {"val-correct": NAN, "val-total": 4},
                    {"val-correct": 1, "val-total": -4}, {"score": INF}, {"x": [1.0, NAN]}):
        reply = reply_from(10, RecordDict({"metrics": MetricRecord(metrics)}),
                           message_type="evaluate")
        assert grid.checked(reply, val).has_error(), metrics
        checked += 1
    assert not grid.checked(reply_from(10, RecordDict({"metrics": MetricRecord(
        {"num-examples": 4, "val-correct": 3, "val-total": 4})}), message_type="evaluate"),
        val).has_error()
    assert checked >= 60  # with the request records: several hundred in all


def test_replies_from_strangers_and_duplicates_are_dropped(data, server_identity):
    class Echo:  # not a LocalGrid: hostile replies (a duplicate, a stranger's), no ClientApp
        def get_node_ids(self):
            return [10, 11, 99]

        def send_and_receive(self, messages, timeout=None):
            replies = [train_reply(m.metadata.dst_node_id, model_record(),
                                   good_train_content()["metrics"]) for m in messages]
            return replies + replies[:1] + [train_reply(99, model_record(),
                                                        good_train_content()["metrics"])]

    grid = GuardedGrid(Echo())
    assert grid.get_node_ids() == [10, 11, 99]  # before the check: everything
    grid.verify(VERIFIED, data)
    assert grid.get_node_ids() == [10, 11]
    out = list(grid.send_and_receive([train_sent(10), train_sent(11), train_sent(99)]))
    assert sorted(m.metadata.src_node_id for m in out) == [10, 11]
    assert not any(m.has_error() for m in out)



def test_deployment_is_told_from_simulation_by_the_grid():
    """flwr 1.41: a deployment's ServerApp gets an ``HttpGrid`` (superlink/runtime/
    run_serverapp.py), the simulation engine an ``InMemoryGrid`` (simulation/
    run_simulation.py); a wrapped grid is looked through; a test double is a simulation."""
    from flwr.superlink.grid import HttpGrid, InMemoryGrid

    from fedunlearn.federation import is_deployment

    http, memory = HttpGrid.__new__(HttpGrid), InMemoryGrid.__new__(InMemoryGrid)
    assert is_deployment(http) and is_deployment(GuardedGrid(http))
    assert not is_deployment(memory) and not is_deployment(GuardedGrid(memory))
    assert not is_deployment(object())

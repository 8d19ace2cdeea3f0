"""Unlearning requests: every bad request is rejected with a reason naming the bad value,
good requests are accepted, and the rest of the federation is unaffected."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedunlearn.client import handle_query
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.requests import (NODE_RECORD, REQUEST_RECORD, UnlearningRequest,
                                 forget_indices, retained_indices,
                                 validate_request)
from fedunlearn.federation import collect_valid_requests
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.node import harness_view

from .helpers import context, incoming, reply_from, run_config

NUM = 4


@pytest.fixture(scope="module")
def data():
    return federated_data(ExperimentConfig.from_run_config(run_config(
        **{"federation.num-clients": NUM})))


def query_reply(node_id: int, partition_id: int, request: dict | None) -> object:
    content = RecordDict({NODE_RECORD: ConfigRecord({"partition-id": partition_id,
                                                     "num-partitions": NUM})})
    if request is not None:
        content[REQUEST_RECORD] = ConfigRecord(request)
    return reply_from(node_id, content)


def collect(data, requests: dict[int, dict | None]):
    """Node ``10+p`` holds partition ``p`` and sends ``requests[p]``."""
    replies = [query_reply(10 + p, p, requests.get(p)) for p in range(NUM)]
    return collect_valid_requests(replies, data)


def test_valid_requests_are_accepted_and_bound_to_sender(data):
    own = int(data.train_indices(2)[0])
    accepted, rejected = collect(data, {
        0: {"scope": "client", "partition-id": 0},
        1: {"scope": "class", "partition-id": 1, "classes": [3]},
        2: {"scope": "instance", "partition-id": 2, "sample-ids": [own]},
    })
    assert rejected == []
    assert sorted(accepted) == [10, 11, 12]
    assert accepted[11].classes == (3,) and accepted[11].node_id == 11
    assert accepted[12].sample_ids == (own,)


@pytest.mark.parametrize("request_record, expected", [
    ({"scope": "everything", "partition-id": 0}, "'everything'"),
    ({"scope": "class", "partition-id": 0, "classes": [12]}, "[12] outside the label set 0..9"),
    ({"scope": "class", "partition-id": 0, "classes": [-1]}, "[-1]"),
    ({"scope": "class", "partition-id": 0}, "names no classes"),
    ({"scope": "instance", "partition-id": 0}, "forget set is empty"),
    ({"scope": "client", "partition-id": 2}, "belongs to node 12"),
    ({"scope": "client", "partition-id": 9}, "no node of this federation"),
    ({"partition-id": 0}, "malformed request"),
    ({"scope": "invalid", "partition-id": 0, "error": "forget-classes='x': 'x' is not an integer"},
     "'x' is not an integer"),
])
def test_bad_request_rejected_with_reason_and_others_kept(data, caplog, request_record,
                                                          expected):
    caplog.set_level(logging.WARNING)
    accepted, rejected = collect(data, {0: request_record,
                                        1: {"scope": "client", "partition-id": 1}})
    assert list(accepted) == [11], "the valid request of another node must survive"
    assert len(rejected) == 1 and rejected[0]["node_id"] == 10
    assert expected in rejected[0]["reason"]
    assert "REJECTED" in caplog.text and expected in caplog.text


def test_sample_ids_outside_partition_rejected(data):
    other = data.train_indices(1)[:3].tolist()
    accepted, rejected = collect(data, {0: {"scope": "instance", "partition-id": 0,
                                            "sample-ids": other}})
    assert accepted == {}
    assert str(other[0]) in rejected[0]["reason"]
    assert "not in partition 0's training split" in rejected[0]["reason"]


def test_validation_samples_are_not_forgettable_training_samples(data):
    val = data.val_indices(0)[:1].tolist()
    _, rejected = collect(data, {0: {"scope": "instance", "partition-id": 0, "sample-ids": val}})
    assert "training split" in rejected[0]["reason"]


def test_empty_class_forget_set_rejected():
    labels = np.array([0, 0, 1, 1, 2, 2])
    req = UnlearningRequest("class", 0, classes=(2,), node_id=10)
    reason = validate_request(req, 0, {10: 0}, lambda p: np.array([0, 1, 2, 3]), labels, 3)
    assert reason is not None and "empty forget set" in reason and "[2]" in reason
    ok = UnlearningRequest("class", 0, classes=(1,), node_id=10)
    assert validate_request(ok, 0, {10: 0}, lambda p: np.array([0, 1, 2, 3]), labels, 3) is None


def test_forget_and_retained_partition_the_training_split(data):
    labels = np.asarray(data.train.targets)
    train = data.train_indices(0)
    req = UnlearningRequest("class", 0, classes=(1, 2))
    forget = forget_indices(req, train, labels)
    retained = retained_indices(req, train, labels)
    assert set(labels[forget]) <= {1, 2} and not set(labels[retained]) & {1, 2}
    assert sorted(np.concatenate([forget, retained]).tolist()) == sorted(train.tolist())
    assert forget_indices(UnlearningRequest("client", 0), train, labels).size == train.size


def test_client_answers_query_from_run_config_and_node_config():
    rc = run_config(**{"federation.num-clients": NUM, "forget.clients": "1",
                       "forget.scope": "class", "forget.classes": "3,5"})
    q = incoming(RecordDict(), "query.unlearn")
    reply = handle_query(q, context(0, rc), harness_view)
    assert REQUEST_RECORD not in reply.content
    assert reply.content[NODE_RECORD]["partition-id"] == 0
    reply = handle_query(q, context(1, rc), harness_view)
    assert reply.content[REQUEST_RECORD]["scope"] == "class"
    assert list(reply.content[REQUEST_RECORD]["classes"]) == [3, 5]
    # A SuperNode's node-config request wins over the run-config.
    reply = handle_query(q, context(2, rc, **{"forget-scope": "instance",
                                              "forget-fraction": 0.5}), harness_view)
    ids = list(reply.content[REQUEST_RECORD]["sample-ids"])
    data = federated_data(ExperimentConfig.from_run_config(rc))
    assert len(ids) == round(0.5 * data.train_indices(2).size)
    assert set(ids) <= set(data.train_indices(2).tolist())
    # A malformed node-config is reported, not crashed on.
    reply = handle_query(q, context(3, rc, **{"forget-scope": "class", "forget-classes": "x"}), harness_view)
    assert reply.content[REQUEST_RECORD]["scope"] == "invalid"
    assert "'x'" in reply.content[REQUEST_RECORD]["error"]


def test_partitions_must_be_held_by_exactly_one_node():
    from fedunlearn.federation import check_partitions

    replies = [query_reply(10 + p, p, None) for p in range(NUM)]
    assert check_partitions(replies, NUM) == {10: 0, 11: 1, 12: 2, 13: 3}
    with pytest.raises(RuntimeError, match=r"partition 0 is held by several nodes \[10, 20\]"):
        check_partitions(replies + [query_reply(20, 0, None)], NUM)
    with pytest.raises(RuntimeError, match=r"no node holds partition\(s\) \[3\]"):
        check_partitions(replies[:3], NUM)
    with pytest.raises(RuntimeError, match="holds partition 7, outside 0..3"):
        check_partitions(replies[:3] + [query_reply(13, 7, None)], NUM)


# -- the malformed records of a hostile or broken node ------------------------------------
@pytest.mark.parametrize("request_record, expected", [
    # Used to raise an uncaught OverflowError / ValueError in the ServerApp.
    ({"scope": "client", "partition-id": float("inf")}, "partition-id=inf (float)"),
    ({"scope": "class", "partition-id": 0, "classes": [float("inf")]}, "inf (float) is not"),
    ({"scope": "client", "partition-id": "zero"}, "partition-id='zero' (str)"),
    # Used to be changed silently: 3.7 -> class 3, True -> class 1, "12" -> ids [1, 2].
    ({"scope": "class", "partition-id": 0, "classes": [3.7]}, "3.7 (float) is not an integer"),
    ({"scope": "class", "partition-id": 0, "classes": [True]}, "True (bool) is not an integer"),
    ({"scope": "instance", "partition-id": 0, "sample-ids": "12"}, "sample-ids='12' (str)"),
    ({"scope": "class", "partition-id": 0, "classes": [3, 3]}, "3 is repeated"),
])
def test_malformed_records_are_rejected_not_crashed_or_converted(data, request_record,
                                                                 expected):
    accepted, rejected = collect(data, {0: request_record,
                                        1: {"scope": "client", "partition-id": 1}})
    assert list(accepted) == [11]
    assert expected in rejected[0]["reason"], rejected[0]["reason"]
    assert rejected[0]["reason"].startswith("malformed request record: ")


def test_a_million_copies_of_one_id_are_refused_and_never_sent_back(data):
    own = int(data.train_indices(0)[0])
    accepted, rejected = collect(data, {0: {"scope": "instance", "partition-id": 0,
                                            "sample-ids": [own] * 1_000_000}})
    assert accepted == {}
    assert "(1000000 items)" in rejected[0]["reason"]
    # A few repeated ids are refused too (they would be re-sent in every round).
    _, rejected = collect(data, {0: {"scope": "instance", "partition-id": 0,
                                     "sample-ids": [own, own]}})
    assert f"{own} is repeated" in rejected[0]["reason"]


def test_a_node_error_is_reported_shortened(data):
    accepted, rejected = collect(data, {0: {"scope": "invalid", "partition-id": 0,
                                            "error": "x" * 10_000}})
    assert accepted == {}
    assert rejected[0]["reason"].startswith("the node could not build its request: 'xxx")
    assert len(rejected[0]["reason"]) < 600


def test_evaluator_counts_a_malformed_evaluate_reply_as_a_failed_node(server_identity, caplog,
                                                                      local_grid):
    """The Evaluator's own parsing (here without the guarded grid): a reply without the
    expected metric keys and one whose features are not in threes are failed nodes; the
    measurement completes (a failed node makes Retain, Forget and MIA missing)."""
    import math

    from flwr.app import Message, MetricRecord
    from flower_apps.client_app import app

    from fedunlearn.client import NodeView
    from fedunlearn.harness.evaluation import Evaluator
    from fedunlearn.training import to_arrays

    from .helpers import NODE, NODE_ID, NUM, RC

    cfg = ExperimentConfig.from_run_config(RC)
    new_model = harness_view(context(0, RC)).new_model
    grid = local_grid(app, NUM, RC)
    deliver = grid.send_and_receive

    def tampered(messages, timeout=None):
        out = []
        for reply in deliver(messages, timeout=timeout):
            metrics = dict(reply.content["metrics"])
            if reply.metadata.src_node_id == NODE_ID[0]:
                metrics = {"num-examples": metrics["num-examples"]}
            if reply.metadata.src_node_id == NODE_ID[1]:
                metrics["retain-features"] = [0.5] * 4
            out.append(Message(RecordDict({"metrics": MetricRecord(metrics)}),
                               metadata=reply.metadata))
        return out

    grid.send_and_receive = tampered
    caplog.set_level(logging.WARNING)
    out = Evaluator(cfg, federated_data(cfg), new_model, "cpu").evaluate(
        grid, to_arrays(new_model()), {}, dict(NODE))
    assert 0 <= out["test"] <= 100
    assert math.isnan(out["retain"])
    assert f"node {NODE_ID[0]} is malformed" in caplog.text
    assert "retain-correct is missing" in caplog.text
    assert f"node {NODE_ID[1]} is malformed" in caplog.text and "multiple of 3" in caplog.text


def test_a_reason_stays_short_however_many_values_are_bad(data):
    """Classes 0..9999 on a 10-class data set: the reason names the first offending
    classes and how many more, on the server with data and from node reports alike."""
    from fedunlearn.federation import validate_reported
    from fedunlearn.requests import UnlearningRequest

    accepted, rejected = collect(data, {1: {"scope": "class", "partition-id": 1,
                                            "classes": list(range(10_000))}})
    (entry,) = rejected
    assert "[10, 11, 12, 13, 14, 15, 16, 17, 18, 19] (and 9980 more) outside" in entry["reason"]
    assert len(entry["reason"]) < 200
    reason = validate_reported(UnlearningRequest("class", 1, classes=tuple(range(10_000))), 1,
                               {"num-classes": 10, "num-train": 50, "num-forget": 5})
    assert reason == entry["reason"]

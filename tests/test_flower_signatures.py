"""Flower's own signatures on the plugin path: ``serve(evaluate_fn=...)`` takes the
``global_evaluate(server_round, arrays) -> MetricRecord`` a Flower user gives
``FedAvg.start`` (and the older ``(arrays) -> %`` form); ``Recovery`` takes FedAvg's
node selection; methods that need a model factory or server data refuse when built.

Run the way a user calls it, from the user's package that tests/test_plugin.py writes
outside fedunlearn."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import MetricRecord

from tests.test_plugin import USER_NODE, fedavg, user_grid, userapp  # noqa: F401  (fixtures)


def _quickstart_evaluate(task, calls=None):
    """Flower quickstart-pytorch's ``global_evaluate``: accuracy as a fraction."""
    testset = task.Blobs(64, seed=999)

    def global_evaluate(server_round: int, arrays) -> MetricRecord:
        if calls is not None:
            calls.append(server_round)
        net = task.Net()
        net.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": task.test(net, testset) / 100.0, "loss": 0.5})

    return global_evaluate, testset


def _class_request(tmp_path, node=1):
    from fedunlearn.inbox import Inbox

    inbox = Inbox(str(tmp_path / f"inbox-{node}"))
    return inbox, inbox.file(scope="class", classes=[2]).id


def _served(task, grid, tmp_path, name, method, **kwargs):
    """serve() on a fresh class-wise request of node 1 (its inbox: ``inbox-1``)."""
    from fedunlearn import serve

    _class_request(tmp_path)
    arrays = fedavg(grid, task, rounds=1)
    return serve(grid, arrays, method, output_dir=tmp_path / name, **kwargs)


def test_flowers_and_the_percent_evaluate_fn_both_give_the_test_column(userapp, tmp_path,
                                                                       user_grid):
    from fedunlearn import FineTune, Recovery, load_model

    client_app, task = userapp
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})
    rounds = []
    global_evaluate, testset = _quickstart_evaluate(task, rounds)

    def percent(arrays):
        net = task.Net()
        net.load_state_dict(arrays.to_torch_state_dict())
        return task.test(net, testset)

    for name, fn in (("flower", global_evaluate), ("percent", percent)):
        outcome = _served(task, grid, tmp_path, name, FineTune(Recovery(rounds=2, lr=0.05)),
                          evaluate_fn=fn)
        m = outcome.methods["ft"]
        assert m.status == "honoured" and not m.not_measured, m.not_measured
        net = task.Net()
        net.load_state_dict(load_model(m.model_path).to_torch_state_dict())
        expected = task.test(net, testset)  # % on the saved model
        assert m.metrics["test"] == pytest.approx(expected, abs=1e-9), name
        assert 0.0 < m.metrics["test"] <= 100.0
        row = outcome.table().splitlines()[1].split()
        assert float(row[2]) == pytest.approx(expected, abs=0.01)  # the table's test column
    # Flower's form was called on the input model (round 0: what a degraded recovery is
    # judged against) and with the rounds the method ran.
    assert rounds == [0, 2]


def test_a_raising_evaluate_fn_still_publishes_the_model_and_the_receipt(userapp, tmp_path,
                                                                         user_grid):
    from fedunlearn import FineTune, Recovery, load_model, serve
    from fedunlearn.audit import model_digest

    client_app, task = userapp
    inbox, request_id = _class_request(tmp_path)
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})

    def global_evaluate(server_round, arrays):
        raise FileNotFoundError("no test set at /data/test")

    outcome = serve(grid, fedavg(grid, task, rounds=1), FineTune(Recovery(rounds=1, lr=0.05)),
                    output_dir=tmp_path / "out", evaluate_fn=global_evaluate)
    m = outcome.methods["ft"]
    why = "evaluate_fn raised FileNotFoundError: no test set at /data/test"
    assert m.status == "honoured" and "test" not in m.metrics
    assert m.not_measured == {"test": why}
    assert model_digest(load_model(m.model_path)) == m.model_arrays_sha256
    assert outcome.table().splitlines()[1].split()[2] == "-"
    results = json.loads((tmp_path / "out" / "ft" / "results.json").read_text())
    assert results["not_measured"] == {"test": why}
    events = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text()
              .splitlines()]
    finished = [e for e in events if e["event"] == "unlearning.finished"]
    assert finished[0]["not_measured"] == {"test": why}
    assert any(e["event"] == "request.honoured" for e in events)
    receipt = inbox.events(request_id)[-1]
    assert receipt["status"] == "honoured" and f"test not measured: {why}" in receipt["reason"]


def test_an_evaluate_fn_without_a_usable_accuracy_is_reported_not_measured(userapp, tmp_path,
                                                                           user_grid):
    from fedunlearn import FineTune, Recovery

    client_app, task = userapp
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})
    cases = {
        "key": (lambda rnd, a: MetricRecord({"acc": 0.9}), {},
                "no 'accuracy' entry (it has ['acc']): name the accuracy entry with test_metric"),
        "percent": (lambda rnd, a: MetricRecord({"accuracy": 91.0}), {},
                    "accuracy=91.0 is not a fraction in [0, 1]"),
        "none": (lambda rnd, a: None, {}, "evaluate_fn returned None"),
        "named": (lambda rnd, a: MetricRecord({"acc": 0.25}), {"test_metric": "acc"}, ""),
    }
    for name, (fn, extra, why) in cases.items():
        outcome = _served(task, grid, tmp_path, name, FineTune(Recovery(rounds=1)),
                          evaluate_fn=fn, **extra)
        m = outcome.methods["ft"]
        assert m.status == "honoured", name
        if why:
            assert "test" not in m.metrics and why in m.not_measured["test"], name
        else:
            assert m.metrics["test"] == 25.0 and not m.not_measured


def test_an_evaluate_fn_of_another_signature_is_refused_before_any_request(userapp, tmp_path,
                                                                           user_grid):
    from fedunlearn import FineTune, Recovery, serve

    client_app, task = userapp
    inbox, request_id = _class_request(tmp_path)
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})
    arrays = fedavg(grid, task, rounds=1)

    def three(server_round, arrays, config):
        return MetricRecord({"accuracy": 1.0})

    refused = [
        (three, {}, TypeError, r"evaluate_fn\(server_round, arrays, config\) requires 3 "
                               r"positional argument\(s\); expected Flower's "
                               r"evaluate_fn\(server_round, arrays\) -> MetricRecord"),
        (lambda: 1.0, {}, TypeError, r"requires 0 positional.*evaluate_fn\(arrays\)"),
        (lambda *a: 1.0, {}, TypeError, "requires 0 positional"),
        ("accuracy", {}, TypeError, "evaluate_fn='accuracy' is not callable"),
        (lambda a: 90.0, {"test_metric": "acc"}, ValueError,
         "test_metric='acc' names an entry of the MetricRecord"),
        (None, {"test_metric": "acc"}, ValueError, "without an evaluate_fn"),
    ]
    for fn, extra, error, match in refused:
        with pytest.raises(error, match=match):
            serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "o",
                  evaluate_fn=fn, **extra)
    assert not (tmp_path / "o").exists()  # refused before anything was written or asked
    assert inbox.events(request_id) == []  # no verdict: the node was never asked


def _train_rounds(sent, before):
    """{server round: nodes sent a train message} after ``before``."""
    rounds: dict[int, list[int]] = {}
    for m in sent[before:]:
        if m.metadata.message_type.startswith("train"):
            rnd = int(m.content["config"]["server-round"])
            rounds.setdefault(rnd, []).append(int(m.metadata.dst_node_id))
    return rounds


def test_recovery_fraction_train_samples_half_the_nodes_that_may_train(userapp, tmp_path,
                                                                       user_grid):
    from fedunlearn import FineTune, Recovery

    client_app, task = userapp
    # node 1's request is class-wise: it keeps training, so 4 nodes may train
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})
    picks = []
    for run in range(2):
        before = len(grid.sent)
        outcome = _served(task, grid, tmp_path, f"half-{run}",
                          FineTune(Recovery(rounds=4, lr=0.05, fraction_train=0.5)))
        assert outcome.methods["ft"].status == "honoured", outcome.methods["ft"].reason
        rounds = _train_rounds(grid.sent, before + 4)  # after fedavg's 4 train messages
        assert sorted(rounds) == [1, 2, 3, 4]
        for nodes in rounds.values():
            assert len(nodes) == 2 == len(set(nodes)) and set(nodes) <= set(USER_NODE)
        picks.append(rounds)
    assert picks[0] == picks[1]  # drawn from the method's seed: the job repeats
    assert len({tuple(sorted(n)) for n in picks[0].values()}) > 1  # a new draw each round
    # The default: every node that may train, every round.
    before = len(grid.sent)
    _served(task, grid, tmp_path, "all", FineTune(Recovery(rounds=2, lr=0.05)))
    assert all(sorted(n) == sorted(USER_NODE) for n in _train_rounds(grid.sent, before + 4)
               .values())


def test_recovery_min_nodes_above_the_nodes_that_may_train_fail_the_method_by_name(
        userapp, tmp_path, user_grid):
    from fedunlearn import FineTune, Recovery, ServeError, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    Inbox(str(tmp_path / "inbox-0")).file(scope="client")  # 3 nodes left to train
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    with pytest.raises(ServeError, match="no method honoured") as raised:  # the only one
        serve(grid, fedavg(grid, task, rounds=1),
              FineTune(Recovery(rounds=1, min_available_nodes=4)), output_dir=tmp_path / "o")
    m = raised.value.outcome.methods["ft"]
    assert m.status == "failed"
    assert "needs at least 4 nodes" in m.reason and "only 3 may train" in m.reason


def test_node_selection_is_checked_and_has_one_place():
    from flwr.serverapp.strategy import FedAdam

    from fedunlearn import FineTune, Recovery

    for field, value, allowed in (("fraction_train", 0.0, r"must be in \(0, 1\]"),
                                  ("fraction_train", 1.5, r"must be in \(0, 1\]"),
                                  ("min_train_nodes", 0, r"must be in \[1, "),
                                  ("min_available_nodes", 2.0, "expected an integer")):
        with pytest.raises(ValueError, match=f"Recovery.{field}={value}.*{allowed}"):
            Recovery(**{field: value})
    with pytest.raises(ValueError, match=r"aggregation=FedAdam\(...\): the strategy you give "
                                         r"selects the nodes itself; give these to it"):
        FineTune(Recovery(fraction_train=0.5), aggregation=FedAdam())
    assert FineTune(Recovery(), aggregation=FedAdam(fraction_train=0.5)).aggregation


def test_methods_that_need_a_model_factory_or_server_data_refuse_when_built(userapp):
    from fedunlearn import (FUKD, PGD, SSD, FedEraser, FineTune, MoDE, NoT, PUF, Recovery,
                            Retrain, SalUn)

    _, task = userapp
    recovery = Recovery(rounds=1)
    for cls in (FedEraser, FUKD, PGD, NoT, Retrain, MoDE, SSD, SalUn):
        name = cls.__name__
        with pytest.raises(ValueError, match=rf"^{name} needs model_fn, .*: pass "
                                             rf"{name}\(\.\.\., model_fn=Net\)"):
            cls(recovery, server_data=task.Blobs(4, 0)) if cls is FUKD else cls(recovery)
    with pytest.raises(ValueError, match=r"FUKD needs server_data: .*not the test set it is "
                                         r"scored on.*FUKD\(\.\.\., server_data="):
        FUKD(recovery, model_fn=task.Net)
    # The history snippet's methods, built as docs/plugin.md shows them.
    FedEraser(recovery, params={"delta_t": 2}, model_fn=task.Net)
    FUKD(recovery, model_fn=task.Net, server_data=task.Blobs(4, 0))
    FineTune(recovery), PUF(recovery)  # no model factory needed
    with pytest.raises(ValueError, match=r"^NoT needs example_input, to trace the layers it "
                                         r"negates: pass NoT\(\.\.\., example_input=x\)"):
        NoT(recovery, model_fn=task.Net)


def test_the_service_takes_flowers_evaluate_fn_and_survives_its_crash(userapp, tmp_path,
                                                                      user_grid):
    from fedunlearn import FineTune, Recovery, ServiceConfig, UnlearningService, read_versions

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    global_evaluate, _ = _quickstart_evaluate(task)
    calls = []

    def flaky(server_round, arrays):
        calls.append(server_round)
        if server_round > 0:
            raise RuntimeError("test set unmounted")
        return global_evaluate(server_round, arrays)

    service = UnlearningService(FineTune(Recovery(rounds=1)), state_dir=tmp_path / "state",
                                config=ServiceConfig(rounds=2, lr=0.05), evaluate_fn=flaky)
    service.run(grid, arrays)
    versions = read_versions(tmp_path / "state")
    assert [v["kind"] for v in versions] == ["start", "final"] and calls == [0, 2]
    assert 0.0 < versions[0]["metrics"]["test"] <= 100.0 and "not_measured" not in versions[0]
    assert versions[-1]["metrics"] == {}
    assert versions[-1]["not_measured"] == {
        "test": "evaluate_fn raised RuntimeError: test set unmounted"}

"""Recovery on any Flower strategy: the user's FedAdam / FedMedian aggregates an
unlearning method's rounds, and the default (FedAvgM, server momentum 0.5) is
bit-identical to the recovery before strategies could be chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian

from fedunlearn import NoT, Recovery
from fedunlearn.audit import model_digest
from fedunlearn.engine import run_app
from tests.test_plugin import user_grid, userapp  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart-pytorch-unlearning"

#: The models the harness's default recovery produced on this job before the recovery's
#: strategy could be chosen (commit 626ba18, `fedunlearn.audit.model_digest`, first 16
#: hex digits): the default must keep producing them, bit for bit.
BEFORE = {"not": "3516d646d7b5064b", "ft": "7bb60a5918cb7169", "retrain": "383bbd8cf7513cf1"}


@pytest.fixture(autouse=True)
def one_thread():
    """Float sums depend on the thread count: the digests were taken on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_default_recovery_is_bit_identical_to_before(tmp_path):
    rc = {"method": "not,ft,retrain", "dataset.name": "synthetic",
          "federation.num-clients": 4, "pretrain.rounds": 2, "unlearn.rounds": 3,
          "output-dir": str(tmp_path / "out"), "checkpoint-dir": str(tmp_path / "ckpt"),
          "seed": 0}
    run_app(rc, 4)
    for method, digest in BEFORE.items():
        state = torch.load(tmp_path / "out" / method / "model.pt")
        assert model_digest(ArrayRecord(state))[:16] == digest, method


def example(tmp_path, strategy: str) -> dict:
    out = tmp_path / strategy
    torch.manual_seed(0)  # the user's app draws its initial model from the global generator
    run_app({"num-server-rounds": 2, "recovery-rounds": 5, "methods": "not,ft",
             "recovery-strategy": strategy, "output-dir": str(out),
             "inbox-root": str(out / "inboxes")}, 3, app=EXAMPLE, run_id=5)
    result = json.loads((out / "not" / "results.json").read_text())
    result["digest"] = model_digest(ArrayRecord(torch.load(result["model_path"])))
    return result


@pytest.fixture
def default_run(tmp_path_factory, one_thread):
    return example(tmp_path_factory.mktemp("default"), "fedavgm")


@pytest.mark.parametrize("strategy, name", [("fedadam", "FedAdam"), ("fedmedian", "FedMedian")])
def test_the_example_app_recovers_with_the_users_flower_strategy(tmp_path, default_run,
                                                                strategy, name):
    got = example(tmp_path, strategy)
    # 5 rounds from a 2-round model: NoT may also end degraded (serve() judges it; FT
    # keeps the run honoured); either way the recovery ran through the user's strategy.
    assert got["status"] in ("honoured", "degraded"), got["reason"]
    recovery = got["notes"]["recovery"]
    assert recovery["aggregation"] == name and recovery["rounds"] == 5
    assert "aggregation" not in default_run["notes"]["recovery"]
    assert got["digest"] != default_run["digest"]  # another server optimizer, another model
    assert 0 <= got["metrics"]["test"] <= 100


def test_a_strategy_that_waits_for_more_nodes_than_may_train_fails_by_name():
    from fedunlearn.strategies.aggregation import Aggregation, AggregationError

    agg = Aggregation.for_phase(FedAvg(min_available_nodes=5), 0.0)
    with pytest.raises(AggregationError, match="needs at least 5 nodes.*only 2"):
        agg.prepare(1, ArrayRecord(), __import__("flwr.app").app.ConfigRecord(), None, [1, 2])


def test_aggregation_must_be_a_flower_strategy():
    from fedunlearn import FineTune

    with pytest.raises(TypeError, match="aggregation=.*expected a Flower strategy"):
        FineTune(Recovery(), aggregation="fedadam")
    with pytest.raises(TypeError, match="aggregation=.*expected a Flower strategy"):
        FineTune(Recovery(), aggregation=FineTune())
    assert FineTune(Recovery(), aggregation=FedAdam()).aggregation is not None
    assert FineTune(Recovery(), aggregation=FedMedian()).fresh().aggregator is None


def test_start_returns_flowers_result_with_its_histories(userapp, user_grid):
    """``strategy.start(...)`` as a Flower user calls it: the Result carries the
    aggregated train metrics of every recovery round and the server-side evaluation of
    ``evaluate_fn(server_round, arrays)`` (round 0: the model recovery starts from)."""
    from flwr.app import MetricRecord

    from fedunlearn import FineTune, UnlearningContext
    from fedunlearn.requests import UnlearningRequest
    from tests.test_plugin import USER_NODE, fedavg

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    strategy = FineTune(Recovery(rounds=3, server_momentum=0.0, lr=0.05),
                        aggregation=FedAvg(min_train_nodes=1, min_available_nodes=1))
    target = USER_NODE[0]
    strategy.bind(UnlearningContext(
        requests={target: UnlearningRequest("client", 0, node_id=target)},
        node_partitions={n: p for p, n in enumerate(USER_NODE)}))
    seen = []

    def evaluate_fn(server_round, a):
        seen.append(server_round)
        return MetricRecord({"rounds-seen": server_round})

    result = strategy.start(grid, arrays, num_rounds=2, evaluate_fn=evaluate_fn)
    assert seen == [0, 1, 2]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert "train_loss" in result.train_metrics_clientapp[1]
    assert result.arrays is not None and set(result.arrays) == set(arrays)
    with pytest.raises(TypeError, match="returned dict; Flower's convention is a MetricRecord"):
        strategy.start(grid, arrays, num_rounds=1, evaluate_fn=lambda rnd, a: {"acc": 1.0})

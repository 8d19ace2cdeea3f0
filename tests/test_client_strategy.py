"""ClientApp handlers and the strategy's per-node configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import fedunlearn.client.actions.default as client_mod
from fedunlearn.client import NodeView, handle_evaluate, handle_train, request_to_config
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.metrics import arrayrecord_nbytes
from fedunlearn.requests import UnlearningRequest
from fedunlearn.strategies import UnlearningContext, list_methods
from fedunlearn.harness.methods import HarnessContext, create_method
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import context, incoming, reply_from, run_config

NUM = 4
RC = run_config(**{"federation.num-clients": NUM, "dataset.name": "synthetic"})


@pytest.fixture(scope="module")
def view():
    return harness_view(context(1, RC))


def train_message(arrays: ArrayRecord, request: UnlearningRequest | None):
    config = ConfigRecord({"lr": 0.01, "local-epochs": 1, "clip-norm": 0.0, "seed": 1})
    if request is not None:
        config.update(request_to_config(request))
    return incoming(RecordDict({"arrays": arrays, "config": config}), "train")


@pytest.mark.parametrize("request_", [
    UnlearningRequest("class", 1, classes=(3,)),
    UnlearningRequest("instance", 1, sample_ids=()),  # ids filled in below
])
def test_target_trains_on_retained_data_only(view, monkeypatch, request_):
    labels = view.labels()
    train = view.train_indices()
    if request_.scope == "instance":
        request_ = UnlearningRequest("instance", 1, sample_ids=tuple(train[::3].tolist()))
    seen: list[np.ndarray] = []
    real = client_mod.train_local

    def spy(model, dataset, indices, **kw):
        seen.append(np.asarray(indices))
        return real(model, dataset, indices, **kw)

    monkeypatch.setattr(client_mod, "train_local", spy)
    arrays = to_arrays(view.new_model())
    reply = handle_train(train_message(arrays, request_), context(1, RC), harness_view)
    used = seen[0]
    if request_.scope == "class":
        assert 3 not in set(labels[used].tolist())
        expected = train[labels[train] != 3]
    else:
        assert not set(used.tolist()) & set(request_.sample_ids)
        expected = np.setdiff1d(train, request_.sample_ids)
    assert sorted(used.tolist()) == sorted(expected.tolist())
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == expected.size
    assert metrics["samples-processed"] == expected.size  # one local epoch
    # A node without a request trains on its whole training split.
    seen.clear()
    handle_train(train_message(arrays, None), context(1, RC), harness_view)
    assert sorted(seen[0].tolist()) == sorted(train.tolist())


def test_evaluate_reports_retain_and_forget_counts(view):
    arrays = to_arrays(view.new_model())
    req = UnlearningRequest("class", 1, classes=(0, 1))
    config = ConfigRecord({"max-members": 5, **request_to_config(req)})
    reply = handle_evaluate(incoming(RecordDict({"arrays": arrays, "config": config}),
                                     "evaluate"), context(1, RC), harness_view)
    m = reply.content["metrics"]
    labels, train = view.labels(), view.train_indices()
    n_forget = int(np.isin(labels[train], [0, 1]).sum())
    assert m["forget-total"] == n_forget and m["retain-total"] == train.size - n_forget
    assert 0 <= m["retain-correct"] <= m["retain-total"]
    assert len(m["retain-features"]) == 5 * 3  # capped at max-members, 3 features each
    assert len(m["forget-features"]) == n_forget * 3


def make_context(requests: dict[int, UnlearningRequest]) -> HarnessContext:
    cfg = ExperimentConfig.from_run_config(RC)
    return HarnessContext(cfg=cfg, requests=requests)


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


def test_configure_train_excludes_client_wise_targets_and_echoes_requests(server_identity,
                                                                          app, local_grid):
    grid = local_grid(app, NUM, RC)
    n = grid.node_id  # partition -> node id
    requests = {n(1): UnlearningRequest("client", 1, node_id=n(1)),
                n(2): UnlearningRequest("class", 2, classes=(4,), node_id=n(2))}
    strategy = create_method("ft", make_context(requests))
    arrays = ArrayRecord({"w": torch.ones(10, 10)})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    dst = [m.metadata.dst_node_id for m in msgs]
    assert dst == sorted([n(0), n(2), n(3)])  # sorted by node id, without the target
    by_node = {m.metadata.dst_node_id: m.content["config"] for m in msgs}
    assert by_node[n(2)]["forget.scope"] == "class"
    assert list(by_node[n(2)]["forget.classes"]) == [4]
    assert "forget.scope" not in by_node[n(0)]
    assert strategy.cost.bytes_down == 3 * arrayrecord_nbytes(arrays)
    assert strategy.cost.rounds == 1
    # Replies add their real upload size and the samples they processed.
    replies = [reply_from(n, RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 10, "samples-processed": 20, "train-loss": 0.5,
         "forward-samples": 0})}), "train") for n in dst]
    agg, _ = strategy.aggregate_train(1, replies)
    assert agg is not None
    assert strategy.cost.bytes_up == 3 * arrayrecord_nbytes(arrays)
    assert strategy.cost.samples_processed == 60


def test_method_registry():
    assert {"retrain", "ft", "not"} <= set(list_methods())
    with pytest.raises(ValueError, match="'nope'.*choose from"):
        create_method("nope", make_context({}))


def test_retrain_starts_from_scratch_and_not_negates_first_layer():
    cfg = ExperimentConfig.from_run_config(RC)
    view = harness_view(context(0, RC))
    from fedunlearn.layers import example_input_for

    ctx = HarnessContext(cfg=cfg, model_factory=view.new_model,
                         example_input=example_input_for(1, 8))
    pretrained = to_arrays(view.new_model())
    state = pretrained.to_torch_state_dict()
    negated = create_method("not", ctx).unlearning_step(None, pretrained).to_torch_state_dict()
    first = [k for k in state if k.startswith("conv1.")]
    assert first == ["conv1.weight", "conv1.bias"]
    for k in state:
        if k in first:
            assert (negated[k] == -state[k]).all()
        else:
            assert (negated[k] == state[k]).all()
    fresh = create_method("retrain", ctx).initial_arrays(pretrained).to_torch_state_dict()
    assert not (fresh["conv1.weight"] == state["conv1.weight"]).all()
    assert create_method("retrain", ctx).recovery_phase().rounds == cfg.pretrain_rounds
    assert create_method("not", ctx).recovery_phase().rounds == cfg.unlearn_rounds


def test_server_gives_up_waiting_for_missing_nodes_with_a_hint(monkeypatch, app, local_grid):
    import fedunlearn.federation as federation

    from fedunlearn.federation import nodes as federation_nodes
    monkeypatch.setattr(federation_nodes, "NODE_STALL_S", 0.2)
    monkeypatch.setattr(federation_nodes.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match='only 2 of federation.num-clients=4.*num-supernodes=4'):
        federation.wait_for_nodes(local_grid(app, 2, RC), 4)
    grid = local_grid(app, 4, RC)
    assert federation.wait_for_nodes(grid, 4) == sorted(grid.get_node_ids())
    assert len(set(grid.get_node_ids())) == 4

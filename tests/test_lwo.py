"""``lwo``: the NoT paper's layer-wise-optimality check (negate and freeze the first layer,
re-initialise the rest, retrain), and its client action ``frozen``.

Through the real ClientApp on the in-process grid (the ``local_grid`` fixture), and one
whole job on the in-process engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedunlearn.client import NodeView
from fedunlearn.engine import local_run
from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.methods import create_method
from fedunlearn.training import random_model, to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import NODE, NODE_ID, NUM, RC, context, make_context, train_msg

SMALL_RC = {**RC, "pretrain.rounds": 2, "pretrain.lr": 0.05}
FIRST = ["conv1.weight", "conv1.bias"]


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


@pytest.fixture(scope="module")
def view():
    return harness_view(context(1, RC))


def _bytes(record, key) -> bytes:
    return record[key].numpy().tobytes()


def _pretrained(factory):
    """A stand-in for a trained model: another random draw, every floating tensor moved
    (a fresh norm's scale of ones included, as training would move it)."""
    model = random_model(factory, 12345)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
    return to_arrays(model)


# -- the method through the real client handlers ----------------------------------------
@pytest.mark.parametrize("scope", ["client", "class"])
def test_first_layer_negated_and_frozen_the_rest_reinitialised_and_trained(
        app, server_identity, single_thread, scope, local_grid):
    target = NODE_ID[0]
    request = (UnlearningRequest("client", 0, node_id=target) if scope == "client"
               else UnlearningRequest("class", 0, classes=(1,), node_id=target))
    strategy = create_method("lwo", make_context(SMALL_RC, {target: request}))
    pretrained = _pretrained(strategy.context.model_factory)

    # Round 0: the first layer negated, every other tensor a fresh model's (Retrain's).
    start = strategy.unlearning_step(None, pretrained)
    retrain_start = create_method("retrain", make_context(SMALL_RC, {target: request})
                                  ).initial_arrays(pretrained)
    for key in start:
        if key in FIRST:
            assert np.array_equal(start[key].numpy(), -pretrained[key].numpy())
        else:
            assert not np.array_equal(start[key].numpy(), pretrained[key].numpy()), key
            assert _bytes(start, key) == _bytes(retrain_start, key), key
    assert strategy.notes["frozen"] == FIRST

    # Retrain's budget, through train.frozen, the kept layer named in the config.
    grid = local_grid(app, NUM, SMALL_RC)
    final = strategy.unlearn(grid, pretrained)
    assert len(grid.sent) == 2 * (len(NODE) - (scope == "client"))  # pretrain.rounds = 2
    assert (target in {m.metadata.dst_node_id for m in grid.sent}) == (scope != "client")
    for msg in grid.sent:
        assert msg.metadata.message_type == "train.frozen"
        assert msg.content["config"]["frozen"] == "conv1.weight,conv1.bias"
        assert msg.content["config"]["lr"] == 0.05
    for reply in grid.replies:  # every client returned the kept layer untouched
        for key in FIRST:
            assert _bytes(reply.content["arrays"], key) == _bytes(start, key)
    # The end: the kept layer bit-identical to the negated one, the rest trained.
    for key in FIRST:
        assert _bytes(final, key) == (-torch.from_numpy(pretrained[key].numpy())
                                      ).numpy().tobytes()
    trained = [k for k in final if k not in FIRST
               and not np.array_equal(final[k].numpy(), start[k].numpy())]
    assert "fc2.weight" in trained and "conv2.weight" in trained
    assert strategy.notes["frozen_bit_identical"] is True
    assert strategy.cost_dict()["phases"]["training"]["rounds"] == 2


def test_a_reply_that_moved_the_frozen_layer_is_dropped(app, server_identity, single_thread):
    strategy = create_method("lwo", make_context(SMALL_RC, {}))
    start = strategy.unlearning_step(None, _pretrained(strategy.context.model_factory))
    # the plain train action trains every parameter: its reply is refused
    reply = app(train_msg({"arrays": start}, {"lr": 0.5}, "train"), context(1, RC))
    strategy.round_start = start
    assert "conv1.weight" in strategy.reply_problem(reply)
    reply = app(train_msg({"arrays": start}, {"lr": 0.5, "frozen": ",".join(FIRST)},
                          "train.frozen"), context(1, RC))
    assert strategy.reply_problem(reply) is None


# -- the client action -------------------------------------------------------------------
def test_frozen_action_leaves_the_named_parameters_out_of_training(app, view, monkeypatch,
                                                                   single_thread):
    seen = []
    real_sgd = torch.optim.SGD

    def spy(params, **kw):
        params = list(params)
        seen.append(params)
        return real_sgd(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    model = view.new_model()
    arrays = to_arrays(model)
    reply = app(train_msg({"arrays": arrays}, {"lr": 0.5, "weight-decay": 0.01,
                                                "frozen": "conv1.weight, fc2.bias"},
                          "train.frozen"), context(1, RC))
    out = reply.content["arrays"]
    for key in ("conv1.weight", "fc2.bias"):
        assert _bytes(out, key) == _bytes(arrays, key)
    for key in ("conv1.bias", "fc2.weight", "conv2.weight"):
        assert _bytes(out, key) != _bytes(arrays, key)
    n_params = len(list(model.parameters()))
    assert len(seen) == 1 and len(seen[0]) == n_params - 2  # frozen: not in the optimizer
    assert reply.content["metrics"]["num-examples"] == view.train_indices().size


@pytest.mark.parametrize("frozen, expected", [
    ("conv1.weight,nope.weight", r"unknown parameter\(s\) \['nope.weight'\]"),
    ("conv1", r"unknown parameter\(s\) \['conv1'\]"),
    (" , ", "names no parameter"),
    (None, "must carry 'frozen'"),
])
def test_frozen_action_refuses_unknown_names(app, view, frozen, expected):
    config = {"frozen": frozen} if frozen is not None else {}
    with pytest.raises(ValueError, match=expected):
        app(train_msg({"arrays": to_arrays(view.new_model())}, config, "train.frozen"),
            context(1, RC))


def test_frozen_action_refuses_to_freeze_everything(app, view):
    model = view.new_model()
    every = ",".join(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="freezes every parameter"):
        app(train_msg({"arrays": to_arrays(model)}, {"frozen": every}, "train.frozen"),
            context(1, RC))


# -- a whole job -------------------------------------------------------------------------
def test_a_job_writes_lwo_results_next_to_retrain(tmp_path):
    out = tmp_path / "out"
    rc = local_run({"method": "retrain,lwo", "dataset.name": "synthetic",
                    "federation.num-clients": 3, "pretrain.rounds": 2, "unlearn.rounds": 1,
                    "eval.mia-max-members": 40, "output-dir": str(out),
                    "checkpoint-dir": str(tmp_path / "ck")},
                   num_supernodes=3, log_file=tmp_path / "job.log", echo=False)
    assert rc == 0, (tmp_path / "job.log").read_text()[-2000:]
    lwo = json.loads((out / "lwo" / "results.json").read_text())
    retrain = json.loads((out / "retrain" / "results.json").read_text())
    assert set(lwo["unlearned"]) >= {"retain", "forget", "test", "mia"}
    assert lwo["notes"]["frozen"] == FIRST and lwo["notes"]["frozen_bit_identical"] is True
    assert lwo["notes"]["negated"] == FIRST
    # Retrain's budget: as many training rounds, as many bytes
    assert lwo["cost"]["phases"]["training"]["rounds"] == retrain["cost"]["rounds"] == 2
    assert lwo["cost"]["comm_bytes"] == retrain["cost"]["comm_bytes"]

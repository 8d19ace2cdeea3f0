"""MoDE: memory guidance action, momentum step, and its metered rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedunlearn.client import NodeView
from fedunlearn.client.actions import list_actions
from fedunlearn.launch import check_run_config
from fedunlearn.metrics import arrayrecord_nbytes
from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.methods import create_method
from fedunlearn.strategies.mode import momentum_degradation
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import NODE_ID, NUM, RC, bytes_of, context, make_context, train_msg


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


@pytest.fixture(scope="module")
def view():
    return harness_view(context(1, RC))


def test_guidance_action_is_registered(app):
    assert "mode_guidance" in list_actions()
    assert "train.mode_guidance" in app._registered_funcs


def test_mode_guidance_trains_forget_data_on_the_degradation_models_labels(
        app, view, monkeypatch, single_thread):
    import fedunlearn.client.actions.mode_guidance as guidance

    train = view.train_indices()
    request = UnlearningRequest("class", 1, classes=(0,))
    forget = train[view.labels()[train] == 0]
    torch.manual_seed(5)
    global_model, degradation = view.new_model(), view.new_model()
    batches = []
    real = guidance.train_local

    def spy(model, dataset, indices, *, transform, **kw):
        def recording(x, y, ids):
            x2, y2 = transform(x, y, ids)
            batches.append((x2, y2, ids))
            return x2, y2
        return real(model, dataset, indices, transform=recording, **kw)

    monkeypatch.setattr(guidance, "train_local", spy)
    reply = app(train_msg({"arrays": to_arrays(global_model),
                           "degradation": to_arrays(degradation)}, {"lr": 0.0005},
                          "train.mode_guidance", request), context(1, RC))
    m = reply.content["metrics"]
    assert m["num-examples"] == train.size  # retained (true labels) + forget (pseudo)
    assert m["forward-samples"] == forget.size  # one degradation forward per pseudo-label
    degradation.eval()
    for x, y, ids in batches:
        is_forget = torch.isin(ids, torch.as_tensor(forget))
        with torch.no_grad():
            expected = degradation(x[is_forget]).argmax(1)
        assert torch.equal(y[is_forget], expected)
        true = torch.as_tensor(view.labels()[ids[~is_forget].numpy()])
        assert torch.equal(y[~is_forget], true)
    with pytest.raises(ValueError, match="degradation"):
        app(train_msg({"arrays": to_arrays(global_model)}, {}, "train.mode_guidance",
                      request), context(1, RC))


def test_mode_momentum_step():
    theta = ArrayRecord({"w": Array(np.array([1.0, -1.0], dtype=np.float32)),
                         "n": Array(np.array([3], dtype=np.int64))})
    deg = ArrayRecord({"w": Array(np.array([0.0, 1.0], dtype=np.float32)),
                       "n": Array(np.array([0], dtype=np.int64))})
    out = momentum_degradation(theta, deg, 0.95)
    assert np.allclose(out["w"].numpy(), [0.95, -0.9])
    assert out["n"].numpy().tolist() == [3]
    assert np.allclose(momentum_degradation(theta, deg, 1.0)["w"].numpy(), [1.0, -1.0])


def test_mode_sends_two_models_and_meters_every_one(app, server_identity, single_thread,
                                                    local_grid):
    rc = {**RC, "method": "mode",
          "method-params": "mode.degradation_rounds=1 mode.guidance_rounds=2"}
    target = NODE_ID[0]
    request = UnlearningRequest("client", 0, node_id=target)
    strategy = create_method("mode", make_context(rc, {target: request}))
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    model_bytes = arrayrecord_nbytes(start)
    with strategy.cost_phase("unlearning"):
        strategy.unlearning_step(grid, start)
    meter = strategy.costs["unlearning"]
    # Round 1: theta_d to the 3 retained nodes and back; theta to all 4, theta_d too to
    # the target. Round 2: guidance only.
    types = [(m.metadata.dst_node_id, m.metadata.message_type, len(m.content.array_records))
             for m in grid.sent]
    assert types[:3] == [(n, "train", 1) for n in sorted(NODE_ID[1:])]  # by node id
    assert (target, "train.mode_guidance", 2) in types[3:7]
    assert len(grid.sent) == 3 + 4 + 4
    assert meter.bytes_down == bytes_of(grid.sent) == (3 + 4 + 1 + 4 + 1) * model_bytes
    assert meter.bytes_up == bytes_of(grid.replies) == (3 + 4 + 4) * model_bytes
    assert meter.messages_down == meter.messages_up == 11
    assert meter.rounds == 2
    assert meter.storage_bytes == model_bytes  # theta_d on the server
    forward = sum(int(r.content["metrics"]["forward-samples"]) for r in grid.replies)
    assert meter.forward_samples == forward > 0
    assert meter.flops == (meter.samples_processed * meter.flops_per_sample
                           + forward * meter.forward_flops_per_sample + meter.extra_flops)


@pytest.mark.parametrize("params, expected", [
    ("mode.guidance_rounds=2.5", "expected an integer"),
    ("mode.momentum=1.5", "momentum=1.5 must be in [0, 1]"),
    ("mode.degradation_rounds=11", "guidance_rounds=10 must be >= 1 and >= degradation_rounds=11"),
    ("mode.guidance_lr=0", "guidance_lr=0.0 must be > 0"),
])
def test_bad_mode_parameters_are_rejected_before_flower_starts(params, expected):
    with pytest.raises(ValueError) as err:
        check_run_config({"method": "mode", "method-params": params})
    assert expected in str(err.value)


@pytest.mark.parametrize("scope", ["class", "instance"])
def test_mode_serves_class_and_instance_requests(app, server_identity, single_thread, scope,
                                                 local_grid):
    """The target guides on its forget samples and trains its retained ones normally,
    and stays in recovery."""
    from .test_method_platform import request_of

    rc = {**RC, "method": "mode",
          "method-params": "mode.degradation_rounds=1 mode.guidance_rounds=1"}
    request = request_of(scope)
    target = NODE_ID[0]
    strategy = create_method("mode", make_context(rc, {target: request}))
    assert strategy.refusal({target: request}) is None
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    with strategy.cost_phase("unlearning"):
        strategy.unlearning_step(grid, start)
    by_node = {m.metadata.dst_node_id: m for m in grid.sent[4:]}  # the guidance round
    assert by_node[target].metadata.message_type == "train.mode_guidance"
    # Round 1's degradation training includes the target's retained data.
    assert target in [m.metadata.dst_node_id for m in grid.sent[:4]]
    guided = next(r for r in grid.replies if r.metadata.message_type == "train.mode_guidance")
    view = harness_view(context(0, RC))
    train = view.train_indices()
    forget = (int((view.labels()[train] == 1).sum()) if scope == "class"
              else len(request.sample_ids))
    assert guided.content["metrics"]["forward-samples"] == forget
    assert guided.content["metrics"]["num-examples"] == train.size
    assert target in strategy.participants(strategy.recovery_phase().role, grid)

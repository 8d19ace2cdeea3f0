"""The method platform: client actions, roles and phases, metering, parameters, discovery.

Methods run through the real ClientApp (``flower_apps.client_app.app``) behind a fake
grid, so each test takes milliseconds to seconds and no Flower process is started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

import fedunlearn.client.actions.pseudo_gradient as pg_mod
from fedunlearn.client import NodeView
from fedunlearn.client.actions import list_actions, message_type
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.launch import check_run_config, project_root
from fedunlearn.metrics import arrayrecord_nbytes
from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.results import comparison_markdown, comparison_text
from fedunlearn.strategies import get_method, list_methods
from fedunlearn.harness.methods import create_method, params_from
from fedunlearn.strategies.puf import negated_pseudo_gradient
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import (NODE, NODE_ID, NUM, RC, bytes_of, context, incoming, make_context,
                      train_msg)


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


@pytest.fixture(scope="module")
def view():
    return harness_view(context(1, RC))


# -- client actions ----------------------------------------------------------------------
def test_every_action_is_registered_with_the_client_app(app):
    assert {"default", "pseudo_gradient"} <= set(list_actions())
    for action in list_actions():
        assert f"train.{action}" in app._registered_funcs
    assert message_type("default") == "train"
    assert message_type("pseudo_gradient") == "train.pseudo_gradient"


def test_message_types_route_to_their_actions(app, view, monkeypatch, single_thread):
    train = view.train_indices()
    request = UnlearningRequest("class", 1, classes=(2,))
    forget = train[view.labels()[train] == 2]
    seen = {}
    real = pg_mod.train_local

    def spy(model, dataset, indices, **kw):
        seen["ids"] = np.asarray(indices)
        return real(model, dataset, indices, **kw)

    monkeypatch.setattr(pg_mod, "train_local", spy)
    arrays = to_arrays(view.new_model())
    reply = app(train_msg({"arrays": arrays}, {}, "train.pseudo_gradient", request),
                context(1, RC))
    assert sorted(seen["ids"].tolist()) == sorted(forget.tolist())  # forget data only
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == forget.size
    assert set(metrics) == {"num-examples", "train-loss", "samples-processed",
                            "forward-samples"}
    assert len(reply.content.array_records) == 1
    # The plain train type runs local training on the retained data.
    reply = app(train_msg({"arrays": arrays}, {}, "train", request), context(1, RC))
    assert reply.content["metrics"]["num-examples"] == train.size - forget.size
    with pytest.raises(ValueError, match="nope"):
        app(train_msg({"arrays": arrays}, {}, "train.nope"), context(1, RC))


def test_pseudo_gradient_refuses_a_node_without_a_request(app, view):
    with pytest.raises(ValueError, match="forget data"):
        app(train_msg({"arrays": to_arrays(view.new_model())}, {}, "train.pseudo_gradient"),
            context(1, RC))


# -- server-side arithmetic -------------------------------------------------------------
def test_puf_applies_the_negated_weighted_pseudo_gradient():
    theta = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32)),
                         "steps": Array(np.array([7], dtype=np.int64))})
    u1 = ArrayRecord({"w": Array(np.array([2.0, 2.0], dtype=np.float32)),
                      "steps": Array(np.array([9], dtype=np.int64))})
    u2 = ArrayRecord({"w": Array(np.array([1.0, 6.0], dtype=np.float32)),
                      "steps": Array(np.array([9], dtype=np.int64))})
    one = negated_pseudo_gradient(theta, [(u1, 10.0)], alpha=2.0)
    assert one["w"].numpy().tolist() == [-1.0, 2.0]  # 1 - 2*(2-1), 2 - 2*0
    # Two concurrent requests: Delta = (10*(1,0) + 30*(0,4)) / 40 = (0.25, 3).
    two = negated_pseudo_gradient(theta, [(u1, 10.0), (u2, 30.0)], alpha=2.0)
    assert np.allclose(two["w"].numpy(), [0.5, -4.0])
    assert two["w"].numpy().dtype == np.float32
    assert two["steps"].numpy().tolist() == [7]  # integer buffers are not moved


# -- whole methods through the in-process grid, metered ----------------------------------
def request_of(scope: str) -> UnlearningRequest:
    """Partition 0's request (node NODE_ID[0]) of each scope, on the synthetic federation."""
    if scope == "client":
        return UnlearningRequest("client", 0, node_id=NODE_ID[0])
    if scope == "class":
        return UnlearningRequest("class", 0, classes=(1,), node_id=NODE_ID[0])
    from fedunlearn.client import NodeView

    train = harness_view(context(0, RC)).train_indices()
    return UnlearningRequest("instance", 0, sample_ids=tuple(train[::4].tolist()),
                             node_id=NODE_ID[0])


@pytest.mark.parametrize("scope", ["client", "class", "instance"])
def test_puf_unlearning_step_is_metered_both_ways(app, server_identity, single_thread, scope,
                                                  local_grid):
    request = request_of(scope)
    target = NODE_ID[0]
    rc = {**RC, "method": "puf", "method-params": "puf.alpha=1.5"}
    strategy = create_method("puf", make_context(rc, {target: request}))
    assert strategy.params.alpha == 1.5
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    with strategy.cost_phase("unlearning"):
        out = strategy.unlearning_step(grid, start)
    assert [m.metadata.dst_node_id for m in grid.sent] == [target]  # the target only
    assert grid.sent[0].metadata.message_type == "train.pseudo_gradient"
    meter = strategy.costs["unlearning"]
    assert meter.bytes_down == bytes_of(grid.sent) == arrayrecord_nbytes(start)
    assert meter.bytes_up == bytes_of(grid.replies) == arrayrecord_nbytes(start)
    assert meter.rounds == 1
    samples = int(grid.replies[0].content["metrics"]["samples-processed"])
    assert meter.flops == samples * meter.flops_per_sample + meter.extra_flops
    # theta' = theta - 1.5 * (w_u - theta)
    w_u = grid.replies[0].content["arrays"]
    for key in start:
        expected = start[key].numpy() - 1.5 * (w_u[key].numpy() - start[key].numpy())
        assert np.allclose(out[key].numpy(), expected, atol=1e-6)
    # Recovery: client-wise targets drop out, class-wise targets stay in.
    recovery = strategy.participants(strategy.recovery_phase().role, grid)
    assert (target in recovery) == (scope != "client")
    # The pseudo-gradient is computed on the forget set only.
    forget = {"client": None, "class": None, "instance": len(request.sample_ids)}[scope]
    if forget is not None:
        assert grid.replies[0].content["metrics"]["num-examples"] == forget


def test_not_step_is_server_side_and_costs_break_down_by_phase(server_identity):
    strategy = create_method("not", make_context(RC, {10: UnlearningRequest("client", 0)}))
    with strategy.cost_phase("unlearning"):
        strategy.unlearning_step(None, to_arrays(strategy.context.model_factory()))
    costs = strategy.cost_dict()
    unl = costs["phases"]["unlearning"]
    assert unl["rounds"] == 0 and unl["comm_bytes"] == 0 and unl["server_flops"] > 0
    assert costs["flops"] == unl["flops"]


def test_fixed_aggregation_order_whatever_the_arrival_order(app, server_identity,
                                                            single_thread):
    strategy = create_method("ft", make_context(RC, {}))
    msgs = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, float(p) / 3,
                                                                           np.float32))}),
                                "metrics": MetricRecord({"num-examples": 1 + p,
                                                         "train-loss": 0.0,
                                                         "samples-processed": 1 + p,
                                                         "forward-samples": 0})}),
                    dst_node_id=n, message_type="train") for n, p in NODE.items()]
    replies = [incoming(m.content, "train", dst_node_id=0, src_node_id=m.metadata.dst_node_id)
               for m in msgs]
    a, _ = strategy.aggregate_train(1, replies)
    b, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert a["w"].numpy().tobytes() == b["w"].numpy().tobytes()


# -- parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    ({"method": "puf", "method-params": "puf.beta=1"}, "'puf' has no parameter 'beta'"),
    ({"method": "puf", "method-params": "puf.alpha=big"}, "puf.alpha='big': expected a number"),
    ({"method": "puf", "method-params": "puf.alpha=-1"}, "alpha=-1.0 must be > 0"),
    ({"method": "puf", "method-params": "puf.alpha=nan"}, "finite"),
    ({"method": "puf", "method-params": "puf.local_epochs=2.5"}, "expected an integer"),
    ({"method": "puf", "method-params": "puf.local_epochs=0"}, "local_epochs=0 must be >= 1"),
    ({"method": "not", "method-params": "puf.alpha=2"}, "does not run"),
    ({"method": "puf", "method-params": "puff.alpha=2"}, "'puff', which is unknown"),
    ({"method": "puf", "method-params": "alpha=2"}, "is not <method>.<key>=<value>"),
    ({"method": "puf", "method-params": "puf.alpha=2 puf.alpha=3"}, "given twice"),
])
def test_bad_method_parameters_are_rejected_before_flower_starts(overrides, expected):
    with pytest.raises(ValueError) as err:
        check_run_config(overrides)
    assert expected in str(err.value)


def test_every_methods_yaml_holds_its_parameter_defaults():
    conf = project_root() / "conf" / "method"
    for name in list_methods():
        path = conf / f"{name}.yaml"
        assert path.exists(), f"conf/method/{name}.yaml is missing"
        data = yaml.safe_load(path.read_text())
        assert data["name"] == name
        assert (data.get("params") or {}) == get_method(name).Params.defaults(), name


def test_hydra_method_params_reach_the_run_config():
    from fedunlearn.experiment.config import compose, to_run_config

    flat = to_run_config(compose(["method=puf", "method.params.alpha=3.5"]))
    assert "puf.alpha=3.5" in flat["method-params"].split()
    cfg = ExperimentConfig.from_run_config({**RC, **flat})
    assert params_from(get_method("puf"), cfg).alpha == 3.5


# -- refusal -----------------------------------------------------------------------------
def test_a_method_refuses_scopes_it_cannot_serve_and_the_table_says_so():
    strategy = create_method("ft", make_context(RC, {}))
    strategy.scopes = ("class", "instance")
    reason = strategy.refusal({10: UnlearningRequest("client", 0)})
    assert "cannot serve client-wise requests" in reason
    assert strategy.refusal({10: UnlearningRequest("class", 0, classes=(1,))}) is None
    text = comparison_text([], skipped={"ft": reason})
    assert "ft: refused (" in text and "ft: refused (" in comparison_markdown([], {"ft": reason})


# -- discovery ---------------------------------------------------------------------------
def test_a_dropped_in_strategy_file_and_action_module_are_registered(tmp_path):
    """Discovery alone: no edit of the ClientApp, the registries or any config.

    Works on a copy of the packages, so the source tree is never touched (other test
    runs may be importing it)."""
    import shutil

    import fedunlearn

    package = Path(fedunlearn.__file__).parent
    shutil.copytree(package, tmp_path / "fedunlearn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(project_root() / "flower_apps", tmp_path / "flower_apps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fedunlearn" / "strategies" / "dropped_in.py").write_text(textwrap.dedent('''
        from . import register_method
        from .finetune import FineTune

        @register_method("dropped_in")
        class DroppedIn(FineTune):
            """A method that exists only as this file."""
    '''))
    (tmp_path / "fedunlearn" / "client" / "actions" / "dropped_in_action.py").write_text(
        textwrap.dedent('''
        from . import ActionResult, register_action

        @register_action("dropped_in_action")
        def act(job):
            return ActionResult(job.model, 0)
    '''))
    code = ("import json, fedunlearn; from fedunlearn.strategies import list_methods; "
            "from flower_apps.client_app import app; "
            "print(json.dumps([fedunlearn.__file__, list_methods(), "
            "sorted(app._registered_funcs)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    where, methods, handlers = json.loads(out.strip().splitlines()[-1])
    assert Path(where).parent == tmp_path / "fedunlearn"  # the copy, not the source tree
    assert "dropped_in" in methods
    assert "train.dropped_in_action" in handlers

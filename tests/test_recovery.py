"""Recovery: the validation stopping rule, server momentum, and hostile train replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.methods import create_method
from fedunlearn.strategies.stopping import PLATEAU, TARGET_REACHED, StoppingRule
from fedunlearn.training import to_arrays

from .helpers import NODE_ID, NUM, RC, incoming, make_context


def feed(rule: StoppingRule, accuracies) -> tuple[int | None, str | None]:
    for rnd, acc in enumerate(accuracies, start=1):
        verdict = rule.update(rnd, acc)
        if verdict:
            return rnd, verdict
    return None, None


def test_stops_when_the_target_is_reached():
    assert feed(StoppingRule(target=94.0), [20, 60, 85, 93.9, 94.0, 99]) == (5, TARGET_REACHED)


def test_stops_on_a_plateau_after_patience_validations():
    rule = StoppingRule(target=95.0, patience=3, min_delta=0.5)
    # 80 is the best; +0.4 and +0.3 are below min_delta, so 3 rounds without improvement.
    assert feed(rule, [50, 80, 80.4, 80.3, 80.2]) == (5, PLATEAU)
    # An improvement resets the count.
    rule = StoppingRule(target=95.0, patience=2, min_delta=0.5)
    assert feed(rule, [50, 60, 60, 70, 70, 70]) == (6, PLATEAU)


def test_runs_to_the_maximum_while_improving():
    rule = StoppingRule(target=99.0, patience=2, min_delta=0.1)
    assert feed(rule, [10, 20, 30, 40, 50]) == (None, None)
    assert [r for r, _ in rule.history] == [1, 2, 3, 4, 5]


def test_nan_validations_count_as_no_improvement():
    rule = StoppingRule(target=90.0, patience=2)
    assert feed(rule, [50, math.nan, math.nan]) == (3, PLATEAU)


@pytest.mark.parametrize("bad", [{"patience": 0}, {"min_delta": -1}])
def test_bad_rule_settings(bad):
    with pytest.raises(ValueError):
        StoppingRule(target=1.0, **bad)


def test_validated_recovery_through_the_client_app(server_identity, single_thread, local_grid):
    """A real recovery with the rule on: validation goes only to retained nodes, is
    metered under its own phase, and results say why and when recovery stopped."""
    from flower_apps.client_app import app

    rc = {**RC, "unlearn.stop": "validation", "unlearn.rounds": 4, "unlearn.patience": 1,
          "unlearn.server-momentum": 0.5, "unlearn.target-gap": 0.0}
    target = NODE_ID[0]
    request = UnlearningRequest("client", 0, node_id=target)
    ctx = make_context(rc, {target: request})
    strategy = create_method("ft", ctx)
    ctx.original_arrays = to_arrays(ctx.model_factory())
    grid = local_grid(app, NUM, rc)
    arrays = strategy.unlearn(grid, ctx.original_arrays)
    assert set(arrays) == set(ctx.original_arrays)
    note = strategy.notes["recovery"]
    assert note["stopped"] in ("target reached", "plateau", "maximum")
    assert 1 <= note["rounds"] <= 4 and note["server_momentum"] == 0.5
    assert [r for r, _ in note["validation"]] == list(range(1, note["rounds"] + 1))
    validations = [m for m in grid.sent if m.metadata.message_type == "evaluate.unlearn"]
    assert {m.metadata.dst_node_id for m in validations} == set(NODE_ID[1:])  # not the target
    assert len(validations) == 3 * (note["rounds"] + 1)  # + the original, once
    meter = strategy.costs["validation"]
    model_bytes = sum(len(a.data) for a in ctx.original_arrays.values())
    assert meter.bytes_down == len(validations) * model_bytes and meter.bytes_up == 0
    assert strategy.costs["recovery"].rounds == note["rounds"]
    assert strategy.cost_dict()["phases"]["validation"]["comm_bytes"] == meter.comm_bytes


def test_malformed_train_replies_are_dropped_not_fatal(server_identity):
    strategy = create_method("ft", make_context(RC, {}))
    good = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    strategy.round_start = good
    ok = {"num-examples": 4, "train-loss": 0.1, "samples-processed": 4, "forward-samples": 0}

    def reply(node, arrays, metrics):
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if arrays is not None:
            content["arrays"] = arrays
        return incoming(content, "train", dst_node_id=0, src_node_id=node)

    replies = [
        reply(10, good, ok),
        reply(11, good, {"train_loss": 0.2}),                          # no num-examples
        reply(12, ArrayRecord({"w": Array(np.ones(5, np.float32))}), ok),  # wrong shape
        reply(13, good, {**ok, "num-examples": float("inf")}),           # not finite
        reply(10, ArrayRecord({"v": Array(np.ones(3, np.float32))}), ok),  # wrong keys
        reply(11, None, ok),                                              # no model
        reply(12, good, {**ok, "num-examples": 0}),                      # nothing to weigh
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), np.ones(3, np.float32))
    assert strategy.cost.messages_up == 1  # only the good reply was counted


def test_quickstart_metric_names_are_aggregated_with_fedunlearns(server_identity):
    """A plugin node's own train handler replies with Flower's quickstart metric names;
    fedunlearn's actions with their own. Both are aggregated in one round, weighted by
    num-examples."""
    strategy = create_method("ft", make_context(RC, {}))
    strategy.round_start = ArrayRecord({"w": Array(np.zeros(3, np.float32))})

    def reply(node, value, metrics):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                              "metrics": MetricRecord(metrics)})
        return incoming(content, "train", dst_node_id=0, src_node_id=node)

    replies = [reply(10, 1.0, {"train_loss": 0.3, "num-examples": 1}),
               reply(11, 4.0, {"num-examples": 3, "train-loss": 0.1, "samples-processed": 3,
                               "forward-samples": 0})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), (1.0 * 1 + 4.0 * 3) / 4)
    assert strategy.cost.messages_up == 2 and strategy.cost.samples_processed == 3


def test_a_round_without_usable_replies_fails_naming_node_and_key(server_identity):
    """No silent "model unchanged": the method raises, naming the node and the key."""
    from fedunlearn.strategies import UnlearningFailed

    class NoWeightGrid:  # not a LocalGrid: hand-made hostile replies, no ClientApp runs
        def get_node_ids(self):
            return NODE_ID[:2]

        def send_and_receive(self, messages, timeout=None):
            return [incoming(RecordDict({"arrays": m.content["arrays"],
                                         "metrics": MetricRecord({"train_loss": 0.1})}),
                             "train", dst_node_id=0, src_node_id=m.metadata.dst_node_id)
                    for m in messages]

    ctx = make_context(RC, {})
    strategy = create_method("ft", ctx)
    with pytest.raises(UnlearningFailed, match=rf"node {NODE_ID[0]}: .*num-examples"):
        strategy.unlearn(NoWeightGrid(), to_arrays(ctx.model_factory()))


def test_validated_recovery_preset_is_a_valid_run_config():
    from fedunlearn.harness.config import ExperimentConfig
    from fedunlearn.launch import check_run_config, load_preset

    rc = check_run_config({**load_preset("validated-recovery"),
                           "federation.partitioning": "dirichlet"})
    cfg = ExperimentConfig.from_run_config(rc)
    assert cfg.recovery_stop == "validation" and cfg.unlearn_server_momentum == 0.5
    assert cfg.recovery_target_gap == 0.5 and cfg.unlearn_rounds == 15
    assert cfg.unlearn_local_epochs == 3


def test_default_recovery_is_fedavgm_and_the_centralized_preset_keeps_plain_fine_tuning():
    """The recovery protocol a user gets without options (docs/recovery.md), and the
    centralized setting's fixed plain fine-tuning (Table 2), from the real run-config."""
    from fedunlearn.harness.config import ExperimentConfig
    from fedunlearn.launch import check_run_config, load_preset

    cfg = ExperimentConfig.from_run_config(check_run_config({}))
    assert (cfg.unlearn_rounds, cfg.unlearn_server_momentum) == (11, 0.5)
    assert (cfg.recovery_stop, cfg.unlearn_local_epochs, cfg.unlearn_lr) == ("fixed", 1, 0.01)
    central = ExperimentConfig.from_run_config(check_run_config(load_preset("centralized")))
    assert (central.num_clients, central.unlearn_rounds) == (1, 15)
    assert central.unlearn_server_momentum == 0.0


@pytest.mark.parametrize("key, value, expected", [
    ("unlearn.stop", "never", "unlearn.stop='never'"),
    ("unlearn.server-momentum", 1.0, "unlearn.server-momentum=1.0 must be in [0, 1)"),
    ("unlearn.patience", 0, "unlearn.patience=0 must be in [1, 100000]"),
    ("unlearn.target-gap", -1.0, "unlearn.target-gap=-1.0 must be in [0, 100)"),
])
def test_bad_recovery_settings_are_named(key, value, expected):
    from fedunlearn.launch import check_run_config

    with pytest.raises(ValueError) as err:
        check_run_config({key: value})
    assert expected in str(err.value)

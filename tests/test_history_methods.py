"""Methods that remember training: the training history, FedEraser, FUKD and PGD.

Everything runs through the real ClientApp on the in-process grid (the ``local_grid``
fixture: the synthetic 4-node federation of :mod:`tests.helpers`): milliseconds per method.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedunlearn.audit import model_digest
from fedunlearn.client import NodeView
from fedunlearn.client.actions.projected_ascent import project_to_ball, squared_distance
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.data.federated import build_federated_data, server_split
from fedunlearn.history import HistorySpec, check_bound, estimate_bytes, find_history
from fedunlearn.launch import check_run_config
from fedunlearn.harness.pretraining import pretrain
from fedunlearn.requests import UnlearningRequest
from fedunlearn.harness.methods import check_history_bound, create_method, history_spec
from fedunlearn.strategies.federaser import calibrate_update, weighted_sum
from fedunlearn.strategies.fukd import subtract_updates
from fedunlearn.strategies.pgd import ball_radius, reference_model
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view
from fedunlearn.harness.data import federated_data

from .helpers import GRID_RUN_ID, NODE, NODE_ID, NUM, RC, bytes_of, context, make_context

ALL = HistorySpec(updates_every=1, update_sums=True, last_local=True)


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


def rc_for(tmp_path, **extra) -> dict:
    return {**RC, "pretrain.rounds": 3, "checkpoint-dir": str(tmp_path / "ck"), **extra}


def pretrained(local_grid, app, rc, spec=ALL, run_id=GRID_RUN_ID, who=("federaser",)):
    """Pretrain on the in-process grid of run ``run_id`` (which fixes its node ids);
    return (arrays, info, context, grid)."""
    ctx = make_context(rc, {})
    grid = local_grid(app, NUM, rc, run_id=run_id)
    ctx.node_partitions = grid.partitions
    arrays, info = pretrain(grid, ctx, history=(spec, list(who)))
    return arrays, info, ctx, grid


def state_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


# -- the history -------------------------------------------------------------------------
def test_history_records_every_client_by_partition_and_reloads_under_new_node_ids(
        app, tmp_path, server_identity, single_thread, local_grid):
    rc = rc_for(tmp_path)
    arrays, info, ctx, grid = pretrained(local_grid, app, rc)
    history = ctx.history
    assert info["history"]["cached"] is False and history.rounds == 3
    manifest = json.loads((history.directory / "manifest.json").read_text())
    assert manifest["model_arrays_sha256"] == model_digest(arrays)
    assert sorted(manifest["files"]) == ["last_local.pt", "round-00001.pt", "round-00002.pt",
                                         "round-00003.pt", "update_sums.pt"]
    # Round 1 started from the initial model; each update is the reply's model minus it.
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    start = state_of(sent[0].content["arrays"])
    glob, updates, counts = history.round(1)
    assert set(updates) == set(NODE.values()) == set(counts)
    assert all(torch.equal(glob[k], start[k]) for k in start)
    replies = {NODE[int(m.metadata.src_node_id)]: m for m in grid.replies[:4]}
    sums = {pid: {k: torch.zeros_like(v) for k, v in start.items()} for pid in NODE.values()}
    for rnd in range(3):
        begin = state_of(sent[4 * rnd].content["arrays"])
        round_replies = grid.replies[4 * rnd:4 * rnd + 4]
        total = sum(int(r.content["metrics"]["num-examples"]) for r in round_replies)
        for r in round_replies:
            pid = NODE[int(r.metadata.src_node_id)]
            local = state_of(r.content["arrays"])
            for k in begin:
                sums[pid][k] += int(r.content["metrics"]["num-examples"]) / total * (
                    local[k] - begin[k])
            if rnd == 0:
                assert torch.allclose(updates[pid]["conv1.weight"],
                                      local["conv1.weight"] - begin["conv1.weight"])
    for pid, recorded in history.update_sums().items():
        for k in recorded:
            assert torch.allclose(recorded[k], sums[pid][k], atol=1e-6)
    last, weights = history.last_local()
    for r in grid.replies[8:12]:
        pid = NODE[int(r.metadata.src_node_id)]
        assert all(torch.equal(last[pid][k], v) for k, v in state_of(r.content["arrays"]).items())
    assert sum(weights.values()) == pytest.approx(1.0)
    assert replies  # every partition answered round 1

    # A later job whose nodes have new ids loads the model and the history as they are.
    again, info2, ctx2, grid2 = pretrained(local_grid, app, rc, run_id=GRID_RUN_ID + 1)
    assert set(grid2.partitions).isdisjoint(NODE)  # new node ids, the same partitions
    assert info2["cached"] and info2["history"]["cached"] and not grid2.sent
    assert ctx2.history.directory == history.directory
    assert model_digest(again) == model_digest(arrays)


def test_a_cached_model_without_history_is_pretrained_again_once_with_recording(
        app, tmp_path, server_identity, single_thread, caplog, local_grid):
    rc = rc_for(tmp_path)
    plain, info, _, grid = pretrained(local_grid, app, rc, spec=HistorySpec())
    assert "history" not in info and grid.sent
    caplog.set_level(logging.INFO)
    spec = HistorySpec(updates_every=2)
    again, info2, ctx2, grid2 = pretrained(local_grid, app, rc, spec=spec)
    assert "has no training history" in caplog.text and "federaser" in caplog.text
    assert not info2["cached"] and grid2.sent and ctx2.history.spec == spec
    assert ctx2.history.stored_rounds(2) == [1, 3]
    # Reproducible pretraining: the re-run writes the same model.
    assert model_digest(again) == model_digest(plain)
    third, info3, ctx3, grid3 = pretrained(local_grid, app, rc,
                                           spec=HistorySpec(updates_every=4))
    assert info3["cached"] and info3["history"]["cached"] and not grid3.sent  # 2 divides 4
    assert find_history(tmp_path / "ck", info["key"], HistorySpec(updates_every=3)) is None


def test_union_and_coverage_of_history_specs():
    a, b = HistorySpec(updates_every=2), HistorySpec(updates_every=3, last_local=True)
    assert a.union(b) == HistorySpec(updates_every=1, last_local=True)
    assert HistorySpec(updates_every=2).covers(HistorySpec(updates_every=4))
    assert not HistorySpec(updates_every=2).covers(HistorySpec(updates_every=3))
    assert not HistorySpec(update_sums=True).covers(HistorySpec(last_local=True))
    assert not HistorySpec()
    cfg = ExperimentConfig.from_run_config({**RC, "method": "retrain,federaser,pgd",
                                            "method-params": "federaser.delta_t=2"})
    spec, who = history_spec(cfg)
    assert spec == HistorySpec(updates_every=2, last_local=True) and who == ["federaser", "pgd"]


# -- the bound ---------------------------------------------------------------------------
def test_a_history_over_the_bound_is_refused_before_pretraining_with_the_estimate():
    with pytest.raises(ValueError) as err:
        check_run_config({"method": "federaser", "model.name": "resnet18",
                          "dataset.name": "cifar10", "pretrain.rounds": 100})
    text = str(err.value)
    # resnet18 (CIFAR stem): 44.7 MB of float weights; 100 rounds x (10 updates + 1 model).
    assert "49.2 GB" in text and "history.max-mb=2048" in text and "100 stored round" in text
    assert "44.7 MB per model" in text
    cfg = ExperimentConfig.from_run_config({**RC, "method": "federaser,pgd",
                                            "history.max-mb": 100})
    est = check_history_bound(cfg)
    assert est["total"] == est["updates"] + est["last_local"] > 0
    assert check_history_bound(ExperimentConfig.from_run_config(RC)) is None
    with pytest.raises(ValueError, match="over the bound history.max-mb=0.001"):
        check_bound(HistorySpec(last_local=True), 2000, 2, 5, 0.001)
    est = estimate_bytes(HistorySpec(updates_every=2, update_sums=True), 100, 10, 5)
    assert est == {"updates": 3 * 11 * 100, "update_sums": 1000, "total": 4300}


# -- server data -------------------------------------------------------------------------
def test_server_data_is_in_no_partition_and_changes_nothing_when_off():
    plain = build_federated_data("digits", 10, seed=0)
    assert plain.server_indices.size == 0
    data = build_federated_data("digits", 10, seed=0, server_fraction=0.1)
    server = set(data.server_indices.tolist())
    assert len(server) == round(0.1 * len(data.train.targets))
    held = [set(p.tolist()) for p in data.partitions]
    assert all(not (server & h) for h in held)
    assert set().union(*held) | server == set(range(len(data.train.targets)))
    skewed = build_federated_data("digits", 10, "dirichlet", alpha=0.3, seed=1,
                                  server_fraction=0.2)
    assert all(not (set(skewed.server_indices.tolist()) & set(p.tolist()))
               for p in skewed.partitions)
    pool, srv = server_split(100, 0.0, 10, 0)
    assert pool.tolist() == list(range(100)) and srv.size == 0
    with pytest.raises(ValueError, match="reserves no sample"):
        server_split(10, 0.01, 2, 0)
    cfg = ExperimentConfig.from_run_config({**RC, "server-data.fraction": 0.1})
    assert cfg.pretrain_key() != ExperimentConfig.from_run_config(RC).pretrain_key()


def test_fukd_without_server_data_is_refused_up_front_saying_how_to_enable_it():
    with pytest.raises(ValueError) as err:
        check_run_config({"method": "retrain,fukd"})
    assert "server-data.fraction=0.1" in str(err.value)
    check_run_config({"method": "retrain,fukd", "server-data.fraction": 0.1})
    with pytest.raises(ValueError, match=r"server-data.fraction=0.9 must be in \[0, 0.5\]"):
        check_run_config({"method": "fukd", "server-data.fraction": 0.9})


@pytest.mark.parametrize("method", ["federaser", "fukd", "pgd"])
def test_history_methods_refuse_class_and_instance_requests(method):
    strategy = create_method(method, make_context(RC, {}))
    reason = strategy.refusal({10: UnlearningRequest("class", 0, classes=(1,))})
    assert "cannot serve class-wise requests" in reason and "whole-client" in reason
    assert strategy.refusal({10: UnlearningRequest("client", 0)}) is None


# -- FedEraser ---------------------------------------------------------------------------
def test_federaser_calibration_takes_the_stored_length_and_the_fresh_direction():
    stored = {"conv.weight": torch.tensor([3.0, 4.0]), "fc.weight": torch.tensor([0.0, 2.0]),
              "bn.running_var": torch.tensor([9.0]), "bn.num_batches_tracked": torch.tensor(7)}
    fresh = {"conv.weight": torch.tensor([0.5, 0.0]), "fc.weight": torch.tensor([0.0, -1.0]),
             "bn.running_var": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(1)}
    keys = ["conv.weight", "fc.weight"]
    out = calibrate_update(stored, fresh, keys, "layer")
    assert set(out) == set(keys)  # buffers and integer counters are never rescaled
    assert torch.allclose(out["conv.weight"], torch.tensor([5.0, 0.0]))
    assert torch.allclose(out["fc.weight"], torch.tensor([0.0, -2.0]))
    whole = calibrate_update(stored, fresh, keys, "model")
    scale = (9 + 16 + 4) ** 0.5 / (0.25 + 1) ** 0.5
    assert torch.allclose(whole["conv.weight"], torch.tensor([0.5 * scale, 0.0]))
    zero = calibrate_update(stored, {**fresh, "fc.weight": torch.zeros(2)}, keys)
    assert torch.equal(zero["fc.weight"], torch.zeros(2))
    avg = weighted_sum({0: {"w": torch.tensor([1.0])}, 1: {"w": torch.tensor([4.0])}},
                       {0: 1.0, 1: 3.0, 2: 100.0}, ["w"])
    assert torch.allclose(avg["w"], torch.tensor([3.25]))  # partition 2 is not in updates


def test_federaser_replays_without_the_target_and_charges_the_files_it_read(
        app, tmp_path, server_identity, single_thread, local_grid):
    rc = rc_for(tmp_path, method="federaser",
                **{"method-params": "federaser.delta_t=1 federaser.calibration_ratio=1.0"})
    arrays, _, ctx, _ = pretrained(local_grid, app, rc, spec=HistorySpec(updates_every=1))
    ctx.requests = {NODE_ID[0]: UnlearningRequest("client", 0, node_id=NODE_ID[0])}
    strategy = create_method("federaser", ctx)
    grid = local_grid(app, NUM, rc)
    out = strategy.unlearn(grid, arrays)
    # Rounds 2 and 3 are calibrated on the 3 retained nodes; the target never hears.
    assert {int(m.metadata.dst_node_id) for m in grid.sent} == set(NODE_ID[1:])
    assert len(grid.sent) == 6 and strategy.cost.rounds == 2
    rounds = [f"round-0000{r}.pt" for r in (1, 2, 3)]
    files = sum((ctx.history.directory / f).stat().st_size for f in rounds)
    assert strategy.cost.storage_bytes == files
    assert strategy.notes["history"]["files_read"] == rounds
    assert strategy.costs["unlearning"].bytes_down == bytes_of(grid.sent)
    assert "recovery" not in strategy.costs or strategy.costs["recovery"].rounds == 0
    # The first replayed step is the retained clients' stored round-1 update, uncalibrated.
    glob, updates, counts = ctx.history.round(1)
    first = weighted_sum({p: updates[p] for p in (1, 2, 3)}, counts, ["conv1.weight"])
    sent_model = grid.sent[0].content["arrays"].to_torch_state_dict()
    assert torch.allclose(sent_model["conv1.weight"],
                          glob["conv1.weight"] + first["conv1.weight"], atol=1e-6)
    assert all(np.isfinite(a.numpy()).all() for a in out.values())


# -- FUKD --------------------------------------------------------------------------------
def test_fukd_subtraction_removes_exactly_the_targets_weighted_updates():
    theta = {"w": torch.tensor([1.0, 1.0]), "bn.running_mean": torch.tensor([5.0]),
             "n": torch.tensor(3)}
    sums = [{"w": torch.tensor([0.25, -0.5]), "bn.running_mean": torch.tensor([1.0])},
            {"w": torch.tensor([0.25, 0.0]), "bn.running_mean": torch.tensor([1.0])}]
    out = subtract_updates(theta, sums, ["w"])
    assert torch.allclose(out["w"], torch.tensor([0.5, 1.5]))
    assert out["bn.running_mean"].item() == 5.0 and out["n"].item() == 3  # not additive


def test_fukd_is_server_only_subtracts_the_recorded_sum_and_counts_distillation(
        app, tmp_path, server_identity, single_thread, local_grid):
    rc = rc_for(tmp_path, method="fukd", **{"server-data.fraction": 0.1,
                                            "method-params": "fukd.epochs=2"})
    arrays, _, ctx, _ = pretrained(local_grid, app, rc, spec=HistorySpec(update_sums=True),
                                   who=["fukd"])
    ctx.data = federated_data(ctx.cfg)
    assert ctx.data.server_indices.size == 80
    ctx.requests = {NODE_ID[0]: UnlearningRequest("client", 0, node_id=NODE_ID[0])}
    strategy = create_method("fukd", ctx)
    grid = local_grid(app, NUM, rc)
    with strategy.cost_phase("unlearning"):
        strategy.unlearning_step(grid, arrays)
    assert not grid.sent  # no client takes part
    meter = strategy.costs["unlearning"]
    seen = strategy.notes["distillation"]["samples_seen"]
    assert seen == 2 * 80
    numel = sum(p.numel() for p in ctx.model_factory().parameters())
    assert meter.extra_flops == numel + seen * (ctx.flops_per_sample
                                                + ctx.forward_flops_per_sample)
    assert meter.storage_bytes == (ctx.history.directory / "update_sums.pt").stat().st_size
    # Without distillation the step is the plain subtraction of partition 0's sum.
    rc0 = {**rc, "method-params": "fukd.epochs=0"}
    ctx.cfg = ExperimentConfig.from_run_config(rc0)
    bare = create_method("fukd", ctx)
    out = bare.unlearning_step(grid, arrays)
    expected = arrays.to_torch_state_dict()["fc2.weight"] - \
        ctx.history.update_sums()[0]["fc2.weight"]
    assert torch.allclose(out.to_torch_state_dict()["fc2.weight"], expected)


# -- PGD ---------------------------------------------------------------------------------
def test_pgd_projection_keeps_the_squared_distance_within_the_radius():
    gen = torch.Generator().manual_seed(0)
    reference = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    params = [r + 10 * torch.randn(r.shape, generator=gen) for r in reference]
    assert squared_distance(params, reference) > 2.0
    assert project_to_ball(params, reference, 2.0)
    assert squared_distance(params, reference) == pytest.approx(2.0, rel=1e-5)
    inside = [r + 0.01 for r in reference]
    before = [p.clone() for p in inside]
    assert not project_to_ball(inside, reference, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(inside, before))


def test_pgd_reference_model_removes_the_targets_weighted_last_models():
    glob = {"w": torch.tensor([0.6 * 1.0 + 0.4 * 3.0]), "n": torch.tensor(2)}
    last = {0: {"w": torch.tensor([3.0])}, 1: {"w": torch.tensor([1.0])}}
    ref = reference_model(glob, last, {0: 0.4, 1: 0.6}, [0], ["w"])
    assert torch.allclose(ref["w"], torch.tensor([1.0])) and ref["n"].item() == 2
    assert ball_radius({"w": torch.tensor([0.0])}, [{"w": torch.tensor([3.0])},
                                                    {"w": torch.tensor([0.0])}],
                       ["w"], 1 / 3) == pytest.approx(1.5)


def test_pgd_target_ascends_within_the_ball_and_storage_is_the_last_models_file(
        app, tmp_path, server_identity, single_thread, local_grid):
    rc = rc_for(tmp_path, method="pgd",
                **{"method-params": "pgd.epochs=2 pgd.distance_threshold=1000"})
    arrays, _, ctx, _ = pretrained(local_grid, app, rc, spec=HistorySpec(last_local=True),
                                   who=["pgd"])
    ctx.requests = {NODE_ID[0]: UnlearningRequest("client", 0, node_id=NODE_ID[0])}
    strategy = create_method("pgd", ctx)
    grid = local_grid(app, NUM, rc)
    with strategy.cost_phase("unlearning"):
        out = strategy.unlearning_step(grid, arrays)
    assert [(int(m.metadata.dst_node_id), m.metadata.message_type, len(m.content.array_records))
            for m in grid.sent] == [(NODE_ID[0], "train.projected_ascent", 2)]
    reference = grid.sent[0].content["arrays"].to_torch_state_dict()
    radius = strategy.notes["radius"]
    keys = [n for n, _ in ctx.model_factory().named_parameters()]
    got = out.to_torch_state_dict()
    d2 = sum(float((got[k] - reference[k]).double().pow(2).sum()) for k in keys)
    assert 0 < d2 <= radius * (1 + 1e-5)
    meter = strategy.costs["unlearning"]
    assert meter.bytes_down == bytes_of(grid.sent) and meter.bytes_up == bytes_of(grid.replies)
    assert meter.storage_bytes == (ctx.history.directory / "last_local.pt").stat().st_size
    view = harness_view(context(0, rc))
    assert meter.samples_processed == 2 * view.train_indices().size  # no early stop
    # A tight threshold stops after the first step.
    tight = create_method("pgd", ctx)
    tight.params = type(tight.params)(epochs=2, distance_threshold=1e-12)
    grid2 = local_grid(app, NUM, rc)
    with tight.cost_phase("unlearning"):
        tight.unlearning_step(grid2, arrays)
    assert tight.costs["unlearning"].samples_processed == rc["federation.batch-size"]
    assert to_arrays(ctx.model_factory())  # the factory still builds fresh models

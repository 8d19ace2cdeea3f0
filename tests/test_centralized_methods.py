"""The data holder's methods (RandL, GA, BadT, l1-sparse, SSD, SalUn): their client
actions on a tiny model and synthetic data, and the methods through the in-process grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fedunlearn.client.actions.random_label_finetune as randl_mod
import fedunlearn.client.actions.saliency_unlearning as salun_mod
from fedunlearn.client import NodeView
from fedunlearn.client.actions import list_actions
from fedunlearn.client.actions.bad_teacher import distillation_loss
from fedunlearn.client.actions.gradient_ascent import gradient_ascent_steps
from fedunlearn.client.actions.l1_sparse_finetune import l1_weight
from fedunlearn.client.actions.synaptic_dampening import dampen
from fedunlearn.client.local_steps import (RANDOM_MODEL_SEED_KEY, l1_norm, local_loader,
                                           params_to_config, random_labels)
from fedunlearn.launch import check_run_config, load_preset
from fedunlearn.metrics import arrayrecord_nbytes
from fedunlearn.requests import UnlearningRequest
from fedunlearn.strategies import get_method
from fedunlearn.harness.methods import create_method
from fedunlearn.training import load_arrays, to_arrays
from fedunlearn.harness.node import harness_view

from .helpers import NODE_ID, NUM, RC, RecordingGrid, bytes_of, context, make_context, train_msg

ACTIONS = {"randl": "random_label_finetune", "ga": "gradient_ascent", "badt": "bad_teacher",
           "l1_sparse": "l1_sparse_finetune", "ssd": "synaptic_dampening",
           "salun": "saliency_unlearning"}
NEEDS_RETAINED = ("randl", "badt", "l1_sparse", "ssd", "salun")
CLASS_REQUEST = UnlearningRequest("class", 1, classes=(3,))


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


@pytest.fixture(scope="module")
def view():
    return harness_view(context(1, RC))


def split(view, request=CLASS_REQUEST):
    from fedunlearn.client import split_local

    return split_local(view, request)


def run_action(app, view, method: str, request=CLASS_REQUEST, seed: int = 5, **overrides):
    """Run ``method``'s client action on partition 1 from a seeded model; return
    (start model, reply)."""
    params = get_method(method).Params.defaults()
    params.update(overrides)
    torch.manual_seed(seed)
    start = view.new_model()
    config = {**params_to_config(params), RANDOM_MODEL_SEED_KEY: 11}
    reply = app(train_msg({"arrays": to_arrays(start)}, config, f"train.{ACTIONS[method]}",
                          request), context(1, RC))
    return start, reply


def forget_loss(model, view, ids) -> float:
    model.eval()
    xs = torch.stack([view.dataset[int(i)][0] for i in ids])
    ys = torch.as_tensor(view.labels()[ids])
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(xs), ys))


# -- registration and refusal -----------------------------------------------------------
def test_every_action_is_registered(app):
    for action in ACTIONS.values():
        assert action in list_actions()
        assert f"train.{action}" in app._registered_funcs


@pytest.mark.parametrize("method", NEEDS_RETAINED)
def test_methods_needing_retained_data_refuse_client_wise_requests(method):
    strategy = create_method(method, make_context(RC, {}))
    reason = strategy.refusal({10: UnlearningRequest("client", 0)})
    assert "needs retained data at the data holder" in reason
    assert "client-wise request keeps none" in reason
    assert strategy.refusal({10: CLASS_REQUEST}) is None
    assert strategy.refusal({10: UnlearningRequest("instance", 0, sample_ids=(1, 2))}) is None
    # An instance-wise request covering all of a node's data leaves it nothing either.
    strategy.context.fully_forgotten = {10}
    assert "ask to forget all of their training data" in strategy.refusal(
        {10: UnlearningRequest("instance", 0, sample_ids=(1, 2))})


def test_ga_serves_client_wise_requests():
    strategy = create_method("ga", make_context(RC, {}))
    assert strategy.refusal({10: UnlearningRequest("client", 0)}) is None


@pytest.mark.parametrize("method", NEEDS_RETAINED)
def test_actions_needing_retained_data_fail_clearly_without_it(app, view, method):
    with pytest.raises(ValueError, match="needs retained data at the node"):
        run_action(app, view, method, request=UnlearningRequest("client", 1))


# -- each method through the in-process grid: one round at the target, metered -----------
@pytest.mark.parametrize("method, params", [
    ("randl", "randl.epochs=1"),
    ("ga", "ga.epochs=1 ga.loss_bound=3"),  # a fresh model's loss is near chance
    ("badt", ""),
    ("l1_sparse", "l1_sparse.epochs=2"),
    ("ssd", ""),
    ("salun", "salun.epochs=1"),
])
def test_unlearning_step_runs_the_action_at_the_target_only(app, server_identity,
                                                            single_thread, method, params,
                                                            local_grid):
    rc = {**RC, "method": method, "method-params": params}
    target = NODE_ID[0]
    request = UnlearningRequest("class", 0, classes=(3,), node_id=target)
    strategy = create_method(method, make_context(rc, {target: request}))
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    with strategy.cost_phase("unlearning"):
        out = strategy.unlearning_step(grid, start)
    assert [m.metadata.dst_node_id for m in grid.sent] == [target]
    assert grid.sent[0].metadata.message_type == f"train.{ACTIONS[method]}"
    config = grid.sent[0].content["config"]
    for key, value in strategy.params.as_dict().items():
        assert config[f"param.{key}"] == value
    meter = strategy.costs["unlearning"]
    assert meter.rounds == 1
    assert meter.bytes_down == bytes_of(grid.sent) == arrayrecord_nbytes(start)
    assert meter.bytes_up == bytes_of(grid.replies) == arrayrecord_nbytes(start)
    metrics = grid.replies[0].content["metrics"]
    assert meter.samples_processed == int(metrics["samples-processed"]) > 0
    assert meter.forward_samples == int(metrics["forward-samples"])
    # One target: the server keeps its model as it is.
    for key in out:
        assert np.array_equal(out[key].numpy(), grid.replies[0].content["arrays"][key].numpy())
        assert np.isfinite(out[key].numpy()).all()
    assert strategy.notes["target_action"] == ACTIONS[method]
    assert strategy.notes["targets_answered"] == 1
    assert (strategy.notes["target_temporary_bytes"] > 0) == (method in ("ga", "badt", "ssd",
                                                                         "salun"))
    # Recovery: the class-wise target stays in with its retained data.
    assert target in strategy.participants(strategy.recovery_phase().role, grid)


def test_several_targets_are_averaged_by_samples(app, server_identity, single_thread,
                                                 local_grid):
    rc = {**RC, "method": "ssd"}
    requests = {NODE_ID[p]: UnlearningRequest("class", p, classes=(3,), node_id=NODE_ID[p])
                for p in (0, 1)}
    strategy = create_method("ssd", make_context(rc, requests))
    grid = local_grid(app, NUM, rc)
    start = to_arrays(strategy.context.model_factory())
    out = strategy.unlearning_step(grid, start)
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == sorted(NODE_ID[:2])
    replies = {int(m.metadata.dst_node_id): r for m, r in zip(grid.sent, grid.replies)}
    weights = {n: int(r.content["metrics"]["num-examples"]) for n, r in replies.items()}
    key = next(iter(start))
    expected = sum(weights[n] * replies[n].content["arrays"][key].numpy() for n in replies)
    assert np.allclose(out[key].numpy(), expected / sum(weights.values()), atol=1e-6)


def test_a_target_that_does_not_answer_is_reported(app, server_identity, single_thread,
                                                   caplog):
    class Lossy(RecordingGrid):  # the in-process grid, partition 1's reply lost on the way
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)[::-1]  # send order
            return [r for m, r in zip(messages, replies) if m.metadata.dst_node_id != NODE_ID[1]]

    rc = {**RC, "method": "ssd"}
    requests = {NODE_ID[p]: UnlearningRequest("class", p, classes=(3,), node_id=NODE_ID[p])
                for p in (0, 1)}
    strategy = create_method("ssd", make_context(rc, requests))
    out = strategy.unlearning_step(Lossy(app, NUM, rc), to_arrays(
        strategy.context.model_factory()))
    assert strategy.notes["targets_asked"] == 2 and strategy.notes["targets_answered"] == 1
    assert f"target node(s) [{NODE_ID[1]}] returned no model" in caplog.text
    assert all(np.isfinite(a.numpy()).all() for a in out.values())


# -- RandL ---------------------------------------------------------------------------------
def test_randl_labels_differ_from_the_true_ones(app, view, monkeypatch, single_thread):
    retained, forget = split(view)
    batches = []
    real = randl_mod.train_local

    def spy(model, dataset, indices, *, transform, **kw):
        def recording(x, y, ids):
            x2, y2 = transform(x, y, ids)
            batches.append((y2, ids))
            return x2, y2
        return real(model, dataset, indices, transform=recording, **kw)

    monkeypatch.setattr(randl_mod, "train_local", spy)
    _, reply = run_action(app, view, "randl", epochs=2)
    assert reply.content["metrics"]["num-examples"] == retained.size + forget.size
    seen_forget = {}
    for y, ids in batches:
        true = torch.as_tensor(view.labels()[ids.numpy()])
        is_forget = torch.isin(ids, torch.as_tensor(forget))
        assert is_forget.any() and (~is_forget).any()  # shuffled together
        assert (y[is_forget] != true[is_forget]).all()  # every forget label is wrong
        assert torch.equal(y[~is_forget], true[~is_forget])  # retained labels are true
        for i, label in zip(ids[is_forget].tolist(), y[is_forget].tolist()):
            assert seen_forget.setdefault(i, label) == label  # relabelled once, kept
    assert set(seen_forget) == set(forget.tolist())
    assert len(set(seen_forget.values())) > 1  # random, not one constant label


def test_random_labels_with_and_without_the_true_label():
    labels = torch.arange(10).repeat(50)
    wrong = random_labels(labels, 10, torch.Generator().manual_seed(0), exclude_true=True)
    assert (wrong != labels).all() and wrong.min() >= 0 and wrong.max() <= 9
    anyl = random_labels(labels, 10, torch.Generator().manual_seed(0), exclude_true=False)
    assert (anyl == labels).any() and len(anyl.unique()) == 10


# -- GA ------------------------------------------------------------------------------------
def test_ga_raises_the_forget_loss(app, view, single_thread):
    """From a model that fits the node's data, with the default parameters."""
    from fedunlearn.training import train_local

    _, forget = split(view)
    torch.manual_seed(5)
    start = view.new_model()
    train_local(start, view.dataset, view.train_indices(), epochs=15, batch_size=32,
                lr=0.05, momentum=0.9, device=torch.device("cpu"), seed=0)
    before = forget_loss(start, view, forget)
    assert before < 0.5 * math.log(10)  # below the stop rule's bound: ascent runs
    config = {**params_to_config(get_method("ga").Params.defaults()), RANDOM_MODEL_SEED_KEY: 1}
    reply = app(train_msg({"arrays": to_arrays(start)}, config, "train.gradient_ascent",
                          CLASS_REQUEST), context(1, RC))
    after_model = load_arrays(view.new_model(), reply.content["arrays"])
    after = forget_loss(after_model, view, forget)
    assert after > before
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == forget.size
    assert metrics["samples-processed"] > 0


def tiny_batches(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16)) for i in range(0, n, 16)]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_ga_stops_at_its_step_budget_and_its_loss_bound():
    batches = tiny_batches()
    model = tiny_model()
    out = gradient_ascent_steps(model, batches, epochs=10, lr=0.01, momentum=0.9,
                                max_steps=3, loss_bound=1e9, clip_norm=0.0,
                                device=torch.device("cpu"))
    assert out["steps"] == 3 and out["stop"] == "max_steps" and out["trained"] == 48
    # A bound below the current loss: not a single step, the model is unchanged.
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = gradient_ascent_steps(model, batches, epochs=10, lr=0.01, momentum=0.9,
                                max_steps=100, loss_bound=1e-6, clip_norm=0.0,
                                device=torch.device("cpu"))
    assert out["steps"] == 0 and out["stop"] == "loss_bound" and out["measured"] == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # With a bound, ascent stops once a batch's loss is past it.
    model = tiny_model()
    out = gradient_ascent_steps(model, batches, epochs=200, lr=0.5, momentum=0.9,
                                max_steps=10_000, loss_bound=math.log(2), clip_norm=0.0,
                                device=torch.device("cpu"))
    assert out["stop"] == "loss_bound" and out["steps"] < 10_000


def test_ga_never_returns_non_finite_weights():
    model = tiny_model()
    out = gradient_ascent_steps(model, tiny_batches(), epochs=50, lr=1e38, momentum=0.9,
                                max_steps=1000, loss_bound=1e30, clip_norm=0.0,
                                device=torch.device("cpu"))
    assert out["stop"].startswith("non-finite")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


# -- BadT ----------------------------------------------------------------------------------
def test_badt_distils_forget_data_from_the_random_teacher(app, view, single_thread):
    retained, forget = split(view)
    start, reply = run_action(app, view, "badt", epochs=2)
    m = reply.content["metrics"]
    k = round(0.3 * retained.size)
    assert m["num-examples"] == forget.size + k
    assert m["samples-processed"] == 2 * (forget.size + k)
    assert m["forward-samples"] == m["samples-processed"]  # one teacher pass per sample
    after = reply.content["arrays"]
    assert any(not np.array_equal(after[k2].numpy(), v.numpy())
               for k2, v in to_arrays(start).items())


def test_distillation_loss_is_kl_div_with_the_references_mean():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    with pytest.warns(UserWarning):
        expected = nn.functional.kl_div(nn.functional.log_softmax(s, 1),
                                        nn.functional.softmax(t, 1), reduction="mean")
    assert torch.allclose(distillation_loss(s, t, 1.0), expected)
    assert float(distillation_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)


# -- l1-sparse -----------------------------------------------------------------------------
def test_l1_penalty_lowers_the_weights_l1_norm(app, view, single_thread):
    start, plain = run_action(app, view, "l1_sparse", epochs=2, alpha=0.0, weight_decay=0.0)
    _, sparse = run_action(app, view, "l1_sparse", epochs=2, alpha=0.05, weight_decay=0.0)
    with torch.no_grad():
        norm = {name: float(l1_norm(load_arrays(view.new_model(), r.content["arrays"])))
                for name, r in (("plain", plain), ("sparse", sparse))}
        assert norm["sparse"] < norm["plain"]
        assert norm["sparse"] < float(l1_norm(start))
    retained, _ = split(view)
    assert sparse.content["metrics"]["num-examples"] == retained.size


def test_l1_coefficient_decays_linearly_to_zero():
    assert [l1_weight(1.0, e, 4, 0) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [l1_weight(1.0, e, 4, 2) for e in range(4)] == [1.0, 0.5, 0.0, 0.0]


# -- SSD -----------------------------------------------------------------------------------
def test_ssd_dampens_only_parameters_above_its_threshold():
    params = [torch.tensor([1.0, 2.0, -3.0, 4.0]), torch.tensor([[5.0, -6.0]])]
    full = [torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([[2.0, 2.0]])]
    forget = [torch.tensor([5.0, 20.0, 40.0, 0.0]), torch.tensor([[20.0, 21.0]])]
    count = dampen(params, full, forget, alpha=10.0, dampening=1.0)
    # Selected where forget > 10 * full: entries 1, 2 of the first, entry 1 of the second.
    assert count == 3
    assert torch.allclose(params[0], torch.tensor([1.0, 2.0 * 1 / 20, -3.0 * 1 / 40, 4.0]))
    assert torch.allclose(params[1], torch.tensor([[5.0, -6.0 * 2 / 21]]))
    assert params[0][0] == 1.0 and params[0][3] == 4.0 and params[1][0, 0] == 5.0  # exact
    # beta never exceeds 1: a large lambda leaves selected weights as they are.
    p = [torch.tensor([2.0])]
    assert dampen(p, [torch.tensor([1.0])], [torch.tensor([50.0])], 10.0, 100.0) == 1
    assert p[0].tolist() == [2.0]


def test_ssd_action_changes_weights_only_by_shrinking(app, view, single_thread):
    start, reply = run_action(app, view, "ssd")
    retained, forget = split(view)
    m = reply.content["metrics"]
    assert m["samples-processed"] == retained.size + 2 * forget.size  # D, then D_u
    before = to_arrays(start)
    for key, arr in reply.content["arrays"].items():
        b, a = before[key].numpy(), arr.numpy()
        changed = a != b
        assert (np.abs(a[changed]) < np.abs(b[changed])).all()
        assert (np.sign(a[changed]) == np.sign(b[changed])).all()


# -- SalUn ---------------------------------------------------------------------------------
def test_salun_updates_only_masked_weights(app, view, monkeypatch, single_thread):
    masks = {}
    real = salun_mod.saliency_mask

    def spy(*args, **kw):
        masks["m"], seen = real(*args, **kw)
        return masks["m"], seen

    monkeypatch.setattr(salun_mod, "saliency_mask", spy)
    start, reply = run_action(app, view, "salun", epochs=2, mask_ratio=0.3)
    after = load_arrays(view.new_model(), reply.content["arrays"])
    flat = torch.cat([m.flatten() for m in masks["m"]])
    assert int(flat.sum()) == round(0.3 * flat.numel())
    moved_inside = 0
    for p0, p1, mask in zip(start.parameters(), after.parameters(), masks["m"]):
        outside = mask == 0
        assert torch.equal(p0[outside], p1[outside])  # weight decay and momentum included
        moved_inside += int((p0[mask == 1] != p1[mask == 1]).sum())
    assert moved_inside > 0
    retained, forget = split(view)
    m = reply.content["metrics"]
    assert m["samples-processed"] == forget.size + 2 * (retained.size + forget.size)


def test_saliency_mask_ranks_by_the_forget_gradient():
    model = tiny_model()
    masks, seen = salun_mod.saliency_mask(model, tiny_batches(), 0.25, torch.device("cpu"))
    assert seen == 64
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for x, y, _ in tiny_batches():
        model.zero_grad()
        (-nn.functional.cross_entropy(model(x), y)).backward()
        for g, p in zip(grads, model.parameters()):
            g += p.grad
    flat = torch.cat([g.abs().flatten() for g in grads])
    chosen = torch.cat([m.flatten() for m in masks]).bool()
    assert flat[chosen].min() >= flat[~chosen].max()


# -- parameters, loader, preset --------------------------------------------------------------
@pytest.mark.parametrize("params, expected", [
    ("ga.max_steps=0", "max_steps=0 must be >= 1"),
    ("ga.loss_bound=-1", "loss_bound=-1.0 must be > 0"),
    ("badt.retain_fraction=1.5", "retain_fraction=1.5 must be in [0, 1]"),
    ("l1_sparse.no_l1_epochs=10", "no_l1_epochs=10 must be in [0, epochs=10)"),
    ("ssd.alpha=0", "alpha=0.0 must be > 0"),
    ("salun.mask_ratio=0", "mask_ratio=0.0 must be in (0, 1]"),
    ("randl.exclude_true_label=maybe", "expected true or false"),
])
def test_bad_parameters_are_rejected_before_flower_starts(params, expected):
    method = params.split(".")[0]
    with pytest.raises(ValueError) as err:
        check_run_config({"method": method, "method-params": params})
    assert expected in str(err.value)


def test_local_loader_applies_the_transform_and_reshuffles_per_epoch(view):
    ids = view.train_indices()[:40]
    loader = local_loader(view.dataset, ids, 16, seed=3,
                          transform=lambda x, y, i: (x * 0, y))
    first = torch.cat([i for _, _, i in loader])
    second = torch.cat([i for _, _, i in loader])
    assert sorted(first.tolist()) == sorted(ids.tolist()) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    assert all(float(x.abs().sum()) == 0 for x, _, _ in loader)


def test_centralized_preset_is_one_client_forgetting_a_random_tenth():
    preset = load_preset("centralized")
    assert preset["federation.num-clients"] == 1
    assert preset["forget.scope"] == "instance" and preset["forget.clients"] == "0"
    assert preset["forget.fraction"] == 0.1
    methods = preset["method"].split(",")
    assert set(methods) == {"retrain", "ft", "not", "randl", "ga", "badt", "l1_sparse",
                            "ssd", "salun"}
    check_run_config(preset)


def test_the_report_labels_a_one_client_federation_as_centralized(tmp_path):
    import json

    from fedunlearn.experiment.report import display_name, write_report

    def result(method, num_clients):
        cfg = {"dataset": "digits", "model": "cnn", "num_clients": num_clients, "seed": 0,
               "partitioning": "iid",
               "forget": {"scope": "instance", "clients": [0], "classes": [],
                          "fraction": 0.1, "sample_ids": [], "data_of": -1}}
        metrics = {"retain": 99.0, "forget": 97.0, "test": 97.0, "mia": 50.0}
        return {"method": method, "original": metrics, "unlearned": metrics, "config": cfg,
                "cost": {"rounds": 1, "comm_bytes": 1.0, "flops": 1.0, "wall_s": 1.0}}

    for n in (1, 10):
        for method in ("retrain", "l1_sparse"):
            path = tmp_path / f"{n}-{method}" / "results.json"
            path.parent.mkdir()
            path.write_text(json.dumps(result(method, n)))
    report = write_report(tmp_path)
    titles = sorted(g.title for g in report.groups)
    assert titles == [
        "digits / cnn / centralized (one client holds all training data), instance-wise, "
        "fraction 0.1, IID",
        "digits / cnn / instance-wise, 1 of 10 clients (forget ratio 0.1), fraction 0.1, IID"]
    assert "ℓ1-sparse" in report.markdown and display_name("salun") == "SalUn"


def test_the_closing_table_of_a_one_client_job_says_centralized():
    from fedunlearn.harness.results import comparison_markdown, comparison_text

    def result(method, num_clients):
        metrics = {"retain": 99.0, "forget": 97.0, "test": 97.0, "mia": 50.0}
        return {"method": method, "original": metrics, "unlearned": metrics,
                "config": {"num_clients": num_clients},
                "cost": {"rounds": 1, "comm_bytes": 10, "flops": 5, "wall_s": 1.0}}

    one = [result("retrain", 1), result("salun", 1)]
    text = comparison_text(one)
    assert "fedunlearn results (centralized: one client holds all training data)" in text
    assert "Avg. Gap" in text and "FLOPs" in text and "salun" in text
    assert "Centralized setting" in comparison_markdown(one)
    federated = [result("retrain", 10), result("salun", 10)]
    assert "centralized" not in comparison_text(federated)
    assert "Centralized" not in comparison_markdown(federated)

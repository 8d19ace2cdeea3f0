"""The K-seed forgetting audit on class- and instance-wise requests: the forget ids the
nodes' requests name, ``outputs.npz``'s point sets, the retain sample without forget ids,
relearn measured on the forget ids, and methods that cannot serve a scope left out of
``bench/forgetting_audit.py`` with the reason instead of failing the set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedunlearn.client.node import own_request
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.node import harness_view
from fedunlearn.harness.outputs import RETAIN_SAMPLE, forget_ids, retain_sample
from fedunlearn.samples import labels_of
from tests.helpers import context, run_config, bench_module

TINY = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 2,
        "unlearn.rounds": 2, "eval.mia-max-members": 40, "partition-seed": 0}


@pytest.fixture(scope="module")
def audit():
    forgetting_audit = bench_module("forgetting_audit")
    return forgetting_audit


def _requests(rc: dict) -> dict:
    """What each node asks for, as the harness's nodes build it (node id -> request)."""
    cfg = ExperimentConfig.from_run_config(rc)
    out = {}
    for p in range(cfg.num_clients):
        ctx = context(p, rc)
        request = own_request(harness_view(ctx), ctx.node_config)
        if request is not None:
            out[ctx.node_id] = request
    return out


def _rc(values: dict) -> dict:
    """The app's run-config defaults with ``values`` (dotted keys)."""
    return {**run_config(), **values}


def _split(rc: dict):
    cfg = ExperimentConfig.from_run_config(rc)
    data = federated_data(cfg)
    return cfg, data, labels_of(data.train)


def test_class_wise_forget_ids_are_the_class_samples_of_the_clients_that_forget_it():
    rc = _rc({**TINY, "forget.scope": "class", "forget.classes": "3",
              "forget.clients": "0,1"})
    cfg, data, labels = _split(rc)
    forget = forget_ids(cfg, _requests(rc))
    train = {p: data.train_indices(p) for p in range(3)}
    truth = np.sort(np.concatenate([train[p][labels[train[p]] == 3] for p in (0, 1)]))
    assert np.array_equal(forget, truth) and len(forget) > 0
    kept = retain_sample(data, forget, cfg.split_seed)
    assert len(kept) == RETAIN_SAMPLE and not set(kept.tolist()) & set(forget.tolist())
    # client 2 keeps its class-3 samples: they are retained data, drawn for the sample
    third = train[2][labels[train[2]] == 3]
    assert len(third) > 0 and set(third.tolist()) & set(kept.tolist())


def test_instance_wise_forget_ids_are_the_requested_ids():
    rc = _rc({**TINY, "forget.scope": "instance", "forget.fraction": 0.3,
              "forget.clients": "0,2"})
    cfg, data, _ = _split(rc)
    requests = _requests(rc)
    asked = np.sort(np.concatenate([r.sample_ids for r in requests.values()]))
    forget = forget_ids(cfg, requests)
    assert np.array_equal(forget, asked)
    for p in (0, 2):  # 30 % of each target's training split, inside it
        mine = np.intersect1d(forget, data.train_indices(p))
        assert len(mine) == round(0.3 * len(data.train_indices(p)))
    assert not np.intersect1d(forget, data.train_indices(1)).size
    kept = retain_sample(data, forget, cfg.split_seed)
    assert len(kept) == RETAIN_SAMPLE and not set(kept.tolist()) & set(forget.tolist())
    assert set(np.setdiff1d(data.train_indices(0), forget).tolist()) & set(kept.tolist())


def test_the_class_setting_forgets_class_3_everywhere_on_digits(audit, tmp_path):
    (job,) = audit.plan("class", 1, ["retrain", "ft", "not"], 0, False, tmp_path, {})
    rc = _rc(job.run_config)
    cfg, data, labels = _split(rc)
    assert (cfg.forget.scope, cfg.forget.classes) == ("class", (3,))
    forget = forget_ids(cfg, _requests(rc))
    train = np.concatenate([data.train_indices(p) for p in range(10)])
    assert np.array_equal(forget, np.sort(train[labels[train] == 3]))
    kept = retain_sample(data, forget, cfg.split_seed)
    assert len(kept) == RETAIN_SAMPLE and 3 not in set(labels[kept].tolist())


def test_the_instance_setting_forgets_half_of_client_0s_samples_on_digits(audit, tmp_path):
    (job,) = audit.plan("instance", 1, ["retrain", "ft", "not"], 0, False, tmp_path, {})
    rc = _rc(job.run_config)
    cfg, data, _ = _split(rc)
    requests = _requests(rc)
    assert [r.partition_id for r in requests.values()] == [0]
    forget = forget_ids(cfg, requests)
    assert len(forget) == 58 and set(forget.tolist()) < set(data.train_indices(0).tolist())
    # fixed by the partition seed: another training seed forgets the same ids
    other = {**rc, "seed": 5}
    assert np.array_equal(forget_ids(ExperimentConfig.from_run_config(other),
                                     _requests(other)), forget)


def test_methods_that_cannot_serve_the_scope_are_left_out_before_any_job(audit, tmp_path,
                                                                       capsys):
    jobs = audit.plan("class", 2, ["retrain", "federaser", "ft", "ga"], 0, True, tmp_path, {})
    said = capsys.readouterr().out
    assert ("left out: federaser cannot serve class-wise requests; it serves client-wise "
            "requests") in said
    assert [j.methods for j in jobs] == [["retrain", "ft", "ga"], ["retrain"]] * 2
    assert jobs[0].run_config["method"] == "retrain,ft,ga"
    jobs = audit.plan("iid-client", 1, ["retrain", "salun", "not"], 0, False, tmp_path, {})
    assert "left out: salun cannot serve client-wise requests" in capsys.readouterr().out
    assert jobs[0].methods == ["retrain", "not"]
    with pytest.raises(SystemExit, match="nope"):  # an unknown name is still an error
        audit.plan("class", 1, ["retrain", "nope"], 0, False, tmp_path, {})


def test_a_method_a_job_refused_counts_as_done_and_names_its_reason(audit, tmp_path):
    job = audit.Job("seed0", tmp_path / "seed0", {}, ["retrain", "fukd"])
    assert not job.done() and job.refused() == {}
    for name in ("results.json", "outputs.npz"):
        (job.method_dir("retrain") / name).parent.mkdir(parents=True, exist_ok=True)
        (job.method_dir("retrain") / name).write_text("{}")
    assert not job.done()
    skipped = job.method_dir("fukd") / "skipped.json"
    skipped.parent.mkdir(parents=True)
    skipped.write_text(json.dumps({"method": "fukd", "skipped": "fukd needs X"}))
    assert job.done() and job.refused() == {"fukd": "fukd needs X"}


def test_class_wise_audit_job_writes_the_forget_ids_and_relearns_on_them(audit, tmp_path,
                                                                       capsys):
    """One short in-process job through the bench: class 3 of clients 0 and 1, a method
    that serves only client-wise requests left out, relearn measured on the forget ids."""
    extra = [f"{k}={v}" for k, v in TINY.items() if k != "partition-seed"]
    args = ["--setting", "class", "--seeds", "1", "--methods", "retrain,ft,federaser",
            "--relearn", "3", "--no-report", "--out", str(tmp_path),
            "--checkpoint-dir", str(tmp_path / "ck"), *extra, "forget.clients=0,1"]
    assert audit.main(args) == 0
    said = capsys.readouterr().out
    assert "left out: federaser cannot serve class-wise" in said and "seed0: done" in said
    rc = _rc({**TINY, "forget.scope": "class", "forget.classes": "3",
              "forget.clients": "0,1"})
    _, data, labels = _split(rc)
    train = [data.train_indices(p) for p in (0, 1)]
    truth = np.sort(np.concatenate([t[labels[t] == 3] for t in train]))
    for method in ("retrain", "ft"):
        folder = tmp_path / "class" / "seed0" / method
        result = json.loads((folder / "results.json").read_text())
        z = np.load(folder / "outputs.npz")
        assert result["forget_ids"] == z["forget_ids"].tolist() == truth.tolist()
        assert set(z["forget_labels"].tolist()) == {3}
        assert not set(z["retain_ids"].tolist()) & set(truth.tolist())
        relearn = result["relearn"]
        assert relearn["metric"] == "forget"
        # round 0 is the method's model: its accuracy on exactly the forget ids
        acc = 100.0 * np.mean(z["model_forget"].argmax(1) == z["forget_labels"])
        original = 100.0 * np.mean(z["original_forget"].argmax(1) == z["forget_labels"])
        assert relearn["curve"][0] == [0, pytest.approx(acc, abs=1e-3)]
        assert relearn["target"] == pytest.approx(original, abs=1e-3)
        assert result["unlearned"]["forget"] == pytest.approx(acc)
        reached = [r for r, v in relearn["curve"] if v >= relearn["target"]]
        assert relearn["rounds"] == (reached[0] if reached else None)
    assert not (tmp_path / "class" / "seed0" / "federaser").exists()

"""Seeds as an axis: a partition seed that fixes the data split across training seeds,
the forget ids and the Retrain reference in ``results.json``, per-example outputs
(``audit.outputs``), the budget-matched Retrain and ``fedunlearn.load_module``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedunlearn.engine import local_run
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.node import planned_request

SMALL = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 2,
         "unlearn.rounds": 2, "eval.mia-max-members": 40}


def _cfg(**values) -> ExperimentConfig:
    return ExperimentConfig.from_run_config({**SMALL, **values})


def test_the_partition_seed_fixes_the_split_whatever_the_training_seed():
    a, b = _cfg(seed=1, **{"partition-seed": 7}), _cfg(seed=2, **{"partition-seed": 7})
    da, db = federated_data(a), federated_data(b)
    for p in range(3):
        assert np.array_equal(da.train_indices(p), db.train_indices(p))
        assert np.array_equal(da.val_indices(p), db.val_indices(p))
    # without it the split follows seed, as before
    assert not np.array_equal(federated_data(_cfg(seed=1)).train_indices(0),
                              federated_data(_cfg(seed=2)).train_indices(0))
    # an instance-wise fraction's ids are part of the split
    inst = {"forget.scope": "instance", "forget.fraction": 0.2}
    ia, ib = (_cfg(seed=s, **{"partition-seed": 7}, **inst) for s in (1, 2))
    ids = [planned_request(c, 0, federated_data(c).train_indices(0)).sample_ids
           for c in (ia, ib)]
    assert ids[0] == ids[1] and len(ids[0]) > 0


def test_the_cache_key_knows_the_partition_seed_and_keeps_existing_keys():
    base = _cfg(seed=3)
    assert _cfg(seed=3, **{"partition-seed": 3}).pretrain_key() == base.pretrain_key()
    assert _cfg(seed=3, **{"partition-seed": 4}).pretrain_key() != base.pretrain_key()
    assert (_cfg(seed=3, **{"partition-seed": 4}).pretrain_key()
            != _cfg(seed=3, **{"partition-seed": 5}).pretrain_key())
    assert ExperimentConfig().split_seed == 0 and ExperimentConfig().partition_seed == -1


@pytest.mark.parametrize("value, match", [(-2, "partition-seed=-2"), ("x", "partition-seed")])
def test_a_bad_partition_seed_is_refused_naming_it(value, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**{"partition-seed": value})


def test_the_retain_sample_is_500_retained_ids_fixed_by_the_partition_seed():
    from fedunlearn.harness.outputs import retain_sample

    def sample(seed, partition_seed):
        cfg = ExperimentConfig.from_run_config({"seed": seed, "partition-seed": partition_seed})
        data = federated_data(cfg)  # digits, 10 clients
        forget = data.train_indices(0)
        return forget, retain_sample(data, forget, cfg.split_seed)

    forget, one = sample(1, 3)
    _, two = sample(2, 3)
    _, other = sample(1, 4)
    assert len(one) == 500 and np.array_equal(one, two) and not np.array_equal(one, other)
    assert np.all(np.diff(one) > 0) and not set(one.tolist()) & set(forget.tolist())


def test_per_example_outputs_in_service_mode_are_refused_not_ignored():
    with pytest.raises(ValueError, match="audit.outputs=true: service mode"):
        _cfg(method="not", **{"service.rounds": 5, "audit.outputs": True})


def test_a_bad_retrain_budget_is_refused_naming_the_choices():
    from fedunlearn import Retrain

    with pytest.raises(ValueError, match=r"budget='twice'.*'pretrain', 'matched'"):
        Retrain(params={"budget": "twice"})


def _job(tmp_path, name: str, **extra) -> tuple:
    out = tmp_path / name
    rc = local_run({**SMALL, **extra, "output-dir": str(out),
                    "checkpoint-dir": str(tmp_path / "ck")},
                   num_supernodes=3, log_file=tmp_path / f"{name}.log", echo=False)
    assert rc == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    return out


def _results(out, method):
    return json.loads((out / method / "results.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two training seeds on one split (with per-example outputs and the budget-matched
    Retrain), and a plain job."""
    tmp = tmp_path_factory.mktemp("seeds")
    common = {"partition-seed": 0, "audit.outputs": True}
    a = _job(tmp, "a", seed=1, method="retrain,ft", **common,
             **{"method-params": "retrain.budget=matched"})
    b = _job(tmp, "b", seed=2, method="retrain,ft", **common)
    plain = _job(tmp, "plain", seed=1, method="retrain,ft")
    return a, b, plain


def test_two_training_seeds_on_one_partition_seed_forget_the_same_ids(jobs):
    a, b, plain = jobs
    ra, rb, rp = _results(a, "ft"), _results(b, "ft"), _results(plain, "ft")
    assert (ra["seed"], ra["partition_seed"]) == (1, 0)
    assert (rb["seed"], rb["partition_seed"]) == (2, 0)
    assert (rp["seed"], rp["partition_seed"]) == (1, 1)
    # client 0's training split, every id of it, the same under both training seeds
    truth = federated_data(_cfg(seed=5, **{"partition-seed": 0})).train_indices(0)
    assert ra["forget_ids"] == rb["forget_ids"] == [int(i) for i in truth]
    assert rp["forget_ids"] != ra["forget_ids"]  # the split follows seed without it
    # different training seeds: different pretrained models
    assert ra["pretrain"]["key"] != rb["pretrain"]["key"]


def test_per_example_outputs_hold_both_models_logits_on_fixed_ids(jobs):
    a, b, plain = jobs
    za, zb = np.load(a / "ft" / "outputs.npz"), np.load(b / "ft" / "outputs.npz")
    assert _results(a, "ft")["outputs"] == str(a / "ft" / "outputs.npz")
    assert za["forget_ids"].tolist() == _results(a, "ft")["forget_ids"]
    for name in ("forget", "retain", "test"):
        assert np.array_equal(za[f"{name}_ids"], zb[f"{name}_ids"])  # fixed by the split
        n = len(za[f"{name}_ids"])
        assert za[f"original_{name}"].shape == za[f"model_{name}"].shape == (n, 10)
        assert za[f"{name}_labels"].shape == (n,)
    # here fewer than 500 ids are retained: all of them (every client's training split
    # minus the forget ids)
    data = federated_data(_cfg(seed=5, **{"partition-seed": 0}))
    retained = np.setdiff1d(np.concatenate([data.train_indices(p) for p in range(3)]),
                            za["forget_ids"])
    assert len(retained) < 500 and np.array_equal(za["retain_ids"], retained)
    # the original is the same model for every method of a job, and another per seed
    zr = np.load(a / "retrain" / "outputs.npz")
    assert np.array_equal(zr["original_test"], za["original_test"])
    assert not np.array_equal(za["original_test"], zb["original_test"])
    # the recorded test accuracy is the model's logits' accuracy
    acc = 100.0 * np.mean(za["model_test"].argmax(1) == za["test_labels"])
    assert acc == pytest.approx(_results(a, "ft")["unlearned"]["test"])
    assert (int(za["seed"]), int(za["partition_seed"]), str(za["method"])) == (1, 0, "ft")
    # off by default: nothing written, nothing recorded
    assert not (plain / "ft" / "outputs.npz").exists()
    assert "outputs" not in _results(plain, "ft")


def test_the_budget_matched_retrain_trains_pretraining_plus_recovery_rounds(jobs):
    a, b, _ = jobs
    matched, plain = _results(a, "retrain"), _results(b, "retrain")
    assert matched["params"] == {"budget": "matched"} and matched["cost"]["rounds"] == 4
    assert plain["params"] == {"budget": "pretrain"} and plain["cost"]["rounds"] == 2
    assert _results(a, "ft")["reference"] == {"method": "retrain", "budget": "matched",
                                              "rounds": 4}
    assert _results(b, "ft")["reference"]["budget"] == "pretrain"


def test_load_module_gives_the_saved_model_as_a_module_from_outside(jobs, tmp_path):
    """A user's script: ``fedunlearn.load_module(folder)`` and the model's logits are
    those the job recorded."""
    a, _, _ = jobs
    user = tmp_path / "userpkg"
    user.mkdir()
    (user / "__init__.py").write_text("")
    (user / "check.py").write_text(textwrap.dedent(f'''
        import numpy as np, torch, fedunlearn
        from fedunlearn.harness.data import federated_data
        from fedunlearn.harness.config import ExperimentConfig
        net = fedunlearn.load_module({str(a / "ft")!r})
        assert isinstance(net, torch.nn.Module) and not net.training
        cfg = ExperimentConfig.from_run_config({SMALL!r})
        test = federated_data(cfg).test
        x = torch.stack([test[i][0] for i in range(len(test))])
        with torch.no_grad():
            logits = net(x).numpy()
        saved = np.load({str(a / "ft" / "outputs.npz")!r})["model_test"]
        print("close", bool(np.allclose(logits, saved, atol=1e-5)))
        original = fedunlearn.load_module({str(_results(a, "ft")["pretrain"]["path"])!r})
        with torch.no_grad():
            logits = original(x).numpy()
        saved = np.load({str(a / "ft" / "outputs.npz")!r})["original_test"]
        print("original", bool(np.allclose(logits, saved, atol=1e-5)))
        try:
            fedunlearn.load_module({str(a)!r})
        except ValueError as err:
            print("several", "retrain" in str(err) and "ft" in str(err))
    '''))
    done = subprocess.run([sys.executable, "-m", "userpkg.check"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["close", "True", "original", "True", "several", "True"]


def test_load_module_without_a_record_asks_for_model_fn(tmp_path):
    import torch

    from fedunlearn import load_module
    from fedunlearn.serving import save_model
    from flwr.app import ArrayRecord

    net = torch.nn.Linear(3, 2)
    save_model(tmp_path / "model.pt", ArrayRecord(net.state_dict()))
    with pytest.raises(ValueError, match="model_fn"):
        load_module(tmp_path / "model.pt")
    loaded = load_module(tmp_path / "model.pt", model_fn=lambda: torch.nn.Linear(3, 2))
    assert torch.equal(loaded.weight, net.weight)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_module(tmp_path / "nope")


def test_the_report_keeps_the_budget_matched_retrain_out_of_the_reference(tmp_path):
    """``fedunlearn-report`` over a folder with both Retrains: the default is the
    reference, the matched one a row of its own with its Δ to it."""
    from fedunlearn.experiment.report import group_results, load_results

    cfg = {"dataset": "digits", "model": "cnn", "num_clients": 10, "seed": 0,
           "partitioning": "iid", "forget": {"scope": "client", "clients": [0]}}
    rows = {("retrain", "pretrain"): 90.0, ("retrain", "matched"): 94.0, ("ft", None): 92.0}
    for (method, budget), test in rows.items():
        metrics = {"retain": 95.0, "forget": 90.0, "test": test, "mia": 50.0}
        path = tmp_path / f"{method}-{budget}" / method / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({
            "method": method, "params": {"budget": budget} if budget else {},
            "original": metrics, "unlearned": metrics, "config": cfg,
            "cost": {"rounds": 1, "comm_bytes": 1.0, "flops": 1.0, "wall_s": 1.0}}))
    (group,) = group_results(load_results(tmp_path))
    by_label = {row.label: row for row in group.rows}
    assert list(by_label) == ["Retrain", "Retrain (matched)", "FT"]
    assert group.reference is by_label["Retrain"] and group.reference.mean["test"] == 90.0
    assert by_label["Retrain (matched)"].delta["test"] == pytest.approx(4.0)
    assert by_label["FT"].delta["test"] == pytest.approx(2.0)

"""bench/forgetting_audit.py: K training seeds on one data split, per-example outputs,
the budget-matched Retrain beside each seed, resume and progress."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers import bench_module

TINY = ["dataset.name=synthetic", "federation.num-clients=3", "pretrain.rounds=2",
        "unlearn.rounds=2", "eval.mia-max-members=40"]


@pytest.fixture(scope="module")
def audit():
    forgetting_audit = bench_module("forgetting_audit")
    return forgetting_audit


def test_k_seeds_on_one_split_then_resume(audit, tmp_path, capsys):
    args = ["--seeds", "2", "--methods", "retrain,ft", "--matched", "--out", str(tmp_path),
            "--checkpoint-dir", str(tmp_path / "ck"), *TINY]
    assert audit.main(args) == 0
    said = capsys.readouterr().out
    assert "0 of 4 job(s) already done; 4 to run" in said and "[4/4] seed1-matched: done" in said
    root = tmp_path / "iid-client"
    forget, seeds = [], []
    for seed in (0, 1):
        for method in ("retrain", "ft"):
            result = json.loads((root / f"seed{seed}" / method / "results.json").read_text())
            z = np.load(root / f"seed{seed}" / method / "outputs.npz")
            assert z["forget_ids"].tolist() == result["forget_ids"]
            forget.append(result["forget_ids"])
            seeds.append((result["seed"], result["partition_seed"]))
        matched = audit.Job("m", root / f"seed{seed}-matched", {}, ["retrain"])
        result = json.loads((matched.method_dir("retrain") / "results.json").read_text())
        assert result["params"] == {"budget": "matched"} and result["cost"]["rounds"] == 4
        assert result["forget_ids"] == forget[0]
    assert all(f == forget[0] for f in forget) and len(forget[0]) > 0
    assert seeds == [(0, 0), (0, 0), (1, 0), (1, 0)]
    state = json.loads((root / "audit-seeds.json").read_text())
    assert sorted(state["jobs"]) == ["seed0", "seed0-matched", "seed1", "seed1-matched"]
    assert all(j["ok"] and j["wall_s"] > 0 for j in state["jobs"].values())

    # resume: nothing to do; a job whose outputs are missing runs again, alone
    assert audit.main(args) == 0
    assert "4 of 4 job(s) already done; 0 to run" in capsys.readouterr().out
    (root / "seed1" / "ft" / "outputs.npz").unlink()
    assert audit.main(args) == 0
    said = capsys.readouterr().out
    assert "3 of 4 job(s) already done; 1 to run" in said and "[1/1] seed1: done" in said
    assert (root / "seed1" / "ft" / "outputs.npz").is_file()


def test_bad_arguments_are_refused_before_any_job(audit, tmp_path):
    with pytest.raises(SystemExit, match="add retrain"):
        audit.main(["--methods", "ft,not", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="choose from"):
        audit.main(["--setting", "cifar", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="partition-seed"):
        audit.main(["--partition-seed", "-5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 1"):
        audit.main(["--seeds", "0", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_seed_stride_keeps_retrains_initialisation_out_of_the_originals(audit, tmp_path):
    jobs = audit.plan("iid-client", 3, ["retrain", "not"], 0, True, tmp_path, {}, stride=2)
    assert [j.name for j in jobs] == ["seed0", "seed0-matched", "seed2", "seed2-matched",
                                      "seed4", "seed4-matched"]
    assert {j.run_config["partition-seed"] for j in jobs} == {0}
    assert all(j.run_config["audit.outputs"] is True for j in jobs)
    assert jobs[1].run_config["method-params"] == "retrain.budget=matched"


def test_relearn_passes_the_key_to_every_job_and_a_bad_value_is_refused(audit, tmp_path):
    jobs = audit.plan("backdoor", 2, ["retrain", "not"], 0, True, tmp_path, {}, relearn=10)
    assert [j.run_config["audit.relearn-rounds"] for j in jobs] == [10] * 4
    plain = audit.plan("backdoor", 1, ["retrain", "not"], 0, False, tmp_path, {})
    assert "audit.relearn-rounds" not in plain[0].run_config
    out = tmp_path / "refused"
    with pytest.raises(SystemExit, match="audit.relearn-rounds=-3"):
        audit.main(["--relearn", "-3", "--out", str(out)])
    assert not out.exists()


def test_two_jobs_at_a_time_give_the_same_results(audit, tmp_path, capsys):
    """--jobs 2: the jobs run in two worker processes (the matched Retrain after its
    seed's job) and write what one at a time writes."""
    common = ["--seeds", "2", "--methods", "retrain,ft", "--matched",
              "--checkpoint-dir", str(tmp_path / "ck"), "--no-report", *TINY]
    assert audit.main([*common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert audit.main([*common, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    said = capsys.readouterr().out
    assert "0 of 4 job(s) already done; 4 to run, 2 at a time" in said
    assert said.count(": done in") == 4 and "FAILED" not in said
    for job in ("seed0/retrain", "seed0/ft", "seed1/ft", "seed1-matched/retrain"):
        one, two = (json.loads((tmp_path / d / "iid-client" / job / "results.json").read_text())
                    for d in ("one", "two"))
        assert two["unlearned"] == one["unlearned"] and two["forget_ids"] == one["forget_ids"]
    state = json.loads((tmp_path / "two" / "iid-client" / "audit-seeds.json").read_text())
    assert all(j["ok"] and j["workers"] == 2 for j in state["jobs"].values())


def test_jobs_is_checked(audit, tmp_path):
    with pytest.raises(SystemExit, match="--jobs 0"):
        audit.main(["--jobs", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--engine flower"):
        audit.main(["--jobs", "2", "--engine", "flower", "--out", str(tmp_path)])

"""Relearn time (run-config ``audit.relearn-rounds``): after each method, rounds of plain
federated training with the targets' forget data until forget accuracy (ASR with a
backdoor) is back at the original model's, recorded in ``results.json``'s ``relearn``
and the comparison's Relearn column; off by default, and never a change to the method's
model, metrics or costs."""

from __future__ import annotations

import hashlib
import json

import pytest

from fedunlearn.engine import local_run
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.relearn import ASR_TOLERANCE
from fedunlearn.harness.results import comparison_markdown
from fedunlearn.launch import check_run_config

SMALL = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 4,
         "unlearn.rounds": 2, "eval.mia-max-members": 40, "method": "retrain,ft,not"}
BACKDOOR = {"backdoor.clients": "0", "forget.clients": "0"}
CLASS = {"forget.scope": "class", "forget.classes": "1", "forget.clients": "0,1,2"}
METHODS = ("retrain", "ft", "not")


def _job(tmp, name: str, **extra):
    out = tmp / name
    rc = local_run({**SMALL, **extra, "output-dir": str(out),
                    "checkpoint-dir": str(tmp / "ck")},
                   num_supernodes=3, log_file=tmp / f"{name}.log", echo=False)
    assert rc == 0, (tmp / f"{name}.log").read_text()[-2000:]
    return out


def _results(out, method: str) -> dict:
    return json.loads((out / method / "results.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The backdoor job with and without relearn rounds, and a class-wise job with."""
    tmp = tmp_path_factory.mktemp("relearn")
    return {"backdoor": _job(tmp, "backdoor", **BACKDOOR, **{"audit.relearn-rounds": 8}),
            "plain": _job(tmp, "plain", **BACKDOOR),
            "class": _job(tmp, "class", **CLASS, **{"audit.relearn-rounds": 8})}


def _check_curve(result: dict, metric: str, tolerance: float) -> dict:
    """The relearn record of ``result``: its target is the original's value, its curve
    runs from round 0 (the method's model) to the first round that reaches it."""
    relearn = result["relearn"]
    assert relearn["metric"] == metric and relearn["rounds_max"] == 8
    assert relearn["tolerance"] == tolerance
    assert relearn["target"] == pytest.approx(result["original"][metric], abs=1e-4)
    assert relearn["curve"][0] == [0, pytest.approx(result["unlearned"][metric], abs=1e-4)]
    rounds = relearn["rounds"]
    assert isinstance(rounds, int) and 0 <= rounds <= 8
    assert [r for r, _ in relearn["curve"]] == list(range(rounds + 1))
    values = [v for _, v in relearn["curve"]]
    goal = relearn["target"] - tolerance
    assert values[-1] >= goal and all(v < goal for v in values[:-1])
    assert relearn["cost"]["rounds"] == rounds
    return relearn


def test_on_the_backdoor_preset_ft_and_not_relearn_the_trigger_in_rounds(jobs):
    for method in METHODS:
        result = _results(jobs["backdoor"], method)
        relearn = _check_curve(result, "asr", ASR_TOLERANCE)
        if method != "ft":  # FT keeps part of the trigger; NoT and Retrain remove it
            assert relearn["curve"][0][1] < 50 and relearn["rounds"] >= 1
    table = (jobs["backdoor"] / "comparison.md").read_text()
    assert "| Relearn |" in table and "ASR is back at the original's" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    for method in METHODS:
        rounds = _results(jobs["backdoor"], method)["relearn"]["rounds"]
        assert f" | {rounds} | " in rows[method]


def test_a_class_wise_request_relearns_its_forget_accuracy(jobs):
    for method in METHODS:
        result = _results(jobs["class"], method)
        relearn = _check_curve(result, "forget", 0.0)
        assert relearn["rounds"] >= 1  # the class was forgotten: round 0 is below


def test_relearn_changes_neither_the_model_nor_the_metrics_nor_the_costs(jobs):
    for method in METHODS:
        with_relearn, plain = _results(jobs["backdoor"], method), _results(jobs["plain"], method)
        model = jobs["backdoor"] / method / "model.pt"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == with_relearn["model"]["sha256"]
        assert with_relearn["model"]["sha256"] == plain["model"]["sha256"]
        assert with_relearn["unlearned"] == plain["unlearned"]
        costs = [{k: v for k, v in r["cost"].items() if k not in ("wall_s", "phases")}
                 for r in (with_relearn, plain)]
        assert costs[0] == costs[1]


def test_off_by_default_no_relearn_field_and_no_column(jobs):
    assert ExperimentConfig().audit_relearn_rounds == 0
    for method in METHODS:
        assert "relearn" not in _results(jobs["plain"], method)
    assert "Relearn" not in (jobs["plain"] / "comparison.md").read_text()


@pytest.mark.parametrize("value, match", [
    (-1, r"audit.relearn-rounds=-1"), ("ten", r"audit.relearn-rounds='ten': expected an "
                                              "integer"),
    (2.5, r"audit.relearn-rounds=2.5: expected an integer"),
    (100_001, r"audit.relearn-rounds=100001")])
def test_bad_relearn_rounds_are_refused_naming_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        check_run_config({"audit.relearn-rounds": value})


def test_relearn_rounds_in_service_mode_are_refused_not_ignored():
    with pytest.raises(ValueError, match="audit.relearn-rounds=3: service mode"):
        check_run_config({"method": "not", "service.rounds": 5, "audit.relearn-rounds": 3})


def _row(method: str, relearn: dict) -> dict:
    metrics = {"retain": 90.0, "forget": 50.0, "test": 90.0, "mia": 50.0}
    cost = {"comm_bytes": 1.0, "flops": 1.0, "rounds": 1, "wall_s": 0.1}
    return {"method": method, "original": metrics, "unlearned": metrics, "cost": cost,
            "relearn": relearn}


def test_the_relearn_column_says_when_the_rounds_did_not_bring_it_back():
    never = {"rounds_max": 5, "rounds": None, "metric": "forget", "tolerance": 0.0,
             "target": 97.0, "curve": [[0, 10.0], [1, 20.0]]}
    table = comparison_markdown([_row("retrain", dict(never, rounds=4)), _row("ft", never)])
    header, _, original, retrain, ft = ([c.strip() for c in line.strip("|").split("|")]
                                        for line in table.splitlines()[:5])
    column = header.index("Relearn")
    assert header[column - 1] == "Avg. Gap" and header[column + 1] == "Comm. (B)"
    assert (original[column], retrain[column], ft[column]) == ("", "4", ">5")
    assert "forget accuracy is back at the original's (>N: not within N rounds" in table


def test_the_console_table_explains_the_relearn_column():
    from fedunlearn.harness.results import comparison_text

    record = {"rounds_max": 5, "rounds": 2, "metric": "asr", "tolerance": 1.0,
              "target": 64.2, "curve": [[0, 0.3], [1, 30.0], [2, 64.0]]}
    text = comparison_text([_row("retrain", record), _row("not", dict(record, rounds=1))])
    assert "Relearn" in text.splitlines()[1]
    assert "Relearn: rounds of training with the forget data" in " ".join(text.split())

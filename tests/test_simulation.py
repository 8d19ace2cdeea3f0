"""End to end through ``flwr run`` (local simulation engine, Ray actors), one job per
family of methods; the harness's own request logic runs on the in-process engine, whose
results equal flwr run's (compared in the first test).

Each ``flwr run`` job pays ~20 s of Flower/Ray start-up, so the jobs are few and small. Every job
gets its own FLWR_HOME and ports, and ``flwr_run`` stops the SuperLink it started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedunlearn.engine import local_run
from fedunlearn.launch import flwr_run

pytestmark = pytest.mark.slow  # each test is a `flwr run` (Ray, a SuperLink)

SMALL = {"dataset.name": "digits", "federation.num-clients": 5, "eval.every": 100}


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    return {"FLWR_HOME": str(home)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def run(run_config: dict, out: Path, env: dict, num_supernodes: int = 5,
        engine: str = "flower") -> str:
    """One job: ``flwr run`` (``engine="flower"``) or, for the harness's own logic
    (requests, scopes), the in-process engine, whose results equal flwr run's
    (test_method_list_then_checkpoint_reuse compares them), without Ray's start-up."""
    log = out.parent / f"{out.name}.log"
    run_config = dict(SMALL, **run_config, **{"output-dir": str(out)})
    if engine == "local":
        rc = local_run(run_config, num_supernodes=num_supernodes, log_file=log, echo=False)
    else:
        rc = flwr_run(run_config, num_supernodes=num_supernodes, env=env, log_file=log,
                      echo=False)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


_VOLATILE = {"wall_s", "round_s", "path", "node_id", "output_dir", "checkpoint_dir"}


def comparable(value):
    """A results.json without what differs between two runs of one job: wall times,
    file paths, node ids (Flower draws them)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def check_schema(res: dict, method: str, stores: bool = False) -> None:
    assert res["method"] == method
    for which in ("original", "unlearned"):
        assert set(res[which]) == {"retain", "forget", "test", "mia"}, res[which]
        for value in res[which].values():
            assert 0.0 <= value <= 100.0
    assert set(res["cost"]) >= {"rounds", "comm_bytes", "flops", "wall_s", "storage_bytes"}
    assert res["cost"]["comm_bytes"] > 0 and res["cost"]["flops"] > 0
    assert (res["cost"]["storage_bytes"] > 0) == stores
    phases = res["cost"]["phases"]
    assert sum(p["comm_bytes"] for p in phases.values()) == res["cost"]["comm_bytes"]


def test_method_list_then_checkpoint_reuse(tmp_path, flwr_env, ckpt):
    common = {"pretrain.rounds": 4, "unlearn.rounds": 2, "checkpoint-dir": str(ckpt)}
    out = tmp_path / "three"
    log = run(dict(common, method="retrain,ft,not"), out, flwr_env)
    results = {m: load(out / m / "results.json") for m in ("retrain", "ft", "not")}
    for method, res in results.items():
        check_schema(res, method)
        assert res["request"] == [{"scope": "client", "partition_id": 0,
                                   "node_id": res["request"][0]["node_id"]}]
        assert res["original"] == results["retrain"]["original"]
    assert results["retrain"]["cost"]["rounds"] == 4
    assert results["not"]["cost"]["rounds"] == 2
    # 4 of 5 clients train: bytes down and up per round are 4 model copies each.
    per_round = results["not"]["cost"]["comm_bytes"] / 2
    assert results["retrain"]["cost"]["comm_bytes"] == pytest.approx(4 * per_round)
    assert results["not"]["notes"]["negated"] == ["conv1.weight", "conv1.bias"]
    assert not results["not"]["pretrain"]["cached"]
    table = (out / "comparison.md").read_text()
    for method in ("retrain", "ft", "not"):
        assert f"| {method} |" in table
    assert "Avg. Gap" in table
    assert "fedunlearn results" in log and "[not] round 2/2" in log

    # The in-process engine runs the same job (pretraining from scratch too) to the same
    # numbers: every metric, cost and note of results.json, bar wall times and ids.
    local_out, local_ckpt = tmp_path / "local", tmp_path / "local-ckpt"
    rc = local_run({**SMALL, **common, "method": "retrain,ft,not",
                    "output-dir": str(local_out), "checkpoint-dir": str(local_ckpt)},
        num_supernodes=5, log_file=tmp_path / "local.log", echo=False)
    assert rc == 0, (tmp_path / "local.log").read_text()[-3000:]
    for method, res in results.items():
        assert comparable(load(local_out / method / "results.json")) == comparable(res), method

    # Same pretraining config: the cached model is loaded, pretraining is skipped.
    out2 = tmp_path / "again"
    log2 = run(dict(common, method="not"), out2, flwr_env)
    res = load(out2 / "not" / "results.json")
    check_schema(res, "not")
    assert res["pretrain"]["cached"] is True
    assert res["pretrain"]["key"] == results["not"]["pretrain"]["key"]
    assert res["original"] == results["not"]["original"]
    # Reproducible: the same method from the same cached model gives the same metrics,
    # whatever order the replies arrived in.
    assert res["unlearned"] == results["not"]["unlearned"]
    assert "skipping pretraining" in log2 and "[pretrain] round" not in log2


def test_methods_where_the_target_takes_part(tmp_path, flwr_env, ckpt):
    """PUF and MoDE: the target runs its own client action, MoDE sends two models."""
    out = tmp_path / "target-actions"
    log = run({"method": "puf,mode", "pretrain.rounds": 4, "unlearn.rounds": 2,
               "checkpoint-dir": str(ckpt),
               "method-params": "mode.degradation_rounds=1 mode.guidance_rounds=2"},
              out, flwr_env)
    puf, mode = load(out / "puf" / "results.json"), load(out / "mode" / "results.json")
    check_schema(puf, "puf")
    check_schema(mode, "mode", stores=True)
    model_bytes = mode["cost"]["storage_bytes"]
    unl = puf["cost"]["phases"]["unlearning"]
    assert unl["rounds"] == 1 and unl["comm_bytes"] == 2 * model_bytes  # target only
    unl = mode["cost"]["phases"]["unlearning"]
    # round 1: theta_d to 4 retained nodes and back, theta to 5 (+theta_d to the target)
    # and back; round 2: the guidance exchange again.
    assert unl["bytes_down"] == (4 + 5 + 1 + 5 + 1) * model_bytes
    assert unl["bytes_up"] == (4 + 5 + 5) * model_bytes
    assert unl["forward_samples"] > 0
    assert mode["cost"]["phases"]["recovery"]["rounds"] == 2
    assert mode["params"]["guidance_rounds"] == 2 and puf["params"]["alpha"] == 2.0
    assert "[puf] applied -2.00" in log and "[mode] 2 guidance rounds done" in log


def test_methods_that_remember_training(tmp_path, flwr_env, ckpt):
    """FedEraser, FUKD and PGD: pretraining records the history they need, next to the
    checkpoint; each reports the history files it read as its storage."""
    out = tmp_path / "history"
    log = run({"method": "federaser,fukd,pgd", "pretrain.rounds": 4, "unlearn.rounds": 2,
               "checkpoint-dir": str(ckpt), "server-data.fraction": 0.1,
               "method-params": "fukd.epochs=1 pgd.epochs=1"}, out, flwr_env)
    results = {m: load(out / m / "results.json") for m in ("federaser", "fukd", "pgd")}
    history = Path(results["pgd"]["pretrain"]["history"]["path"])
    files = json.loads((history / "manifest.json").read_text())["files"]
    assert sorted(files) == ["last_local.pt"] + [f"round-0000{r}.pt" for r in (1, 2, 3, 4)] \
        + ["update_sums.pt"]
    read = {"federaser": [f for f in files if f.startswith("round-")],
            "fukd": ["update_sums.pt"], "pgd": ["last_local.pt"]}
    for method, res in results.items():
        check_schema(res, method, stores=True)
        assert res["cost"]["storage_bytes"] == sum(files[f] for f in read[method])
        assert res["notes"]["history"]["files_read"] == read[method]
    fed = results["federaser"]["cost"]["phases"]
    assert fed["unlearning"]["rounds"] == 3 and fed.get("recovery", {}).get("rounds", 0) == 0
    fukd = results["fukd"]["cost"]["phases"]["unlearning"]
    assert fukd["comm_bytes"] == 0 and fukd["server_flops"] > 0  # server only
    assert results["fukd"]["notes"]["distillation"]["server_samples"] == 144
    assert results["pgd"]["cost"]["phases"]["unlearning"]["rounds"] == 1
    assert "recording client updates every 1 round(s)" in log


def test_centralized_setting_runs_the_data_holders_methods(tmp_path, flwr_env, ckpt):
    """One client holding all training data forgets a random 10% (the centralized
    preset, tiny): RandL, GA and FCU run at that client, then recover there."""
    from fedunlearn.launch import load_preset

    out = tmp_path / "centralized"
    rc = dict(load_preset("centralized"), **{
        "method": "randl,ga,fcu", "pretrain.rounds": 4, "unlearn.rounds": 2,
        "checkpoint-dir": str(ckpt),
        "method-params": "randl.epochs=1 fcu.iterations=4 fcu.fusion_interval=2"})
    log = run(rc, out, flwr_env, num_supernodes=1)
    results = {m: load(out / m / "results.json") for m in ("randl", "ga", "fcu")}
    for method, res in results.items():
        check_schema(res, method)
        assert [r["scope"] for r in res["request"]] == ["instance"]
        assert res["config"]["num_clients"] == 1
    model_bytes = results["ga"]["notes"]["target_temporary_bytes"]  # GA keeps one copy
    for method in ("randl", "ga", "fcu"):
        unl = results[method]["cost"]["phases"]["unlearning"]
        assert unl["rounds"] == 1 and unl["comm_bytes"] == 2 * model_bytes
        assert results[method]["cost"]["phases"]["recovery"]["rounds"] == 2
    fcu = results["fcu"]["cost"]["phases"]["unlearning"]
    assert fcu["forward_samples"] == 2 * fcu["train_samples"] > 0  # theta_o and theta_dn
    assert results["fcu"]["notes"]["target_temporary_bytes"] == 2 * model_bytes
    assert "fedunlearn results (centralized: one client holds all training data)" in log
    assert "[gradient_ascent] partition 0:" in log


def test_every_client_forgets_one_class(tmp_path, flwr_env, ckpt):
    out = tmp_path / "class"
    run({"method": "not", "pretrain.rounds": 12, "unlearn.rounds": 8,
         "checkpoint-dir": str(ckpt), "forget.scope": "class", "forget.classes": "3",
         "forget.clients": "0,1,2,3,4"}, out, flwr_env, engine="local")
    res = load(out / "not" / "results.json")
    check_schema(res, "not")
    assert len(res["request"]) == 5
    assert all(r["scope"] == "class" and r["classes"] == [3] for r in res["request"])
    assert res["original"]["forget"] > 80.0
    assert res["unlearned"]["forget"] < 5.0, res["unlearned"]
    assert res["unlearned"]["retain"] > 90.0, res["unlearned"]


def test_bad_request_rejected_and_valid_one_unlearned(tmp_path, flwr_env, ckpt):
    # Clients 1 and 2 both ask to forget instances of partition 1: client 2's request
    # is about another node's data and must be rejected; client 1's goes ahead.
    out = tmp_path / "mixed"
    log = run({"method": "ft", "pretrain.rounds": 2, "unlearn.rounds": 1,
               "checkpoint-dir": str(ckpt), "forget.scope": "instance",
               "forget.clients": "1,2", "forget.fraction": 0.2, "forget.data-of": 1},
              out, flwr_env, engine="local")
    res = load(out / "ft" / "results.json")
    check_schema(res, "ft")
    assert [(r["scope"], r["partition_id"]) for r in res["request"]] == [("instance", 1)]
    assert res["request"][0]["num_samples"] > 0
    assert len(res["rejected"]) == 1
    assert "asked to forget partition 1, which belongs to node" in res["rejected"][0]["reason"]
    assert "REJECTED" in log


def test_only_bad_requests_run_completes(tmp_path, flwr_env, ckpt):
    out = tmp_path / "bad"
    log = run({"method": "not", "pretrain.rounds": 2, "checkpoint-dir": str(ckpt),
               "forget.scope": "class", "forget.classes": "42", "forget.clients": "0,3"},
              out, flwr_env, engine="local")
    payload = load(out / "no-request.json")
    assert len(payload["rejected"]) == 2
    assert all("[42] outside the label set 0..9" in r["reason"] for r in payload["rejected"])
    assert "No valid unlearning request" in log

"""End to end: a real Hydra sweep through `flwr run`, then the report (a few minutes).

2 methods x 2 seeds on `synthetic` with the tiny federation (3 clients, 2 pretraining
rounds, 1 unlearning round): four `flwr run` jobs, each with its own local SuperLink.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from fedunlearn.experiment import report as rep
from fedunlearn.launch import find_processes
from fedunlearn.metrics import METRIC_KEYS, average_gap

pytestmark = pytest.mark.slow


def superlinks_using(marker: str) -> list[int]:
    return find_processes("flower-superlink", marker)


def test_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    flwr_home = tmp_path / "flwr-home"
    env = dict(os.environ, HYDRA_FULL_ERROR="1", FLWR_HOME=str(flwr_home),
               FEDUNLEARN_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "fedunlearn.experiment", "-m",
           "method=retrain,not", "seed=0,1", "dataset=synthetic", "federation=tiny",
           "federation.num_supernodes=3", f"checkpoint_dir={tmp_path / 'ckpt'}",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert not superlinks_using(str(flwr_home)), "a local SuperLink was left running"

    # progress: job i/4, the phase lines (the rounds drive the progress bar and stay in
    # each job's flwr.log), nothing failed
    for i in range(1, 5):
        assert f"=== job {i}/4, {4 - i} after this one" in proc.stdout
    assert "[pretrain]" in proc.stdout and "[retrain] unlearned" in proc.stdout
    assert "[not] negated" in proc.stdout
    assert "[retrain] round" not in proc.stdout and "fedunlearn-progress" not in proc.stdout
    assert any("[retrain] round" in p.read_text() for p in sweep.rglob("flwr.log"))
    assert not list(sweep.rglob("error.txt")), out[-4000:]

    # one job dir per job, results.json in it, shared pretrained models
    results = {}
    for path in sorted(sweep.rglob("results.json")):
        data = json.loads(path.read_text())
        job_dir = path.parent.parent  # <job>/<method>/results.json, one method or many
        assert path.parent.name == data["method"]
        assert (job_dir / "flwr.log").exists() and (job_dir / "run_config.json").exists()
        assert (job_dir / ".hydra" / "config.yaml").exists()
        rc = json.loads((job_dir / "run_config.json").read_text())["run_config"]
        assert rc["output-dir"] == str(job_dir) and rc["checkpoint-dir"] == str(tmp_path / "ckpt")
        assert data["config"]["num_clients"] == 3 and data["config"]["dataset"] == "synthetic"
        results[(data["method"], data["config"]["seed"])] = data
    assert sorted(results) == [("not", 0), ("not", 1), ("retrain", 0), ("retrain", 1)]
    # jobs run in order retrain/0, retrain/1, not/0, not/1: NoT reuses the cached model
    assert all(results[("not", s)]["pretrain"]["cached"] for s in (0, 1))
    assert len(list((tmp_path / "ckpt").glob("*.pt"))) == 2  # one per seed

    # the report written at the end of the sweep, and the CLI on the same dir
    assert (sweep / "report" / "summary.md").exists()
    cli = subprocess.run([sys.executable, "-m", "fedunlearn.experiment.report", str(sweep),
                          "--out", str(tmp_path / "report")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    group_dirs = [p for p in (tmp_path / "report").iterdir() if p.is_dir()]
    assert len(group_dirs) == 1
    with open(group_dirs[0] / "summary.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["retrain", "not"]
    means = {m: {k: statistics.fmean(results[(m, s)]["unlearned"][k] for s in (0, 1))
                 for k in METRIC_KEYS} for m in ("retrain", "not")}
    for method, row in rows.items():
        assert row["seeds"] == "2" and row["ratio"] == f"{1 / 3:g}"
        for k in METRIC_KEYS:
            vals = [results[(method, s)]["unlearned"][k] for s in (0, 1)]
            assert float(row[f"{k}_mean"]) == pytest.approx(statistics.fmean(vals))
            assert float(row[f"{k}_std"]) == pytest.approx(statistics.stdev(vals))
            assert float(row[f"{k}_delta"]) == pytest.approx(
                abs(means[method][k] - means["retrain"][k]))
        assert float(row["avg_gap"]) == pytest.approx(
            average_gap(means[method], means["retrain"]), abs=1e-9)
        assert float(row["comm_bytes"]) == pytest.approx(
            statistics.fmean(results[(method, s)]["cost"]["comm_bytes"] for s in (0, 1)))
    assert rows["not"]["best"] == "★" and rows["retrain"]["best"] == ""
    md = (group_dirs[0] / "summary.md").read_text()
    assert f"**{float(rows['not']['avg_gap']):.2f}** ★" in md
    assert (group_dirs[0] / "metrics.png").stat().st_size > 10_000
    assert "| Retrain |" in cli.stdout
    assert rep.load_results(sweep) and len(rep.load_results(sweep)) == 4

"""Relearn time over seeds in the forgetting audit's report: jobs that measured
``audit.relearn-rounds`` (results.json's ``relearn``) give a table per setting with the
share relearned within N, the median (censored ``>N``) and a mean ± 95% CI only when
every seed relearned; jobs without it give none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedunlearn.experiment.report import write_forgetting_audit
from tests.test_report_forgetting import k_seed_dir

SEEDS = range(4)
#: rounds until relearned per seed (None: not within 10); FT relearns fast, Retrain slowly
ROUNDS = {"retrain": [None, 8, None, None], "ft": [1, 2, 1, 2]}


def add_relearn(root: Path, rounds: dict = ROUNDS, max_rounds: int = 10) -> None:
    for seed in SEEDS:
        for method, per_seed in rounds.items():
            path = root / f"seed{seed}" / method / "results.json"
            r = json.loads(path.read_text())
            n = per_seed[seed]
            r["relearn"] = {"rounds_max": max_rounds, "rounds": n, "metric": "forget",
                            "target": 99.0, "tolerance": 0.0,
                            "curve": [[0, 96.0]] + ([[n, 99.0]] if n else [])}
            path.write_text(json.dumps(r))


def test_relearn_table_over_seeds(tmp_path):
    root = k_seed_dir(tmp_path / "iid-client", SEEDS)
    add_relearn(root)
    report = write_forgetting_audit(root, splits=5, formats="png")
    md = (report.out_dir / "forgetting-audit.md").read_text()
    assert "Relearn time over seeds" in md and "forget accuracy" in md
    ft = next(line for line in md.splitlines() if line.startswith("| FT |") and "within" in line)
    assert "4/4 within 10" in ft and "| 1.5 |" in ft and "1.50 ±" in ft
    retrain = next(line for line in md.splitlines()
                   if line.startswith("| Retrain (30 rounds) |") and "within" in line)
    # three of four seeds censored: the median is censored too, and no mean is given
    assert "1/4 within 10" in retrain and "| >10 |" in retrain and retrain.endswith("| — |")
    data = json.loads((report.out_dir / "forgetting-audit.json").read_text())
    ft_json = data["settings"][0]["relearn"]["FT"]
    assert ft_json["rounds"] == [1, 2, 1, 2] and ft_json["median"] == 1.5
    assert data["settings"][0]["relearn"]["Retrain (30 rounds)"]["mean"] is None


def test_no_relearn_no_table(tmp_path):
    report = write_forgetting_audit(k_seed_dir(tmp_path / "iid-client", SEEDS), splits=5,
                                    formats="png")
    assert "Relearn time" not in report.markdown
    assert report.data["settings"][0]["relearn"] == {}


def test_seeds_relearning_different_metrics_are_refused(tmp_path):
    root = k_seed_dir(tmp_path / "iid-client", SEEDS)
    add_relearn(root)
    path = root / "seed1" / "ft" / "results.json"
    r = json.loads(path.read_text())
    r["relearn"]["metric"] = "asr"
    path.write_text(json.dumps(r))
    with pytest.raises(ValueError, match=r"different metrics \['asr', 'forget'\]"):
        write_forgetting_audit(root)

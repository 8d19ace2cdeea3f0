"""Per-round trajectories (eval.trajectory): every method measured after its unlearning
step and after every round, with the Avg. Gap to Retrain's final metrics, and nothing
else of the job changed by the measuring."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fedunlearn.engine import local_run

SMALL = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 2,
         "unlearn.rounds": 2, "eval.mia-max-members": 40, "method": "retrain,not"}


def _job(tmp_path, name: str, **extra) -> dict:
    out = tmp_path / name
    rc = local_run({**SMALL, **extra, "output-dir": str(out),
                    "checkpoint-dir": str(tmp_path / "ck")},
                   num_supernodes=3, log_file=tmp_path / f"{name}.log", echo=False)
    assert rc == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
    return {m: json.loads((out / m / "results.json").read_text()) for m in ("retrain", "not")}


def test_every_round_is_measured_and_the_job_is_otherwise_the_same(tmp_path):
    traced = _job(tmp_path, "traced", **{"eval.trajectory": True})
    plain = _job(tmp_path, "plain")
    for method in ("retrain", "not"):
        assert traced[method]["unlearned"] == plain[method]["unlearned"]
        assert traced[method]["cost"]["comm_bytes"] == plain[method]["cost"]["comm_bytes"]
        assert "trajectory" not in plain[method]
    not_points = traced["not"]["trajectory"]["not"]
    assert [p["round"] for p in not_points] == [0, 1, 2]
    retrain_final = traced["retrain"]["unlearned"]
    for point in not_points:
        assert set(point) >= {"round", "retain", "forget", "test", "mia", "gap"}
        expected = sum(abs(point[k] - retrain_final[k]) for k in
                       ("retain", "forget", "test", "mia")) / 4
        assert point["gap"] == pytest.approx(expected, abs=1e-3)
    # the last point is the unlearned model itself
    assert {k: not_points[-1][k] for k in retrain_final} == pytest.approx(
        traced["not"]["unlearned"])
    # every method's model is saved (its hash in results.json), and with the trajectory
    # the model NoT's unlearning step made: the pretrained model with conv1 negated
    from fedunlearn import load_model
    from fedunlearn.audit import model_digest

    for method in ("retrain", "not"):
        saved = traced[method]["model"]
        assert model_digest(load_model(saved["path"])) == saved["arrays_sha256"]
        assert hashlib.sha256(Path(saved["path"]).read_bytes()).hexdigest() == saved["sha256"]
    negated = load_model(tmp_path / "traced" / "not" / "model-round0.pt")
    pretrained = torch.load(traced["not"]["pretrain"]["path"], weights_only=True)["state"]
    assert torch.equal(torch.from_numpy(negated["conv1.weight"].numpy()), -pretrained["conv1.weight"])
    assert torch.equal(torch.from_numpy(negated["fc2.weight"].numpy()), pretrained["fc2.weight"])
    retrain_points = traced["retrain"]["trajectory"]["retrain"]
    assert [p["round"] for p in retrain_points] == [0, 1, 2]
    assert retrain_points[-1]["gap"] == pytest.approx(0.0, abs=1e-6)


def test_the_report_draws_cka_from_the_saved_models(tmp_path):
    """``fedunlearn-report`` on a job with trajectories: the NoT paper's Figure 3 (CKA of
    each layer to the original model) from the models the job saved."""
    from fedunlearn.experiment.report import write_report

    _job(tmp_path, "traced", **{"eval.trajectory": True})
    report = write_report(tmp_path / "traced")
    pngs = [p for p in report.files if p.name == "cka.png"]
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (pngs[0].parent.parent / "summary.md").read_text()
    assert "CKA to the original model" in text and "NoT@0" in text and "Retrain@end" in text
    # negation flips the first layer's sign: linear CKA does not see a sign
    row = next(line for line in text.splitlines() if line.startswith("| conv1 "))
    assert float(row.split("|")[2]) == 1.0

"""Trigger points: with a backdoor, ``outputs.npz`` (``audit.outputs=true``) carries the
ASR's samples, stamped as the ASR stamps them and labelled with the backdoor's target, and
the forgetting audit audits them beside the forget, retain and test points; without a
backdoor nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.engine import local_run
from fedunlearn.experiment.report import write_forgetting_audit
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.outputs import OUTPUTS_FILE
from fedunlearn.samples import labels_of

SMALL = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 4,
         "unlearn.rounds": 2, "eval.mia-max-members": 40, "method": "retrain,ft",
         "partition-seed": 0, "audit.outputs": True}
BACKDOOR = {"backdoor.clients": "0", "forget.clients": "0", "backdoor.target": 1}
BASE_KEYS = {f"{part}_{name}" for name in ("forget", "retain", "test")
             for part in ("original", "model")} | {
    f"{name}_{part}" for name in ("forget", "retain", "test") for part in ("ids", "labels")} | {
    "method", "seed", "partition_seed"}
TRIGGER_KEYS = {"trigger_ids", "trigger_labels", "original_trigger", "model_trigger"}


def _job(tmp: Path, name: str, **extra) -> Path:
    out = tmp / name
    rc = local_run({**SMALL, **extra, "output-dir": str(out), "checkpoint-dir": str(tmp / "ck")},
                   num_supernodes=3, log_file=tmp / f"{name}.log", echo=False)
    assert rc == 0, (tmp / f"{name}.log").read_text()[-2000:]
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trigger")
    return _job(tmp, "backdoor", **BACKDOOR), _job(tmp, "plain")


def test_a_backdoor_job_writes_the_asr_samples_as_trigger_points(jobs):
    backdoor, _ = jobs
    test_labels = labels_of(federated_data(
        ExperimentConfig.from_run_config({**SMALL, **BACKDOOR})).test)
    asr_samples = np.flatnonzero(test_labels != 1)  # true label not the target
    for method in ("retrain", "ft"):
        with np.load(backdoor / method / OUTPUTS_FILE) as blob:
            z = {key: blob[key] for key in blob.files}
        result = json.loads((backdoor / method / "results.json").read_text())
        assert set(z) == BASE_KEYS | TRIGGER_KEYS
        assert np.array_equal(z["trigger_ids"], asr_samples)
        # labelled with the target: the label the trigger was trained to give
        assert (z["trigger_labels"] == 1).all() and z["trigger_labels"].size == asr_samples.size
        assert z["model_trigger"].shape == z["original_trigger"].shape == (asr_samples.size, 10)
        # stamped: the same samples' logits differ from the clean test logits ...
        assert not np.allclose(z["model_trigger"], z["model_test"][asr_samples])
        # ... exactly as the ASR stamps them: the ASR is recomputed from the logits
        for model, record in (("model", "unlearned"), ("original", "original")):
            asr = 100.0 * np.mean(z[f"{model}_trigger"].argmax(1) == 1)
            assert asr == pytest.approx(result[record]["asr"], abs=1e-4), (method, model)
    # the backdoor is there to forget: the original sends many trigger points to it
    assert result["original"]["asr"] > 20


def test_without_a_backdoor_outputs_npz_has_no_trigger_keys(jobs):
    _, plain = jobs
    for method in ("retrain", "ft"):
        with np.load(plain / method / OUTPUTS_FILE) as blob:
            assert set(blob.files) == BASE_KEYS


# -- the report, on hand-made outputs -------------------------------------------------

CLASSES, TARGET = 4, 0
SIZES = {"forget": 20, "retain": 30, "test": 24, "trigger": 18}
LABELS = {"forget": np.arange(20) % 4, "retain": np.arange(30) % 4, "test": np.arange(24) % 4,
          "trigger": np.full(18, 0)}  # the trigger points carry the target (TARGET = 0)
IDS = {"forget": np.arange(100, 120), "retain": np.arange(200, 230), "test": np.arange(24),
       "trigger": np.flatnonzero(np.arange(24) % 4 != TARGET)}


def _logits(noise: int, backdoored: bool) -> dict[str, np.ndarray]:
    """Every model: one per-example base, seed noise, the labelled class favoured; a
    backdoored model pushes the trigger points much further to the target class."""
    out = {}
    for i, (name, n) in enumerate(SIZES.items()):
        z = np.random.default_rng(70 + i).normal(0, 1, (n, CLASSES))
        z += np.random.default_rng([noise, i]).normal(0, 0.5, (n, CLASSES))
        z[np.arange(n), LABELS[name]] += 2.0
        if backdoored and name == "trigger":
            z[:, TARGET] += 5.0
        out[name] = z.astype(np.float32)
    return out


def _write(folder: Path, method: str, seed: int, noise: int, backdoored: bool,
           trigger: bool = True) -> None:
    d = folder / method
    d.mkdir(parents=True, exist_ok=True)
    metrics = {"retain": 97.0, "forget": 96.0, "test": 95.0, "mia": 50.0,
               "asr": 60.0 if backdoored else 0.5}
    cfg = {"methods": [method], "seed": seed, "dataset": "digits", "model": "cnn",
           "num_clients": 10, "partitioning": "iid", "pretrain_rounds": 30,
           "unlearn_rounds": 11, "forget": {"scope": "client", "clients": [0]},
           "backdoor": {"clients": [0], "target": TARGET}}
    (d / "results.json").write_text(json.dumps({
        "method": method, "seed": seed, "partition_seed": 0, "config": cfg,
        "request": [{"scope": "client", "partition_id": 0}],
        "original": {**metrics, "asr": 60.0}, "unlearned": metrics, "params": {},
        "cost": {"rounds": 30, "comm_bytes": 1.0, "flops": 1.0},
        "forget_ids": IDS["forget"].tolist(),
        "reference": {"method": "retrain", "budget": "pretrain", "rounds": 30}}))
    mine, original = _logits(noise, backdoored), _logits(10_000 + seed, True)
    blob = {"method": np.array(method), "seed": np.array(seed), "partition_seed": np.array(0)}
    for name in SIZES if trigger else ("forget", "retain", "test"):
        blob[f"{name}_ids"] = IDS[name].astype(np.int64)
        blob[f"{name}_labels"] = LABELS[name].astype(np.int64)
        blob[f"original_{name}"] = original[name]
        blob[f"model_{name}"] = mine[name]
    np.savez_compressed(d / OUTPUTS_FILE, **blob)


def _k_seeds(root: Path, seeds, trigger_from: int = 0) -> Path:
    """Per seed: Retrain, FT that kept the backdoor, NoT that is a Retrain of another
    seed; seeds before ``trigger_from`` have outputs without trigger points."""
    for seed in seeds:
        trigger = seed >= trigger_from
        _write(root / f"seed{seed}", "retrain", seed, seed, False, trigger)
        _write(root / f"seed{seed}", "ft", seed, 500 + seed, True, trigger)
        _write(root / f"seed{seed}", "not", seed, 900 + seed, False, trigger)
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = _k_seeds(tmp_path_factory.mktemp("kseed") / "backdoor", range(12))
    return root, write_forgetting_audit(root, root / "report", splits=10, formats="png")


def test_a_method_that_kept_the_backdoor_stands_out_on_trigger_points(audited):
    _, report = audited
    (setting,) = report.settings
    assert setting.sizes == SIZES
    audits = setting.audits["Retrain (30 rounds)"]
    kept, other_retrain = audits["FT"]["trigger"], audits["NoT"]["trigger"]
    assert kept.attack["auc"] > 0.95 > kept.attack_floor["auc"] + 0.3
    assert kept.share_above_floor > 0.5 and kept.klom["p50"] > kept.klom_floor["p95"]
    assert abs(other_retrain.attack["auc"] - other_retrain.attack_floor["auc"]) < 0.12
    assert other_retrain.share_above_floor < 0.2
    # on the clean points the backdoored FT is a Retrain of another seed too
    assert audits["FT"]["test"].attack["auc"] < 0.7


def test_trigger_rows_in_the_tables_json_and_figures(audited):
    root, report = audited
    md = report.markdown
    assert "| trigger (18) | floor: Retrain (30 rounds) vs itself | 6 + 6 |" in md
    assert "| trigger (18) | FT | 12 |" in md and "**trigger** points: the ASR's samples" in md
    (entry,) = json.loads((root / "report" / "forgetting-audit.json").read_text())["settings"]
    assert entry["points"] == SIZES
    assert set(entry["audits"]["Retrain (30 rounds)"]["FT"]["point_sets"]) == set(SIZES)
    assert (root / "report" / entry["slug"] / "forgetting_klom.png").is_file()
    # the scalar table is that of the other point sets' audits: ASR as a column
    assert "| FT | 12 | 97.00 ± 0.00 | 96.00 ± 0.00 | 95.00 ± 0.00 | 50.00 ± 0.00 | " \
           "60.00 ± 0.00 |" in md


def test_mixed_outputs_audit_the_shared_sets_and_say_so(audited, tmp_path):
    _, full = audited
    root = _k_seeds(tmp_path / "backdoor", range(12), trigger_from=4)
    report = write_forgetting_audit(root, tmp_path / "out", splits=10, formats="png")
    (setting,) = report.settings
    assert list(setting.sizes) == ["forget", "retain", "test"]
    assert "trigger points: only 24 of the 36 outputs.npz files carry them" in report.markdown
    assert "audited the point sets all files share: forget, retain, test" in report.markdown
    assert "| trigger (" not in report.markdown and "**trigger** points" not in report.markdown
    # the shared sets read the same with or without the trigger set beside them
    for name in ("forget", "retain", "test"):
        a = setting.audits["Retrain (30 rounds)"]["FT"][name]
        b = full.settings[0].audits["Retrain (30 rounds)"]["FT"][name]
        assert (a.klom, a.attack) == (b.klom, b.attack)

"""The forgetting audit over seeds in the report: a hand-made K-seed directory in the
layout of bench/forgetting_audit.py (results.json + outputs.npz as the harness writes
them), audited against both Retrain references, through the function, fedunlearn-report
and the bench script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedunlearn import mean_ci
from fedunlearn.experiment.report import main as report_main
from fedunlearn.experiment.report import write_forgetting_audit
from fedunlearn.harness.outputs import OUTPUTS_FILE
from tests.helpers import bench_module

SIZES = {"forget": 30, "retain": 40, "test": 30}
CLASSES = 4
LABELS = {name: np.random.default_rng(i).integers(0, CLASSES, n)
          for i, (name, n) in enumerate(SIZES.items())}
IDS = {"forget": np.arange(100, 130), "retain": np.arange(200, 240), "test": np.arange(30)}


def logits(seed: int, shift: float) -> dict[str, np.ndarray]:
    """A model's logits: the same per-example base for every model, seed noise, and
    ``shift`` added to the true class (an over-confident model: one that remembers)."""
    out = {}
    for i, (name, n) in enumerate(SIZES.items()):
        base = np.random.default_rng(1000 + i).normal(0, 1, (n, CLASSES))
        z = base + np.random.default_rng([seed, i]).normal(0, 0.5, (n, CLASSES))
        z[np.arange(n), LABELS[name]] += 2.0 + shift
        out[name] = z.astype(np.float32)
    return out


def result(method: str, seed: int, *, matched: bool = False) -> dict:
    cfg = {"methods": [method], "seed": seed, "dataset": "digits", "model": "cnn",
           "num_clients": 10, "partitioning": "iid", "pretrain_rounds": 30,
           "unlearn_rounds": 11, "forget": {"scope": "client", "clients": [0]}}
    metrics = {"retain": 97.0 + seed % 3, "forget": 96.0 + seed % 2, "test": 95.0,
               "mia": 50.0 + seed % 4}
    rounds = 41 if matched else 30
    return {"method": method, "seed": seed, "partition_seed": 0,
            "request": [{"scope": "client", "partition_id": 0}],
            "original": {"retain": 98.0, "forget": 99.0 - seed % 2, "test": 95.5, "mia": 55.0},
            "unlearned": metrics, "params": {"budget": "matched"} if matched else {},
            "cost": {"rounds": rounds, "comm_bytes": 1.0, "flops": 1.0},
            "forget_ids": IDS["forget"].tolist(),
            "reference": {"method": "retrain", "budget": "matched" if matched else "pretrain",
                          "rounds": rounds}, "config": cfg}


def write_job(folder: Path, method: str, seed: int, noise: int, shift: float,
              matched: bool = False):
    """``<folder>/<method>/{results.json, outputs.npz}`` of training seed ``seed`` (the
    model's logits drawn with ``noise``), outputs.npz with the keys and dtypes
    harness/outputs.py's PerExampleOutputs.write gives it."""
    d = folder / method
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(result(method, seed, matched=matched)))
    mine, original = logits(noise, shift), logits(10_000 + seed, 3.0)
    blob = {"method": np.array(method), "seed": np.array(seed), "partition_seed": np.array(0)}
    for name in SIZES:
        blob[f"{name}_ids"] = IDS[name].astype(np.int64)
        blob[f"{name}_labels"] = LABELS[name].astype(np.int64)
        blob[f"original_{name}"] = original[name]
        blob[f"model_{name}"] = mine[name]
    np.savez_compressed(d / OUTPUTS_FILE, **blob)


def k_seed_dir(root: Path, seeds) -> Path:
    """seed<k>/{retrain, ft} (ft: Retrain's distribution, other seeds) and
    seed<k>-matched/retrain, as bench/forgetting_audit.py lays them out."""
    for seed in seeds:
        write_job(root / f"seed{seed}", "retrain", seed, seed, 0.0)
        write_job(root / f"seed{seed}", "ft", seed, 500 + seed, 0.0)
        write_job(root / f"seed{seed}-matched", "retrain", seed, 900 + seed, 0.0, matched=True)
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = k_seed_dir(tmp_path_factory.mktemp("kseed") / "iid-client", range(0, 24, 2))
    return root, write_forgetting_audit(root, root / "report", splits=10)


def test_tables_name_the_reference_k_and_the_floor(audited):
    root, report = audited
    md = (root / "report" / "forgetting-audit.md").read_text()
    assert md == report.markdown
    assert "K = 12 seeds (0, 2, …, 22), partition seed 0" in md
    assert "### Against Retrain (30 rounds), K = 12" in md
    assert "### Against Retrain (matched, 41 rounds), K = 12" in md
    assert "| forget (30) | floor: Retrain (30 rounds) vs itself | 6 + 6 |" in md
    assert "| test (30) | Original | 12 |" in md and "| retain (40) | FT | 12 |" in md
    data = json.loads((root / "report" / "forgetting-audit.json").read_text())
    (setting,) = data["settings"]
    assert setting["references"] == ["Retrain (30 rounds)", "Retrain (matched, 41 rounds)"]
    assert sorted(setting["audits"]["Retrain (30 rounds)"]) == [
        "FT", "Original", "Retrain (matched, 41 rounds)"]
    one = setting["audits"]["Retrain (30 rounds)"]["FT"]["point_sets"]["forget"]
    assert {"klom", "klom_floor", "attack", "attack_floor", "roc"} <= set(one)
    assert len(one["roc"]["fpr"]) == len(one["roc"]["tpr"]) == len(one["roc"]["floor_tpr"])


def test_scalars_are_mean_and_95ci_over_seeds(audited):
    root, report = audited
    seeds = range(0, 24, 2)
    want = mean_ci([97.0 + s % 3 for s in seeds])
    got = report.data["settings"][0]["scalars"]["FT"]["retain"]
    assert got["n"] == 12 and got["mean"] == pytest.approx(want.mean)
    assert got["half_width"] == pytest.approx(want.half_width)
    original = mean_ci([99.0 - s % 2 for s in seeds])
    assert f"| Original | 12 | 98.00 ± 0.00 | {original} |" in report.markdown


def test_retrains_distribution_sits_at_the_floor_and_the_original_above(audited):
    _, report = audited
    for ref in ("Retrain (30 rounds)", "Retrain (matched, 41 rounds)"):
        audits = report.settings[0].audits[ref]
        for name in ("forget", "retain", "test"):
            same, original = audits["FT"][name], audits["Original"][name]
            assert abs(same.attack["auc"] - same.attack_floor["auc"]) < 0.12, (ref, name)
            assert same.share_above_floor < 0.2
            assert original.attack["auc"] > 0.95 > original.attack_floor["auc"] + 0.3
            assert original.share_above_floor > max(0.3, 3 * same.share_above_floor)
            assert original.klom["p50"] > original.klom_floor["p50"] >= same.klom["p50"] - 0.3


def test_figures_are_png_and_pdf(audited):
    root, report = audited
    slug = report.settings[0].group.slug
    for name in ("forgetting_klom", "forgetting_roc"):
        for ext in ("png", "pdf"):
            path = root / "report" / slug / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 5000 and path in report.files
        assert f"]({slug}/{name}.png)" in report.markdown


def test_fewer_than_four_seeds_says_why_in_the_cli_and_the_hydra_report(tmp_path, capsys):
    root = k_seed_dir(tmp_path / "few", (0, 1, 2))
    report = write_forgetting_audit(root, tmp_path / "out")
    assert not report.settings
    (title, reason), = report.skipped
    assert "outputs.npz from 3 seed(s) (0, 1, 2)" in reason and "at least 4" in reason
    assert report_main([str(root), "--out", str(tmp_path / "cli")]) == 0
    said = capsys.readouterr().out
    assert "Not computed: outputs.npz from 3 seed(s) (0, 1, 2)" in said
    assert json.loads((tmp_path / "cli" / "forgetting-audit.json").read_text())["skipped"]
    # the Hydra runner's report at the end of a sweep is the same report
    from omegaconf import OmegaConf

    from fedunlearn.experiment.runner import ReportCallback

    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}},
                                                       "report": True}))
    said = capsys.readouterr().out
    assert "## Forgetting audit" in said and "Not computed: outputs.npz from 3 seed(s)" in said


def test_no_outputs_and_bad_sources_are_refused(tmp_path):
    k_seed_dir(tmp_path / "k", (0,))
    for npz in (tmp_path / "k").rglob(OUTPUTS_FILE):
        npz.unlink()
    with pytest.raises(ValueError, match="audit.outputs=true"):
        write_forgetting_audit(tmp_path / "k")
    with pytest.raises(ValueError, match="does not exist"):
        write_forgetting_audit(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="empty list"):
        write_forgetting_audit([])


def test_a_list_of_result_dirs_and_fedunlearn_report(tmp_path, capsys):
    root = k_seed_dir(tmp_path / "k", range(4))
    dirs = [root / f"seed{s}" for s in range(4)] + [root / f"seed{s}-matched" for s in range(4)]
    report = write_forgetting_audit(dirs, tmp_path / "from-list", splits=5)
    assert [m.k for m in report.settings[0].model_sets] == [4, 4, 4, 4]
    assert report_main([str(root), "--formats", "png"]) == 0
    said = capsys.readouterr().out
    assert "## Forgetting audit" in said and "#### Against Retrain (30 rounds), K = 4" in said
    summary = (root / "report" / "summary.md").read_text()
    assert "#### Against Retrain (matched, 41 rounds), K = 4" in summary
    assert (root / "report" / report.settings[0].group.slug / "forgetting_roc.png").is_file()


def test_bench_script_runs_four_seeds_and_reports(tmp_path, capsys):
    """Real outputs: 4 seeds of a tiny in-process job (retrain + ft), then the report."""
    forgetting_audit = bench_module("forgetting_audit")
    tiny = ["dataset.name=synthetic", "federation.num-clients=3", "pretrain.rounds=2",
            "unlearn.rounds=2", "eval.mia-max-members=40"]
    args = ["--seeds", "4", "--methods", "retrain,ft", "--out", str(tmp_path),
            "--checkpoint-dir", str(tmp_path / "ck"), *tiny]
    assert forgetting_audit.main(args) == 0
    said = capsys.readouterr().out
    assert "### Against Retrain (2 rounds), K = 4" in said
    assert "Forgetting audit written to" in said
    report = tmp_path / "iid-client" / "report"
    data = json.loads((report / "forgetting-audit.json").read_text())
    (setting,) = data["settings"]
    assert setting["seeds"] == [0, 1, 2, 3]
    assert sorted(setting["audits"]["Retrain (2 rounds)"]) == ["FT", "Original"]
    assert all(p.is_file() for p in (report / setting["slug"]).glob("forgetting_*.pdf"))

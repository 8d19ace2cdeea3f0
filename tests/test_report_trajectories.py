"""fedunlearn-report on trajectories (eval.trajectory=true): Avg. Gap to Retrain against
rounds per NoT perturbation and per perturbed layer selection (the NoT paper's Figures 4
and 5), the gap computed from a separate Retrain result when the trajectory has none."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from fedunlearn.experiment import report as rep

KEYS = ("retain", "forget", "test", "mia")
# Retrain's final metrics per seed (a separate job each: method=retrain).
RETRAIN = {0: {"retain": 90.0, "forget": 80.0, "test": 85.0, "mia": 50.0},
           1: {"retain": 92.0, "forget": 82.0, "test": 86.0, "mia": 50.0}}
# (perturbation, layer) -> seed -> the Avg. Gap to that seed's Retrain at rounds 0..3.
GAPS = {("negate", "conv1"): {0: [40.0, 20.0, 10.0, 5.0], 1: [44.0, 22.0, 12.0, 7.0]},
        ("reinit", "conv1"): {0: [60.0, 30.0, 15.0, 9.0], 1: [62.0, 34.0, 17.0, 11.0]},
        ("none", "conv1"): {0: [3.0, 2.0, 1.5, 1.0], 1: [5.0, 2.0, 2.5, 2.0]},
        ("negate", "fc1"): {0: [30.0, 15.0, 8.0, 4.0], 1: [34.0, 17.0, 10.0, 6.0]}}


def point_at(ref: dict, gap: float) -> dict:
    """Metrics whose mean |difference| to ``ref`` is ``gap`` (mixed signs and sizes)."""
    return {"retain": ref["retain"] - 2 * gap, "forget": ref["forget"],
            "test": ref["test"] - gap, "mia": ref["mia"] + gap}


def result(method, seed, unlearned, *, num_clients=10, trajectory=None, params=None,
           notes=None, negate_layers=()):
    cfg = {"methods": [method], "seed": seed, "dataset": "digits", "model": "cnn",
           "num_clients": num_clients, "partitioning": "iid", "pretrain_rounds": 30,
           "unlearn_rounds": 3, "unlearn_lr": 0.01, "negate_layers": list(negate_layers),
           "negate_bias": True, "eval_trajectory": trajectory is not None,
           "forget": {"scope": "client", "clients": [0], "classes": [], "fraction": 0.1,
                      "sample_ids": [], "data_of": -1}}
    out = {"method": method, "request": [{"scope": "client", "partition_id": 0}],
           "original": {"retain": 99.0, "forget": 99.0, "test": 95.0, "mia": 60.0},
           "unlearned": dict(unlearned), "params": params or {}, "notes": notes or {},
           "cost": {"rounds": 3, "comm_bytes": 1e6, "bytes_down": 5e5, "bytes_up": 5e5,
                    "flops": 1e9, "wall_s": 1.0, "storage_bytes": 0},
           "config": cfg}
    if trajectory is not None:
        out["trajectory"] = trajectory
    return out


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def not_result(perturbation, layer, seed, *, with_gap=False, num_clients=10):
    ref = RETRAIN[seed]
    points = []
    for rnd, gap in enumerate(GAPS[(perturbation, layer)][seed]):
        if with_gap:
            # The job's own gap (Retrain earlier in the job): the report must take it, not
            # recompute it, so the metrics here are deliberately Retrain's (gap 0 if recomputed).
            points.append({"round": rnd, **ref, "gap": gap})
        else:
            points.append({"round": rnd, **point_at(ref, gap), "gap": None})
    unlearned = {k: v for k, v in points[-1].items() if k in KEYS}
    return result("not", seed, unlearned, num_clients=num_clients,
                  trajectory={"not": points},
                  params={"perturbation": perturbation, "noise_scale": 1.0, "rotation": 90},
                  notes={"perturbation": perturbation,
                         "perturbed": [f"{layer}.weight", f"{layer}.bias"]},
                  negate_layers=() if layer == "conv1" else (layer,))


def write_root(root):
    for seed in (0, 1):
        write(root / f"retrain_{seed}" / "results.json", result("retrain", seed, RETRAIN[seed]))
        for perturbation, layer in GAPS:
            # fc1 seed 0: the gap is in the trajectory; every other one lacks it.
            with_gap = layer == "fc1" and seed == 0
            write(root / f"not_{perturbation}_{layer}_{seed}" / "results.json",
                  not_result(perturbation, layer, seed, with_gap=with_gap))


def table_line(md: str, section: str, label: str) -> str:
    block = md.split(section, 1)[1]
    return next(line for line in block.splitlines() if line.startswith(f"| {label} |"))


def test_gap_against_rounds_by_perturbation_and_layer(tmp_path):
    write_root(tmp_path)
    report = rep.write_report(tmp_path)
    assert report is not None and len(report.groups) == 1
    gdir = report.out_dir / report.groups[0].slug
    for name in ("gap_by_perturbation.png", "gap_by_layer.png"):
        png = gdir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert png in report.files
    md = (gdir / "summary.md").read_text()
    assert "Avg. Gap to Retrain over rounds" in md
    # every gap except fc1 seed 0's was computed here from the separate Retrain results
    assert "The gap of 7 trajectory(ies) was computed here" in md

    by_pert = "By perturbation (perturbed layers: conv1)"
    by_layer = "By perturbed layers (perturbation: negate)"
    # lines: one per perturbation at conv1 (paper order), one per layer selection at negate
    for section, labels in ((by_pert, ["negate", "none", "reinit"]),
                            (by_layer, ["conv1", "fc1"])):
        block = md.split(section, 1)[1].split("![", 1)[0]
        assert [line.split(" | ")[0][2:] for line in block.splitlines()
                if line.startswith("| ") and not line.startswith("| Pert")] == labels
        head = next(line for line in block.splitlines() if line.startswith("| Pert"))
        assert head.endswith("| Seeds | Round 0 | Round 1 | Round 2 | End |")

    for section, (pert, layer) in ((by_pert, ("negate", "conv1")),
                                   (by_pert, ("reinit", "conv1")),
                                   (by_pert, ("none", "conv1")),
                                   (by_layer, ("negate", "conv1")),
                                   (by_layer, ("negate", "fc1"))):
        label = pert if section == by_pert else layer
        seeds = GAPS[(pert, layer)]
        line = table_line(md, section, label)
        start = [seeds[0][0], seeds[1][0]]
        end = [seeds[0][-1], seeds[1][-1]]
        # by hand: e.g. negate/conv1 round 0: (40 + 44) / 2 = 42, sample std = 2.83
        assert f"| 2 | {statistics.fmean(start):.2f} ± {statistics.stdev(start):.2f} |" in line
        assert line.endswith(f"| {statistics.fmean(end):.2f} ± {statistics.stdev(end):.2f} "
                             "(round 3) |")
    assert table_line(md, by_pert, "negate").startswith(
        "| negate | 2 | 42.00 ± 2.83 | 21.00 ± 1.41 | 11.00 ± 1.41 | 6.00 ± 1.41 (round 3) |")
    # fc1: seed 0's gap from the job (30; recomputing would give 0), seed 1's from Retrain
    assert table_line(md, by_layer, "fc1").startswith("| fc1 | 2 | 32.00 ± 2.83 |")

    with open(gdir / "gap_trajectory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["figure"], r["label"], int(r["round"])): r for r in rows}
    for (pert, layer), seeds in GAPS.items():
        for rnd in range(4):
            vals = [seeds[0][rnd], seeds[1][rnd]]
            fig = ("gap_by_layer.png", layer) if pert == "negate" else None
            for key in ([("gap_by_perturbation.png", pert)] if layer == "conv1" else []) + (
                    [fig] if fig else []):
                row = got[(*key, rnd)]
                assert float(row["gap_mean"]) == pytest.approx(statistics.fmean(vals))
                assert float(row["gap_std"]) == pytest.approx(statistics.stdev(vals))
                assert row["seeds"] == "2"
    # the combined summary carries the same numbers and links the per-setting images
    assert table_line(md, by_pert, "negate") in report.markdown
    assert f"{report.groups[0].slug}/gap_by_perturbation.png" in report.markdown


def test_gap_is_computed_from_the_retrain_of_the_same_seed(tmp_path):
    # Only seed 1's Retrain: seed 0's trajectory has no gap and no reference -> skipped.
    write(tmp_path / "retrain_1" / "results.json", result("retrain", 1, RETRAIN[1]))
    for seed in (0, 1):
        write(tmp_path / f"not_{seed}" / "results.json", not_result("negate", "conv1", seed))
    report = rep.write_report(tmp_path)
    gdir = report.out_dir / report.groups[0].slug
    md = (gdir / "summary.md").read_text()
    line = table_line(md, "By perturbation", "negate")
    # seed 1 alone, against seed 1's Retrain: 44 at round 0, 7 at the end
    assert line == ("| negate | 1 | 44.00 ± 0.00 | 22.00 ± 0.00 | 12.00 ± 0.00 | "
                    "7.00 ± 0.00 (round 3) |")
    assert "1 NoT trajectory(ies) skipped" in md and "not_0" in md


def test_trajectory_without_any_retrain_is_skipped_and_plain_results_are_unchanged(tmp_path):
    # a setting with trajectories but no Retrain at all: a note, no figures
    write(tmp_path / "a" / "not_0" / "results.json",
          not_result("negate", "conv1", 0, num_clients=5))
    # a setting without trajectories: the report as before (no gap section, no files)
    write(tmp_path / "b" / "retrain_0" / "results.json", result("retrain", 0, RETRAIN[0]))
    write(tmp_path / "b" / "ft_0" / "results.json", result("ft", 0, RETRAIN[1]))
    report = rep.write_report(tmp_path)
    assert len(report.groups) == 2
    by_clients = {g.setting["num_clients"]: report.out_dir / g.slug for g in report.groups}
    skipped = (by_clients[5] / "summary.md").read_text()
    assert "1 NoT trajectory(ies) skipped" in skipped
    assert not list(by_clients[5].glob("gap_*"))
    plain = (by_clients[10] / "summary.md").read_text()
    assert "Avg. Gap to Retrain over rounds" not in plain
    assert sorted(p.name for p in by_clients[10].iterdir()) == [
        "metrics.pdf", "metrics.png", "summary.csv", "summary.md"]


def test_two_local_jobs_retrain_and_not_through_the_report(tmp_path):
    """Real jobs: Retrain and NoT in separate jobs (as a sweep runs them); the report
    computes NoT's gap from the Retrain job's final metrics."""
    from fedunlearn.engine import local_run

    small = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 1,
             "unlearn.rounds": 1, "eval.mia-max-members": 40, "eval.trajectory": True}
    for method in ("retrain", "not"):
        out = tmp_path / "sweep" / method
        rc = local_run({**small, "method": method, "output-dir": str(out),
                        "checkpoint-dir": str(tmp_path / "ck")},
                       num_supernodes=3, log_file=tmp_path / f"{method}.log", echo=False)
        assert rc == 0, (tmp_path / f"{method}.log").read_text()[-2000:]
    found = {m: json.loads(next((tmp_path / "sweep" / m).rglob("results.json")).read_text())
             for m in ("retrain", "not")}
    points = found["not"]["trajectory"]["not"]
    assert [p["round"] for p in points] == [0, 1]
    assert all(p.get("gap") is None for p in points)  # no Retrain in NoT's job
    ref = found["retrain"]["unlearned"]
    expected = [sum(abs(p[k] - ref[k]) for k in KEYS) / 4 for p in points]
    report = rep.write_report(tmp_path / "sweep")
    gdir = report.out_dir / report.groups[0].slug
    assert (gdir / "gap_by_perturbation.png").read_bytes()[:4] == b"\x89PNG"
    assert (gdir / "gap_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    with open(gdir / "gap_trajectory.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["figure"] == "gap_by_perturbation.png"]
    assert [r["label"] for r in rows] == ["negate", "negate"]
    assert [float(r["gap_mean"]) for r in rows] == pytest.approx(expected)
    md = (gdir / "summary.md").read_text()
    assert "computed here against the separate Retrain" in md

"""fedunlearn-report on hand-made results files: statistics, Δ, Avg. Gap, ★, plots."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from fedunlearn.experiment import report as rep
from fedunlearn.metrics import average_gap

KEYS = ("retain", "forget", "test", "mia")

# method -> per-seed unlearned metrics (seeds 0, 1, 2) and per-seed comm bytes / flops
DATA = {
    "retrain": {"retain": [90.0, 91.0, 92.0], "forget": [80.0, 82.0, 84.0],
                "test": [85.0, 85.5, 86.0], "mia": [50.0, 50.0, 50.0],
                "comm": [1e10, 1e10, 1e10], "flops": [5e16, 5e16, 5e16]},
    "ft": {"retain": [93.0, 93.0, 93.0], "forget": [90.0, 91.0, 95.0],
           "test": [85.0, 86.0, 87.0], "mia": [55.0, 56.0, 57.0],
           "comm": [5e9, 5e9, 5e9], "flops": [2e16, 2e16, 2.6e16]},
    "not": {"retain": [91.0, 91.5, 92.0], "forget": [82.0, 83.0, 84.0],
            "test": [85.0, 85.0, 85.0], "mia": [50.5, 51.0, 51.5],
            "comm": [4e9, 4e9, 4e9], "flops": [1e16, 1e16, 1e16]},
}


def result(method, seed, metrics, comm=1.0, flops=1.0, *, clients=(0,), num_clients=10,
           scope="client", dataset="digits", model="cnn", extra_cfg=None):
    cfg = {"methods": [method], "seed": seed, "dataset": dataset, "model": model,
           "num_clients": num_clients, "partitioning": "iid", "pretrain_rounds": 30,
           "unlearn_rounds": 15, "unlearn_lr": 0.01,
           "forget": {"scope": scope, "clients": list(clients), "classes": [],
                      "fraction": 0.1, "sample_ids": [], "data_of": -1}}
    cfg.update(extra_cfg or {})
    return {"method": method, "request": [{"scope": scope, "partition_id": c} for c in clients],
            "original": {"retain": 99.0, "forget": 99.0, "test": 90.0 + seed, "mia": 60.0},
            "unlearned": dict(metrics),
            "cost": {"rounds": 15, "comm_bytes": comm, "bytes_down": comm / 2,
                     "bytes_up": comm / 2, "flops": flops, "wall_s": 1.5, "storage_bytes": 0},
            "config": cfg}


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def write_sweep(root, methods=("retrain", "ft", "not"), seeds=(0, 1, 2), clients=(0,),
                tag="r01", asr=None):
    for method in methods:
        d = DATA[method]
        for i, seed in enumerate(seeds):
            metrics = {k: d[k][i] for k in KEYS}
            if asr is not None:
                metrics["asr"] = asr[method][i]
            write(root / f"{tag}_{method}_{seed}" / "results.json",
                  result(method, seed, metrics, d["comm"][i], d["flops"][i], clients=clients))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected(method):
    means = {k: statistics.fmean(DATA[method][k]) for k in KEYS}
    stds = {k: statistics.stdev(DATA[method][k]) for k in KEYS}
    return means, stds


def test_statistics_delta_gap_and_best_row(tmp_path):
    write_sweep(tmp_path)
    report = rep.write_report(tmp_path)
    assert report is not None and len(report.groups) == 1
    group = report.groups[0]
    gdir = report.out_dir / group.slug
    rows = {r["method"]: r for r in read_csv(gdir / "summary.csv")}
    assert list(rows) == ["retrain", "ft", "not"]  # paper order
    ref_means, _ = expected("retrain")
    gaps = {}
    for method, row in rows.items():
        means, stds = expected(method)
        assert row["seeds"] == "3"
        for k in KEYS:
            assert float(row[f"{k}_mean"]) == pytest.approx(means[k])
            assert float(row[f"{k}_std"]) == pytest.approx(stds[k])  # ddof=1
            assert float(row[f"{k}_delta"]) == pytest.approx(abs(means[k] - ref_means[k]))
        gaps[method] = average_gap(means, ref_means)
        assert float(row["avg_gap"]) == pytest.approx(gaps[method])
        # by hand: the mean of the four |Δ|
        assert gaps[method] == pytest.approx(
            sum(abs(means[k] - ref_means[k]) for k in KEYS) / 4)
        assert float(row["comm_bytes"]) == pytest.approx(statistics.fmean(DATA[method]["comm"]))
        assert float(row["flops"]) == pytest.approx(statistics.fmean(DATA[method]["flops"]))
    assert rows["retrain"]["avg_gap"] == "0"
    # NoT has the lowest Avg. Gap among non-Retrain methods; Retrain is never marked.
    assert gaps["not"] < gaps["ft"]
    assert [m for m, r in rows.items() if r["best"] == "★"] == ["not"]
    assert "asr_mean" not in rows["not"]

    md = (gdir / "summary.md").read_text()
    ft_means, ft_stds = expected("ft")
    ft_line = next(line for line in md.splitlines() if line.startswith("| FT "))
    assert (f"{ft_means['forget']:.2f} ± {ft_stds['forget']:.2f} "
            f"({abs(ft_means['forget'] - ref_means['forget']):.2f})") in ft_line
    not_line = next(line for line in md.splitlines() if "NoT" in line and line.startswith("|"))
    assert not_line.startswith("| **NoT** ★") and f"**{gaps['not']:.2f}** ★" in not_line
    assert "★" not in ft_line
    assert "ddof=1" in md
    assert f"{statistics.fmean(DATA['ft']['comm']):.2e}" in ft_line
    # the combined summary holds the same table
    assert not_line in report.markdown and (report.out_dir / "summary.csv").exists()
    png = gdir / "metrics.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert not (report.out_dir / "forget_ratio.png").exists()  # one ratio only


def test_storage_bytes_is_a_column_for_every_method(tmp_path):
    write_sweep(tmp_path, methods=("retrain", "ft"))
    stored = result("federaser", 0, {k: DATA["retrain"][k][0] for k in KEYS})
    stored["cost"]["storage_bytes"] = 79172130
    write(tmp_path / "r01_federaser_0" / "results.json", stored)
    report = rep.write_report(tmp_path)
    gdir = report.out_dir / report.groups[0].slug
    rows = {r["method"]: r for r in read_csv(gdir / "summary.csv")}
    assert float(rows["federaser"]["storage_bytes"]) == 79172130
    assert float(rows["ft"]["storage_bytes"]) == 0
    md = (gdir / "summary.md").read_text()
    assert "Storage (B) ↓" in md
    line = next(x for x in md.splitlines() if "FedEraser" in x and x.startswith("|"))
    assert "| 7.92e+07 |" in line
    assert next(x for x in md.splitlines() if x.startswith("| FT ")).endswith("| 0 | 3 |")


def test_missing_retrain_gives_empty_deltas_and_a_note(tmp_path):
    write_sweep(tmp_path, methods=("ft", "not"))
    report = rep.write_report(tmp_path)
    group = report.groups[0]
    rows = read_csv(report.out_dir / group.slug / "summary.csv")
    assert [r["method"] for r in rows] == ["ft", "not"]
    for row in rows:
        assert row["avg_gap"] == "" and row["best"] == ""
        assert all(row[f"{k}_delta"] == "" for k in KEYS)
        assert float(row["retain_mean"]) == pytest.approx(expected(row["method"])[0]["retain"])
    md = (report.out_dir / group.slug / "summary.md").read_text()
    assert rep.NO_RETRAIN_NOTE in md and "★ |" not in md.split("\n\n")[1]
    assert "(" not in next(line for line in md.splitlines() if line.startswith("| FT "))
    assert (report.out_dir / group.slug / "metrics.png").exists()


def test_settings_ratio_plot_asr_and_single_seed(tmp_path):
    asr = {"retrain": [1.0, 2.0, 3.0], "ft": [10.0, 20.0, 30.0], "not": [0.0, 0.0, 3.0]}
    write_sweep(tmp_path, tag="r01", clients=(0,), asr=asr)
    write_sweep(tmp_path, tag="r05", clients=(0, 1, 2, 3, 4))
    # a single-seed setting on another dataset, Retrain missing there
    write(tmp_path / "other" / "results.json",
          result("not", 0, {k: 50.0 for k in KEYS}, dataset="synthetic"))
    report = rep.write_report(tmp_path)
    by_title = {g.title: g for g in report.groups}
    assert len(by_title) == 3
    r01 = next(g for g in report.groups if g.setting["dataset"] == "digits"
               and g.setting["targets"] == 1)
    r05 = next(g for g in report.groups if g.setting["targets"] == 5)
    assert r01.setting["ratio"] == pytest.approx(0.1) and r05.setting["ratio"] == 0.5
    assert "asr" in r01.keys and "asr" not in r05.keys
    asr_rows = {r["method"]: r for r in read_csv(report.out_dir / r01.slug / "summary.csv")}
    assert float(asr_rows["ft"]["asr_mean"]) == pytest.approx(20.0)
    assert float(asr_rows["ft"]["asr_std"]) == pytest.approx(10.0)
    assert float(asr_rows["ft"]["asr_delta"]) == pytest.approx(18.0)
    # ASR is reported but not part of the Avg. Gap
    assert float(asr_rows["ft"]["avg_gap"]) == pytest.approx(
        average_gap(expected("ft")[0], expected("retrain")[0]))
    single = next(g for g in report.groups if g.setting["dataset"] == "synthetic")
    assert single.rows[0].std["retain"] == 0.0 and single.rows[0].n == 1
    assert single.reference is None
    # forget ratio varies on digits/cnn/client: Figure 6 style plot and table
    png = report.out_dir / "forget_ratio.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert "forget ratio" in report.markdown and "10%: Avg. Gap" in report.markdown
    combined = read_csv(report.out_dir / "summary.csv")
    assert len(combined) == 3 + 3 + 1


def test_method_settings_split_rows_not_settings(tmp_path):
    for seed in (0, 1):
        write(tmp_path / f"ret{seed}" / "results.json",
              result("retrain", seed, {k: 80.0 for k in KEYS}))
        for rounds in (5, 15):
            write(tmp_path / f"not{seed}_{rounds}" / "results.json",
                  result("not", seed, {k: 80.0 + rounds for k in KEYS},
                         extra_cfg={"unlearn_rounds": rounds}))
    report = rep.write_report(tmp_path)
    assert len(report.groups) == 1
    labels = [r.label for r in report.groups[0].rows]
    assert labels == ["Retrain", "NoT (unlearn_rounds=15)", "NoT (unlearn_rounds=5)"]
    gaps = {r.label: r.avg_gap for r in report.groups[0].rows}
    assert gaps["NoT (unlearn_rounds=5)"] == pytest.approx(5.0)
    assert [r.label for r in report.groups[0].best_rows] == ["NoT (unlearn_rounds=5)"]


def test_nan_values_are_skipped():
    mean, std = rep.mean_std([1.0, float("nan"), 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2.0))
    assert all(math.isnan(v) for v in rep.mean_std([]))


def test_cli(tmp_path, capsys):
    assert rep.main([str(tmp_path)]) == 1  # nothing there yet
    write_sweep(tmp_path, methods=("retrain", "not"), seeds=(0, 1))
    out = tmp_path / "elsewhere"
    assert rep.main([str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Retrain |" in printed and (out / "summary.md").exists()
    # the report's own files are never read back as results
    assert rep.main([str(tmp_path), "--quiet"]) == 0
    assert len(rep.load_results(tmp_path)) == 4


def test_a_planted_backdoor_is_its_own_setting(tmp_path):
    bd = {"clients": [0], "fraction": 0.5, "target": 0, "patch_size": 0,
          "position": "bottom-right", "value": "auto"}
    for name, extra in (("clean", {"backdoor": {**bd, "clients": []}}), ("bd", {"backdoor": bd})):
        for method in ("retrain", "not"):
            metrics = {k: 90.0 for k in KEYS}
            if name == "bd":
                metrics["asr"] = 5.0 if method == "not" else 1.0
            write(tmp_path / f"{name}_{method}" / "results.json",
                  result(method, 0, metrics, extra_cfg=extra))
    report = rep.write_report(tmp_path)
    assert len(report.groups) == 2
    backdoored = next(g for g in report.groups if g.setting["backdoor"])
    assert "backdoor by clients 0 -> label 0" in backdoored.title
    assert "asr" in backdoored.keys
    assert next(r for r in backdoored.rows if r.method == "not").delta["asr"] == 4.0
    clean = next(g for g in report.groups if not g.setting["backdoor"])
    assert "asr" not in clean.keys and "backdoor" not in clean.title


def test_a_result_with_a_missing_metric_has_no_gap_and_does_not_count(tmp_path):
    """A seed whose forget accuracy could not be computed is left out of the means and
    of the seed count; alone, it gives a missing gap (not a mean of fewer terms)."""
    from fedunlearn.experiment.report import build_rows

    def entry(method, seed, forget):
        return (tmp_path / f"{method}{seed}.json",
                {"method": method, "config": {"seed": seed},
                 "unlearned": {"retain": 90.0, "forget": forget, "test": 85.0, "mia": 50.0},
                 "cost": {"comm_bytes": 1, "flops": 1, "rounds": 1, "wall_s": 1.0}})

    keys = ("retain", "forget", "test", "mia")
    rows = build_rows([entry("retrain", 0, 80.0), entry("not", 0, float("nan")),
                       entry("not", 1, 84.0)], keys)
    not_row = next(r for r in rows if r.method == "not")
    assert not_row.n == 1 and len(not_row.files) == 2
    assert not_row.mean["retain"] == 90.0 and not_row.avg_gap == pytest.approx(1.0)
    rows = build_rows([entry("retrain", 0, 80.0), entry("not", 0, float("nan"))], keys)
    not_row = next(r for r in rows if r.method == "not")
    assert not_row.n == 0 and math.isnan(not_row.avg_gap)

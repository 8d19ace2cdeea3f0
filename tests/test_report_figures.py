"""fedunlearn-report's figures on a 3-seed sweep, as a researcher puts them in a paper:
PNG and PDF, axes that show the differences between methods, units, the seed count."""

from __future__ import annotations

import statistics

import pytest

from fedunlearn.experiment import report as rep

from tests.test_report import DATA, KEYS, result, write, write_sweep


def drawn(fig):
    """The figure drawn (tick labels and offset texts exist only after a draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def panel(fig, title_start):
    return next(ax for ax in fig.axes if ax.get_visible()
                and ax.get_title().startswith(title_start))


def bar_heights(ax):
    return [p.get_height() for p in ax.patches if p.get_width() < 1]


def test_cli_writes_png_and_pdf_for_every_figure(tmp_path):
    write_sweep(tmp_path, tag="r01", clients=(0,))
    write_sweep(tmp_path, tag="r05", clients=(0, 1, 2, 3, 4))
    assert rep.main([str(tmp_path), "--quiet"]) == 0
    out = tmp_path / "report"
    stems = [out / g for g in ("digits-cnn-client-1of10/metrics",
                               "digits-cnn-client-5of10/metrics", "forget_ratio")]
    for stem in stems:
        png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
        assert not stem.with_suffix(".svg").exists()
    # summary.md still shows the PNG
    assert "![" in (out / "summary.md").read_text() and "metrics.png" in (
        out / "summary.md").read_text()


def test_svg_on_request_and_bad_formats_are_refused(tmp_path, capsys):
    write_sweep(tmp_path, methods=("retrain", "not"))
    assert rep.main([str(tmp_path), "--quiet", "--formats", "png,svg"]) == 0
    gdir = tmp_path / "report" / rep.write_report(tmp_path, formats="png").groups[0].slug
    assert (gdir / "metrics.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(SystemExit) as exc:
        rep.main([str(tmp_path), "--formats", "png,jpeg"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'jpeg'" in err and "png, pdf, svg" in err
    with pytest.raises(ValueError, match="lack png"):
        rep.write_report(tmp_path, formats=("pdf",))


def test_metrics_axes_show_the_differences_to_retrain(tmp_path):
    write_sweep(tmp_path)
    group = rep.write_report(tmp_path, formats="png").groups[0]
    fig = drawn(rep.metrics_figure(group))
    assert "mean ± std over 3 seeds" in fig.get_suptitle()
    assert group.title in fig.get_suptitle()
    ref = {k: statistics.fmean(DATA["retrain"][k]) for k in KEYS}
    forget = panel(fig, "Forget accuracy")
    assert forget.get_ylabel() == "method − Retrain (percentage points)"
    assert f"Retrain: {ref['forget']:.2f} ± {statistics.stdev(DATA['retrain']['forget']):.2f}%" \
        in forget.get_title()
    # one bar per non-Retrain method, its height the difference of the means
    want = [statistics.fmean(DATA[m]["forget"]) - ref["forget"] for m in ("ft", "not")]
    assert bar_heights(forget) == pytest.approx(want)
    # the axis spans the differences (and their error bars), not 0-100
    bottom, top = forget.get_ylim()
    assert bottom <= 0 < max(want) < top and top - bottom < 20
    ft_std = statistics.stdev(DATA["ft"]["forget"])
    assert top >= max(want) + ft_std
    gap = panel(fig, "Avg. Gap to Retrain")
    assert bar_heights(gap) == pytest.approx([r.avg_gap for r in group.rows[1:]])


def test_costs_have_units_and_plain_tick_labels(tmp_path):
    write_sweep(tmp_path)  # comm 4e9-1e10 bytes, FLOPs 1e16-5e16
    group = rep.write_report(tmp_path, formats="png").groups[0]
    fig = drawn(rep.metrics_figure(group))
    comm, comp = panel(fig, "Communication"), panel(fig, "Computation")
    assert comm.get_ylabel() == "Communication (GB)"
    assert comp.get_ylabel() == "Computation (PFLOPs)"
    assert bar_heights(comm) == pytest.approx(
        [statistics.fmean(DATA[m]["comm"]) / 1e9 for m in ("retrain", "ft", "not")])
    for ax in (comm, comp):
        assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e10" above the axis
    assert rep.unit_scale([4.71e7, 1.29e8], "bytes") == (1e6, "MB")
    assert rep.unit_scale([2.32e10, 6.34e10], "flops") == (1e9, "GFLOPs")
    assert rep.unit_scale([512], "bytes") == (1.0, "B")


def test_one_seed_has_no_error_bars_and_says_so(tmp_path):
    write_sweep(tmp_path, seeds=(0,))
    group = rep.write_report(tmp_path, formats="png").groups[0]
    fig = drawn(rep.metrics_figure(group))
    assert "1 seed (no error bars)" in fig.get_suptitle()
    for ax in fig.axes:
        assert not ax.containers or all(type(c).__name__ == "BarContainer"
                                         for c in ax.containers), ax.get_title()


def test_without_retrain_absolute_values_on_zoomed_axes(tmp_path):
    write_sweep(tmp_path, methods=("ft", "not"))
    group = rep.write_report(tmp_path, formats="png").groups[0]
    fig = drawn(rep.metrics_figure(group))
    assert "no Retrain results" in fig.get_suptitle()
    assert not any(ax.get_title().startswith("Avg. Gap") for ax in fig.axes)
    retain = panel(fig, "Retain accuracy")
    assert retain.get_ylabel() == "Retain (%)"
    bottom, top = retain.get_ylim()
    means = [statistics.fmean(DATA[m]["retain"]) for m in ("ft", "not")]
    assert bottom < min(means) and max(means) < top and top - bottom < 10


def test_forget_ratio_figure_is_titled_in_words_with_units_and_seeds(tmp_path):
    write_sweep(tmp_path, tag="r01", clients=(0,))
    write_sweep(tmp_path, tag="r05", clients=(0, 1, 2, 3, 4))
    report = rep.write_report(tmp_path, formats="png")
    (name, members), = rep.ratio_families(report.groups)
    fig = drawn(rep.forget_ratio_figure(members))
    title = fig.get_suptitle()
    assert title.startswith("digits / cnn / client-wise, IID: effect of the forget ratio")
    assert name not in title and "mean ± std over 3 seeds" in title
    gap_ax, comm_ax = fig.axes
    assert gap_ax.get_ylabel() == "Avg. Gap to Retrain (percentage points)"
    assert comm_ax.get_ylabel() == "Communication (GB)"
    assert comm_ax.yaxis.get_offset_text().get_text() == ""


def test_seed_captions_and_zoom():
    assert rep.seed_caption([3, 3]) == "mean ± std over 3 seeds"
    assert rep.seed_caption([2, 3]) == "mean ± std over 2–3 seeds"
    assert rep.seed_caption([1]) == "1 seed (no error bars)"
    assert rep.zoom_limits([96.0, 96.4], [96.6, 97.0]) == pytest.approx((95.85, 97.15))
    low, high = rep.zoom_limits([5.0], [5.0])  # a single value: at least 0.5 wide
    assert low < 5.0 < high and high - low >= 0.5


def test_same_report_gives_the_same_pdf(tmp_path):
    write(tmp_path / "a" / "results.json", result("retrain", 0, {k: 90.0 for k in KEYS}))
    write(tmp_path / "b" / "results.json", result("not", 0, {k: 91.0 for k in KEYS}))
    first = rep.write_report(tmp_path, tmp_path / "r1")
    second = rep.write_report(tmp_path, tmp_path / "r2")
    pdfs = [[p for p in r.files if p.suffix == ".pdf"] for r in (first, second)]
    assert len(pdfs[0]) == 1 and pdfs[0][0].read_bytes() == pdfs[1][0].read_bytes()


def test_method_variants_get_their_own_colour_and_short_ticks(tmp_path):
    """Rows of one method that differ in long method settings: distinct colours, ticks
    "NoT 1", "NoT 2" and the full labels in the legend; the layout still fits."""
    import warnings

    long = {"negate_layers": ["conv1", "conv2", "fc1"], "unlearn_lr": 0.001}
    write(tmp_path / "ret" / "results.json", result("retrain", 0, {k: 90.0 for k in KEYS}))
    for name, extra in (("a", {}), ("b", long)):
        write(tmp_path / name / "results.json",
              result("not", 0, {k: 91.0 for k in KEYS}, extra_cfg=extra))
    group = rep.write_report(tmp_path, formats="png").groups[0]
    assert max(len(r.label) for r in group.rows) > 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        fig = drawn(rep.metrics_figure(group))
    comm = panel(fig, "Communication")
    assert [t.get_text() for t in comm.get_xticklabels()] == ["Retrain", "NoT 1", "NoT 2"]
    assert len({p.get_facecolor() for p in comm.patches}) == 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "Retrain" and legend[1] == f"NoT 1: {group.rows[1].label}"

"""Plots: a setting's metrics and costs per method (the paper's Figure 1), drawn so that
the differences between methods show: accuracy and MIA as method − Retrain."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .aggregation import Group, Row
from .constants import LABELS, REFERENCE
from .figure_style import (FIGURE_FORMATS, plain_numbers, save_figure, seed_caption,
                           unit_scale, zoom_limits)

PANEL_NAMES = {"retain": "Retain accuracy", "forget": "Forget accuracy",
               "test": "Test accuracy", "mia": "MIA", "asr": "Attack success rate"}
COSTS = (("comm_bytes", "Communication", "bytes"), ("flops", "Computation", "flops"))
DELTA_LABEL = "method − Retrain (percentage points)"


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    fixed = {REFERENCE: cmap(7), "ft": cmap(0), "not": cmap(3)}  # grey, blue, red
    free = [cmap(i) for i in (1, 2, 4, 5, 6, 8, 9)]
    out, i = {}, 0
    for m in methods:
        if m in fixed:
            out[m] = fixed[m]
        else:
            out[m] = free[i % len(free)]
            i += 1
    return out


LONG_LABEL = 24
"""Rows labelled longer than this (method settings in the label) get short ticks."""


def _row_colors(rows: Sequence[Row]) -> dict[str, Any]:
    """A colour per row label: the method's colour, other colours for a method's further
    variants (rows that differ in method settings)."""
    from matplotlib import colormaps

    base = _colors([r.method for r in rows])
    palette = [colormaps["tab20"](i) for i in range(20)]
    used = set(base.values())
    spare = [c for c in palette if c not in used]
    out, seen = {}, set()
    for row in rows:
        if row.method in seen:
            out[row.label] = spare.pop(0) if spare else base[row.method]
        else:
            out[row.label] = base[row.method]
            seen.add(row.method)
    return out


def _ticks(rows: Sequence[Row]) -> dict[str, str]:
    """The tick label per row: its label, or "NoT 2" style when labels are long."""
    if max((len(r.label) for r in rows), default=0) <= LONG_LABEL:
        return {r.label: r.label for r in rows}
    out, count = {}, {}
    for row in rows:
        count[row.method] = count.get(row.method, 0) + 1
        name = row.label.split(" (")[0]
        out[row.label] = name if sum(r.method == row.method for r in rows) == 1 \
            else f"{name} {count[row.method]}"
    return out


class _Style(NamedTuple):
    """Per row label: its colour and its tick label."""

    color: dict[str, Any]
    tick: dict[str, str]


def _num(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.nan


def _err(row: Row, std: float) -> float:
    """The error bar of a row: its std over seeds; none (NaN) for a single seed."""
    return _num(std) if row.n > 1 else math.nan


def _bars(ax: Any, rows: Sequence[Row], heights: Sequence[float], errs: Sequence[float],
          style: _Style) -> None:
    x = list(range(len(rows)))
    ax.bar(x, heights, color=[style.color[r.label] for r in rows], edgecolor="black",
           linewidth=0.5)
    if any(math.isfinite(e) for e in errs):
        ax.errorbar(x, heights, yerr=[0.0 if not math.isfinite(e) else e for e in errs],
                    fmt="none", ecolor="black", capsize=4, linewidth=1)
    ax.set_xticks(x, [style.tick[r.label] for r in rows], rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)


def _ends(values: Sequence[float], errs: Sequence[float]) -> tuple[list[float], list[float]]:
    e = [0.0 if not math.isfinite(x) else x for x in errs]
    return [v - x for v, x in zip(values, e)], [v + x for v, x in zip(values, e)]


def _delta_panel(ax: Any, key: str, group: Group, style: _Style) -> None:
    """A metric as method − Retrain: 0 is Retrain, the grey band Retrain's ± std."""
    ref = group.reference
    rows = [r for r in group.rows if not r.is_reference]
    deltas = [_num(r.mean[key] - ref.mean[key]) for r in rows]
    errs = [_err(r, r.std[key]) for r in rows]
    _bars(ax, rows, deltas, errs, style)
    ax.axhline(0, color="black", linewidth=0.8)
    band = _err(ref, ref.std[key])
    if math.isfinite(band) and band > 0:
        ax.axhspan(-band, band, color="0.85", zorder=0)
    lows, highs = _ends(deltas, errs)
    band = 0.0 if not math.isfinite(band) else band
    ax.set_ylim(*zoom_limits(lows + [0.0, -band], highs + [0.0, band]))
    ref_text = f"{ref.mean[key]:.2f}" + (f" ± {band:.2f}" if band else "")
    ax.set_title(f"{PANEL_NAMES.get(key, key)} (Retrain: {ref_text}%)", fontsize=10)
    ax.set_ylabel(DELTA_LABEL)


def _absolute_panel(ax: Any, key: str, group: Group, style: _Style) -> None:
    """A metric in %, without Retrain: markers and error bars, y zoomed to the data."""
    rows = group.rows
    means = [_num(r.mean[key]) for r in rows]
    errs = [_err(r, r.std[key]) for r in rows]
    for i, (row, mean, err) in enumerate(zip(rows, means, errs)):
        ax.errorbar([i], [mean], yerr=None if not math.isfinite(err) else [err], fmt="o",
                    color=style.color[row.label], ecolor="black", capsize=4, markersize=7)
    ax.set_xticks(range(len(rows)), [style.tick[r.label] for r in rows], rotation=20,
                  ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(*zoom_limits(*_ends(means, errs)))
    plain_numbers(ax)
    ax.set_title(PANEL_NAMES.get(key, key), fontsize=10)
    ax.set_ylabel(f"{LABELS.get(key, key)} (%)")


def _gap_panel(ax: Any, group: Group, style: _Style) -> None:
    rows = [r for r in group.rows if not r.is_reference]
    gaps = [_num(r.avg_gap) for r in rows]
    _bars(ax, rows, gaps, [math.nan] * len(rows), style)
    for i, gap in enumerate(gaps):
        if math.isfinite(gap):
            ax.annotate(f"{gap:.2f}", (i, gap), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    top = max((g for g in gaps if math.isfinite(g)), default=0.0)
    ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
    ax.set_title("Avg. Gap to Retrain ↓", fontsize=10)
    ax.set_ylabel("Avg. Gap (percentage points)")


def _cost_panel(ax: Any, key: str, name: str, kind: str, group: Group,
                style: _Style) -> None:
    rows = group.rows
    scale, unit = unit_scale((r.cost_mean[key] for r in rows), kind)
    means = [_num(r.cost_mean[key]) / scale for r in rows]
    errs = [_err(r, r.cost_std[key]) / scale for r in rows]
    _bars(ax, rows, means, errs, style)
    ax.set_ylim(bottom=0)
    plain_numbers(ax)
    ax.set_title(f"{name} ↓", fontsize=10)
    ax.set_ylabel(f"{name} ({unit})")


def metrics_figure(group: Group) -> Any:
    """The setting's Figure 1 as a matplotlib ``Figure``: with Retrain, one panel per
    metric as method − Retrain (percentage points) and the Avg. Gap; without, the metrics
    in % on axes zoomed to the data; then communication and computation with units."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ref = group.reference
    panels: list[tuple] = [("metric", k) for k in group.keys]
    panels += [("gap",)] if ref is not None else []
    panels += [("cost", *c) for c in COSTS]
    ncols = 3 if len(panels) <= 6 else 4
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 1.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    style = _Style(_row_colors(group.rows), _ticks(group.rows))
    ticks = style.tick
    for ax, panel in zip(axes, panels):
        if panel[0] == "metric":
            (_delta_panel if ref is not None else _absolute_panel)(ax, panel[1], group, style)
        elif panel[0] == "gap":
            _gap_panel(ax, group, style)
        else:
            _cost_panel(ax, *panel[1:], group, style)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    short = any(ticks[r.label] != r.label for r in group.rows)
    names = [r.label if ticks[r.label] == r.label else f"{ticks[r.label]}: {r.label}"
             for r in group.rows]
    handles = [Patch(facecolor=style.color[r.label], edgecolor="black", label=name)
               for r, name in zip(group.rows, names)]
    fig.legend(handles=handles, loc="outside lower center",
               ncols=1 if short else min(len(handles), 6))
    how = ("accuracy and MIA as method − Retrain (0 = Retrain; grey band: Retrain ± std)"
           if ref is not None else "no Retrain results: absolute values, axes zoomed to the data")
    caption = seed_caption(r.n for r in group.rows)
    fig.suptitle(f"{group.title}\n{caption}; {how}", fontsize=10)
    return fig


def plot_metrics(group: Group, path: Path,
                 formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Draw :func:`metrics_figure` to ``path`` in each of ``formats`` (PNG and PDF by
    default); the files written, the PNG first."""
    return save_figure(metrics_figure(group), path, formats)

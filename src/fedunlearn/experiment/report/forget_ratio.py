"""The forget ratio: settings that differ only in the target clients, their Avg. Gap and
communication against the ratio (the paper's Figure 6) and the table behind it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aggregation import Group, _slug, method_order
from .constants import REFERENCE
from .loading import _key
from .figure_style import (FIGURE_FORMATS, family_title, plain_numbers, save_figure,
                           seed_caption, unit_scale)
from .plots import _colors
from .tables import _e2, _f2

def ratio_families(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    """Settings that differ only in the target clients, when there are ≥ 2 ratios."""
    fams: dict[tuple, list[Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.setting.items() if k not in ("targets", "ratio", "clients")}
        fams.setdefault(_key(rest), []).append(g)
    out = []
    for members in fams.values():
        if len({g.setting["ratio"] for g in members}) < 2:
            continue
        members = sorted(members, key=lambda g: g.setting["ratio"])
        s = members[0].setting
        name = _slug(f"{s['dataset']}-{s['model']}-{s['scope']}"
                     + (f"-classes{s['classes']}" if s["classes"] else "")
                     + ("" if s["partitioning"] == "iid" else f"-{s['partitioning']}"))
        out.append((name, members))
    return out


def forget_ratio_figure(members: Sequence[Group]) -> Any:
    """Figure 6 style as a matplotlib ``Figure``: Avg. Gap and communication (in kB, MB
    or GB) per method against the forget ratio."""
    from matplotlib.figure import Figure

    methods = sorted({r.method for g in members for r in g.rows}, key=method_order)
    colors = _colors(methods)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_gap, ax_comm = fig.subplots(1, 2)
    scale, unit = unit_scale((r.cost_mean["comm_bytes"] for g in members for r in g.rows),
                             "bytes")
    for method in methods:
        labels = sorted({r.label for g in members for r in g.rows if r.method == method})
        for label in labels:
            pts = [(g.setting["ratio"], r) for g in members for r in g.rows if r.label == label]
            ratios = [100 * p for p, _ in pts]
            style = dict(color=colors[method], marker="o", label=label, capsize=4)
            if method != REFERENCE:
                gap_pts = [(x, r.avg_gap) for x, (_, r) in zip(ratios, pts)
                           if r.avg_gap is not None and math.isfinite(r.avg_gap)]
                if gap_pts:
                    ax_gap.plot([p for p, _ in gap_pts], [v for _, v in gap_pts],
                                color=colors[method], marker="o", label=label)
            errs = [r.cost_std["comm_bytes"] / scale if r.n > 1 else math.nan for _, r in pts]
            ax_comm.errorbar(ratios, [r.cost_mean["comm_bytes"] / scale for _, r in pts],
                             yerr=None if not any(math.isfinite(e) for e in errs) else
                             [0.0 if not math.isfinite(e) else e for e in errs], **style)
    ticks = sorted({100 * g.setting["ratio"] for g in members})
    for ax in (ax_gap, ax_comm):
        ax.set_xlabel("forget ratio (% of clients asking to be forgotten)")
        ax.set_xticks(ticks, [f"{t:.3g}%" for t in ticks])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_gap.set_ylabel("Avg. Gap to Retrain (percentage points)")
    ax_gap.set_title("Avg. Gap ↓")
    plain_numbers(ax_comm)
    ax_comm.set_ylabel(f"Communication ({unit})")
    ax_comm.set_title("Communication ↓")
    if not ax_gap.get_lines():
        ax_gap.text(0.5, 0.5, "no Retrain results: no Avg. Gap", ha="center",
                    transform=ax_gap.transAxes)
    caption = seed_caption(r.n for g in members for r in g.rows)
    fig.suptitle(f"{family_title(members[0].setting)}: effect of the forget ratio\n{caption}",
                 fontsize=10)
    return fig


def plot_forget_ratio(name: str, members: Sequence[Group], path: Path,
                      formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Draw :func:`forget_ratio_figure` of the family ``name`` to ``path`` in each of
    ``formats``; the files written, the PNG first."""
    return save_figure(forget_ratio_figure(members), path, formats)


def ratio_table(members: Sequence[Group]) -> str:
    ratios = [g.setting["ratio"] for g in members]
    labels = []
    for g in members:
        for r in g.rows:
            if r.label not in labels:
                labels.append(r.label)
    head = "| Method | " + " | ".join(f"{100 * x:.3g}%: Avg. Gap / Comm. (B)" for x in ratios) + " |"
    lines = [head, "|---|" + "---:|" * len(ratios)]
    for label in labels:
        cells = []
        for g in members:
            row = next((r for r in g.rows if r.label == label), None)
            cells.append("" if row is None else
                         f"{_f2(row.avg_gap)} / {_e2(row.cost_mean['comm_bytes'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

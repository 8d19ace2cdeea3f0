"""Plots: a setting's metrics and costs per method (the paper's Figure 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aggregation import Group
from .constants import LABELS, REFERENCE

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


def plot_metrics(group: Group, path: Path) -> Path:
    """Figure 1 style: one panel per metric and per cost, one bar per method."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(k, f"{LABELS.get(k, k)} (%)", "mean") for k in group.keys] + [
        ("comm_bytes", "Communication (bytes)", "cost"), ("flops", "Computation (FLOPs)", "cost")]
    ncols = 3 if len(panels) <= 6 else 4
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows = group.rows
    colors = _colors([r.method for r in rows])
    x = list(range(len(rows)))
    ref = group.reference
    for ax, (key, label, kind) in zip(axes, panels):
        if kind == "mean":
            means = [r.mean[key] for r in rows]
            stds = [r.std[key] for r in rows]
        else:
            means = [r.cost_mean[key] for r in rows]
            stds = [r.cost_std[key] for r in rows]
        ax.bar(x, [0 if not math.isfinite(m) else m for m in means],
               yerr=[0 if not math.isfinite(s) else s for s in stds], capsize=4,
               color=[colors[r.method] for r in rows], edgecolor="black", linewidth=0.5)
        if ref is not None:
            value = ref.mean[key] if kind == "mean" else ref.cost_mean[key]
            if math.isfinite(value):
                ax.axhline(value, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(label.split(" (")[0] + (" ↓" if kind == "cost" else ""))
        ax.set_ylabel(label)
        ax.set_xticks(x, [r.label for r in rows], rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
        if kind == "mean":
            top = max([m + s for m, s in zip(means, stds) if math.isfinite(m + s)] or [100.0])
            ax.set_ylim(0, max(100.0, top * 1.05) if key != "asr" else max(1.0, top * 1.1))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Patch(facecolor=colors[r.method], edgecolor="black", label=r.label) for r in rows]
    if ref is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([0], [0], color="black", linestyle="--", label="Retrain (reference)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    n = sorted({r.n for r in rows})
    fig.suptitle(f"{group.title}\nmean ± std over {'/'.join(map(str, n))} seed(s)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

"""The forgetting audit's figures, per setting: the per-point KLOM distribution of every
method (ECDF, the floor's and its p95 marked) and the per-example attack's ROC (log-FPR
axis, the floor's curve and chance), one panel per reference and point set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .figure_style import FIGURE_FORMATS, save_figure
from .plots import _colors

FLOOR_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


def _panels(setting, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = setting.references
    names = list(next(iter(setting.audits[refs[0].label].values())).point_sets) \
        if setting.audits[refs[0].label] else []
    fig, axes = plt.subplots(len(refs), max(1, len(names)), squeeze=False,
                             figsize=(4.2 * max(1, len(names)), 3.4 * len(refs)))
    for row in axes:
        row[0].set_ylabel(ylabel)
    return plt, fig, axes, names


def _colour_map(setting) -> dict[str, object]:
    keys = [m.key for m in setting.model_sets]
    colours = _colors(keys)
    return {m.label: colours[m.key] for m in setting.model_sets}


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(values.ravel())
    return x, np.arange(1, x.size + 1) / x.size


def _finish(plt, fig, axes, setting, what: str, path: Path, formats) -> list[Path]:
    legend: dict[str, object] = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               frameon=False)
    fig.suptitle(f"{setting.group.title}\n{what}, K = {len(setting.seeds)} seeds",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    files = save_figure(fig, path, formats)
    plt.close(fig)
    return files


def _cells(setting, axes, names):
    """Each panel's axes with its reference, that reference's audits, the point set's
    name and the first audit's numbers for it (which carry the floor's): one panel per
    reference (rows) x point set (columns)."""
    for r, ref in enumerate(setting.references):
        audits = setting.audits[ref.label]
        for c, name in enumerate(names):
            yield axes[r][c], ref, audits, name, next(iter(audits.values()))[name]


def draw_klom(setting, path: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """ECDF of every method's per-point KLOM values (all points x splits) and of the
    floor's, with the floor's p95 as a dotted line; one panel per reference x point set."""
    plt, fig, axes, names = _panels(setting, "share of points ≤ KLOM")
    colours = _colour_map(setting)
    for ax, ref, audits, name, first in _cells(setting, axes, names):
        x, y = _ecdf(first.floor_values)
        ax.step(x, y, where="post", label="floor (reference vs itself)", **FLOOR_STYLE)
        ax.axvline(first.klom_floor["p95"], color="black", linestyle=":", linewidth=1,
                   label="floor p95")
        for label, audit in audits.items():
            x, y = _ecdf(audit[name].klom_values)
            ax.step(x, y, where="post", color=colours[label], linewidth=1.4, label=label)
        ax.set_title(f"{name} points ({first.n_points}) vs {ref.label}", fontsize=8)
        ax.set_xlabel("KLOM (nats)")
        ax.set_ylim(0, 1.02)
    return _finish(plt, fig, axes, setting, "per-point KLOM against Retrain", path, formats)


def draw_roc(setting, path: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """The per-example attack's ROC of every method and of the floor (mean TPR over the
    splits at each FPR), on a log-FPR axis with chance as the diagonal."""
    plt, fig, axes, names = _panels(setting, "true positive rate")
    colours = _colour_map(setting)
    for ax, ref, audits, name, first in _cells(setting, axes, names):
        fpr = np.asarray(first.roc["fpr"])
        ax.plot(fpr, fpr, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.plot(fpr, first.roc["floor_tpr"], label="floor (held-out reference models)",
                **FLOOR_STYLE)
        for label, audit in audits.items():
            ax.plot(fpr, audit[name].roc["tpr"], color=colours[label], linewidth=1.4,
                    label=label)
        ax.set_xscale("log")
        ax.set_xlim(fpr[0], 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} points ({first.n_points}) vs {ref.label}", fontsize=8)
        ax.set_xlabel("false positive rate")
    return _finish(plt, fig, axes, setting, "per-example attack ROC against Retrain", path,
                   formats)

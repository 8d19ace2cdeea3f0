"""The gap figures of a setting (``gap_by_perturbation.png``, ``gap_by_layer.png``), their
numbers in markdown and ``gap_trajectory.csv``."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .aggregation import Group
from .figure_style import FIGURE_FORMATS, save_figure, seed_caption
from .tables import _f2, _num
from .trajectories import GAP_NOTE, GapLine, GapTrajectories

def _pick(lines: Sequence[GapLine], fixed: str, varied: str, prefer: str | None) -> str:
    """The value of ``fixed`` (layers or perturbation) under which ``varied`` takes the
    most values (then: ``prefer``, the most results files, the first by name)."""
    values: dict[str, tuple[set, int]] = {}
    for line in lines:
        seen, n = values.get(getattr(line, fixed), (set(), 0))
        values[getattr(line, fixed)] = (seen | {getattr(line, varied)}, n + line.n)
    return min(values, key=lambda v: (-len(values[v][0]), v != prefer, -values[v][1], v))


def gap_figure_lines(traj: GapTrajectories, by: str) -> tuple[list[GapLine], str]:
    """The lines of ``gap_by_perturbation`` (``by="perturbation"``: one per perturbation at
    the layer selection with the most perturbations) or ``gap_by_layer`` (``by="layers"``:
    one per layer selection at the perturbation with the most layer selections, negate on
    ties); labelled, and what is held fixed."""
    if not traj.lines:
        return [], ""
    fixed = "layers" if by == "perturbation" else "perturbation"
    value = _pick(traj.lines, fixed, by, None if fixed == "layers" else "negate")
    chosen = [l for l in traj.lines if getattr(l, fixed) == value]
    varying = [i for i, (f, _) in enumerate(chosen[0].rest)
               if len({l.rest[i][1] for l in chosen}) > 1]
    out = []
    for line in chosen:
        label = getattr(line, by)
        if varying:
            label += " (" + ", ".join(f"{line.rest[i][0]}={json.loads(line.rest[i][1])}"
                                      for i in varying) + ")"
        out.append(GapLine(line.perturbation, line.layers, line.rest, line.series,
                           line.files, label))
    what = f"perturbed layers: {value}" if fixed == "layers" else f"perturbation: {value}"
    return out, what


def _checkpoints(lines: Sequence[GapLine]) -> list[int]:
    """Round 0, a few rounds in between (every round up to 5), not the last."""
    last = max((max(l.rounds()) for l in lines if l.rounds()), default=0)
    if last <= 5:
        return list(range(last))
    return sorted({0} | {int(last * f + 0.5) for f in (0.25, 0.5, 0.75)} - {last})


def _pm(mean: float, std: float) -> str:
    return "—" if not math.isfinite(mean) else f"{_f2(mean)} ± {_f2(std)}"


def gap_table(lines: Sequence[GapLine], name: str) -> str:
    """Avg. Gap to Retrain at round 0, a few rounds and the end, one row per line."""
    rounds = _checkpoints(lines)
    head = [name, "Seeds"] + [f"Round {r}" for r in rounds] + ["End"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for line in lines:
        cells = [line.label, str(line.n)]
        for rnd in rounds:
            mean, std, n = line.at(rnd)
            cells.append(_pm(mean, std) + ("" if n in (0, line.n) else f" (n={n})"))
        mean, std, lasts = line.end()
        span = (f"{lasts[0]}" if len(lasts) == 1 else f"{lasts[0]}–{lasts[-1]}") if lasts else "?"
        cells.append(f"{_pm(mean, std)} (round {span})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_gap(lines: Sequence[GapLine], path: Path, title: str,
             formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Avg. Gap to Retrain against rounds, one line per variant, ±std shaded; saved in
    each of ``formats`` (the files written, the PNG first)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, line in enumerate(lines):
        stats = [(r, *line.at(r)) for r in line.rounds()]
        xs = [r for r, m, _, _ in stats if math.isfinite(m)]
        means = [m for _, m, _, _ in stats if math.isfinite(m)]
        stds = [0.0 if not math.isfinite(s) else s for _, m, s, _ in stats if math.isfinite(m)]
        color = cmap(i % 10)
        ax.plot(xs, means, marker="o", markersize=3, color=color,
                label=f"{line.label} (n={line.n})")
        if line.n > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=color, alpha=0.2,
                            linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = right after the perturbation)")
    ax.set_ylabel("Avg. Gap to Retrain (percentage points)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, formats)


GAP_FIGURES = (("perturbation", "gap_by_perturbation.png", "Perturbation"),
               ("layers", "gap_by_layer.png", "Perturbed layers"))


def write_gap_csv(path: Path, figures: Sequence[tuple[str, list[GapLine]]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["figure", "label", "perturbation", "layers", "round", "gap_mean",
                     "gap_std", "seeds"])
    for fname, lines in figures:
        for line in lines:
            for rnd in line.rounds():
                mean, std, n = line.at(rnd)
                writer.writerow([fname, line.label, line.perturbation, line.layers, rnd,
                                 _num(mean), _num(std), n])
    path.write_text(buf.getvalue())


def draw_gap_figures(group: Group, traj: GapTrajectories, gdir: Path,
                     formats: Sequence[str] = FIGURE_FORMATS) -> tuple[list[tuple[str, str, str, list[GapLine]]], list[Path]]:
    """Draw the setting's gap figures (and ``gap_trajectory.csv``) into ``gdir``:
    ``(file name, line kind, what is fixed, lines)`` per figure, and the files written."""
    figures, files = [], []
    for by, fname, name in GAP_FIGURES:
        lines, what = gap_figure_lines(traj, by)
        if not lines:
            continue
        seeds = sorted({s for line in lines for s in line.seeds})
        caption = seed_caption(line.n for line in lines)
        files += plot_gap(lines, gdir / fname, f"{group.title}\nNoT, {what}; {caption} "
                          f"(seeds {', '.join(map(str, seeds))})", formats)
        figures.append((fname, name, what, lines))
    if figures:
        write_gap_csv(gdir / "gap_trajectory.csv", [(f, lines) for f, _, _, lines in figures])
        files.append(gdir / "gap_trajectory.csv")
    return figures, files


def gap_markdown(group: Group, traj: GapTrajectories,
                 figures: Sequence[tuple[str, str, str, list[GapLine]]],
                 heading: str, prefix: str = "") -> str:
    """The numbers behind the gap figures (images under ``prefix``), and the notes."""
    parts = [f"{heading} {group.title}: Avg. Gap to Retrain over rounds (NoT)\n"]
    for fname, name, what, lines in figures:
        parts.append(f"By {name.lower()} ({what}):\n\n{gap_table(lines, name)}\n"
                     f"![{Path(fname).stem}]({prefix}{fname})\n")
    parts.append("\n\n".join([GAP_NOTE, *traj.notes]) + "\n")
    return "\n".join(parts)

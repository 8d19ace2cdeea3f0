"""Tables: a setting's table in the layout of the paper's Table 1 (markdown) and the
rows of ``summary.csv``."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from ...metrics import METRIC_KEYS
from .aggregation import Group, _fmt_num
from .constants import BEST_MARK, LABELS, NO_RETRAIN_NOTE, STD_NOTE

def _f2(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _e2(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2e}"


def _storage(value: float | None) -> str:
    """What a method keeps between rounds: 0 for most, bytes otherwise."""
    if value is None or not math.isfinite(value):
        return "—"
    return "0" if value == 0 else f"{value:.2e}"


def table_markdown(group: Group) -> str:
    """The setting's table in the layout of the paper's Table 1."""
    ref = group.reference is not None
    header = ["Method"] + [f"{LABELS.get(k, k)} (Δ↓)" for k in group.keys] + [
        "Avg. Gap ↓", "Comm. (B) ↓", "Comp. (FLOPs) ↓", "Storage (B) ↓", "Seeds"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in group.rows:
        cells = []
        for k in group.keys:
            cell = f"{_f2(row.mean[k])} ± {_f2(row.std[k])}"
            if ref:
                cell += f" ({_f2(row.delta.get(k))})"
            cells.append(cell)
        gap = _f2(row.avg_gap) if ref else ""
        name = row.label
        if row.best:
            name, gap = f"**{name}** {BEST_MARK}", f"**{gap}** {BEST_MARK}"
        cells += [gap, _e2(row.cost_mean["comm_bytes"]), _e2(row.cost_mean["flops"]),
                  _storage(row.cost_mean["storage_bytes"]), str(row.n)]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n"


def group_markdown(group: Group, heading: str = "##", images: Sequence[str] = ()) -> str:
    parts = [f"{heading} {group.title}\n", table_markdown(group)]
    notes = [STD_NOTE]
    if group.reference is None:
        notes.insert(0, f"**{NO_RETRAIN_NOTE}**")
    orig = ", ".join(f"{LABELS.get(k, k)} {_f2(v)}" for k, v in group.original.items())
    notes.append(f"Original (pretrained) model, mean over seeds {group.seeds}: {orig}.")
    parts.append("\n" + "\n\n".join(notes) + "\n")
    for image in images:
        parts.append(f"\n![{Path(image).stem}]({image})\n")
    return "\n".join(parts)


CSV_SETTING = ("dataset", "model", "scope", "targets", "num_clients", "ratio", "clients",
               "classes", "fraction", "partitioning", "alpha", "backdoor")


def csv_header(keys: Sequence[str]) -> list[str]:
    head = ["setting", *CSV_SETTING, "method", "label", "seeds"]
    for k in keys:
        head += [f"{k}_mean", f"{k}_std", f"{k}_delta"]
    return head + ["avg_gap", "best", "comm_bytes", "comm_bytes_std", "flops", "flops_std",
                   "storage_bytes", "rounds", "wall_s", "files"]


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.10g}"


def csv_rows(group: Group, keys: Sequence[str]) -> list[list[str]]:
    out = []
    for row in group.rows:
        setting = ["" if group.setting.get(c) is None else _fmt_num(group.setting.get(c))
                   for c in CSV_SETTING]
        cells = [group.title, *setting, row.method, row.label, str(row.n)]
        for k in keys:
            cells += [_num(row.mean.get(k)), _num(row.std.get(k)),
                      _num(row.delta.get(k)) if row.delta else ""]
        cells += [_num(row.avg_gap), BEST_MARK if row.best else "",
                  _num(row.cost_mean["comm_bytes"]), _num(row.cost_std["comm_bytes"]),
                  _num(row.cost_mean["flops"]), _num(row.cost_std["flops"]),
                  _num(row.cost_mean["storage_bytes"]),
                  _num(row.cost_mean["rounds"]), _num(row.cost_mean["wall_s"]),
                  ";".join(str(p) for p in row.files)]
        out.append(cells)
    return out


def write_csv(path: Path, groups: Sequence[Group]) -> None:
    keys = list(METRIC_KEYS)
    if groups and all("asr" in g.keys for g in groups):
        keys.append("asr")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(csv_header(keys))
    for g in groups:
        writer.writerows(csv_rows(g, keys))
    path.write_text(buf.getvalue())

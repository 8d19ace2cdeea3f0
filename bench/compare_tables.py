"""How far apart are two runs' fidelity tables? Max |difference| per column, per setting.

Reads the Markdown tables of two files (``fidelity.md`` from ``bench/fidelity.py``, or
a page such as ``docs/benchmarks.md`` that holds them), pairs the tables by the heading
above them (``## digits / cnn / ...`` and ``### digits / cnn / ...`` are the same
setting) and their rows by method (a ★ is ignored), and prints, per setting, the largest
absolute difference of each numeric column, on the means of ``mean ± std`` cells, and
the methods it comes from::

    python bench/compare_tables.py docs/benchmarks.md bench/results/fidelity-<time>/fidelity.md
    python bench/compare_tables.py A.md B.md --cells     # every differing cell too

A setting or a method in one file only is named. Exit status 0 when every shared setting
and method was compared (differences or not), 1 when the two files share no table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

STAR = "★"
SKIP = {"Seeds"}
"""Columns that are not measurements (the number of seeds is compared as a mismatch)."""


def _value(cell: str) -> float | None:
    """The mean of ``'97.64 ± 0.57'``, the number of ``'1.29e+08'``; ``None`` for text
    (``'—'``) and empty cells."""
    head = cell.split("±")[0].strip()
    try:
        value = float(head)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{heading: {method: {column: cell}}}`` for every pipe table in ``text`` whose
    first column is ``Method``, under the nearest heading above it."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif not line.startswith("|"):
            header = None
        elif header is None:
            cells = _cells(line)
            if cells and cells[0] == "Method":
                header = cells
                if heading in tables:
                    raise ValueError(f"two tables under the heading {heading!r}")
                tables[heading] = {}
        elif re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", line.strip()):
            continue
        else:
            cells = _cells(line)
            method = cells[0].replace(STAR, "").strip()
            tables[heading][method] = dict(zip(header[1:], cells[1:]))
    return tables


def compare(a: dict, b: dict) -> dict:
    """Per shared setting: ``columns`` {column: (max |Δ|, [methods at that max])},
    ``cells`` [(method, column, a cell, b cell)] that differ, and the methods found in
    one table only (``only_a``, ``only_b``)."""
    out = {}
    for setting in [s for s in a if s in b]:
        ta, tb = a[setting], b[setting]
        columns: dict[str, tuple[float, list[str]]] = {}
        cells = []
        for method in [m for m in ta if m in tb]:
            for column, cell in ta[method].items():
                other = tb[method].get(column)
                if other is None or column in SKIP and cell == other:
                    continue
                if cell != other:
                    cells.append((method, column, cell, other))
                va, vb = _value(cell), _value(other)
                if va is None or vb is None or column in SKIP:
                    continue
                diff = round(abs(va - vb), 10)
                best, where = columns.get(column, (0.0, []))
                if diff > best:
                    columns[column] = (diff, [method])
                elif diff == best:
                    columns[column] = (best, where + ([method] if diff else []))
        out[setting] = {"columns": columns, "cells": cells,
                        "only_a": [m for m in ta if m not in tb],
                        "only_b": [m for m in tb if m not in ta]}
    return out


def _fmt(diff: float) -> str:
    return f"{diff:.3g}" if diff and (diff < 0.01 or diff >= 1e4) else f"{diff:.2f}"


def report(result: dict, show_cells: bool) -> str:
    lines = []
    for setting, r in result.items():
        lines.append(f"## {setting}\n")
        cols = r["columns"]
        if cols:
            lines.append("| column | max abs difference | methods |")
            lines.append("|---|---|---|")
            for column, (diff, where) in cols.items():
                lines.append(f"| {column} | {_fmt(diff)} | {', '.join(where) or '—'} |")
        for key, label in (("only_a", "first"), ("only_b", "second")):
            if r[key]:
                lines.append(f"\nonly in the {label} file: {', '.join(r[key])}")
        if show_cells and r["cells"]:
            lines.append("\ndiffering cells (method, column: first -> second):")
            lines += [f"- {m}, {c}: {x} -> {y}" for m, c, x, y in r["cells"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--cells", action="store_true", help="list every differing cell")
    args = p.parse_args(argv)
    a, b = (read_tables(path.read_text(encoding="utf-8")) for path in (args.first, args.second))
    result = compare(a, b)
    for path, tables, other in ((args.first, a, b), (args.second, b, a)):
        alone = [s for s in tables if s not in other]
        if alone:
            print(f"settings only in {path}: {'; '.join(alone)}\n")
    if not result:
        print(f"{args.first} and {args.second} share no table (headings differ)",
              file=sys.stderr)
        return 1
    print(report(result, args.cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/compare_tables.py, run as a user runs it: the fidelity tables of
docs/benchmarks.md against a fidelity.md-style copy (``##`` headings, as
bench/fidelity.py writes them) with cells changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
IID = "digits / cnn / client-wise, 1 of 10 clients (forget ratio 0.1), IID"


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compare_tables.py"), *args],
                          capture_output=True, text=True, timeout=60)


def _as_fidelity_md(text: str) -> str:
    """The docs' tables under ``##`` headings, as fidelity.md has them."""
    return "\n".join("## " + line.lstrip("#").strip() if line.startswith("### ") else line
                     for line in text.splitlines())


def test_identical_tables_differ_by_zero_in_every_column(tmp_path):
    copy = tmp_path / "fidelity.md"
    copy.write_text(_as_fidelity_md(DOCS.read_text()))
    proc = _compare(str(DOCS), str(copy), "--cells")
    assert proc.returncode == 0, proc.stderr
    assert f"## {IID}\n" in proc.stdout
    assert "| Avg. Gap | 0.00 | — |" in proc.stdout
    assert "differing cells" not in proc.stdout
    assert proc.stdout.count("| MIA | 0.00 | — |") == 4  # the four settings


def test_a_changed_cell_is_measured_and_named(tmp_path):
    text = _as_fidelity_md(DOCS.read_text())
    nott = "| NoT ★ | 97.45 ± 0.85 | 96.81 ± 2.19 | 95.93 ± 0.64 | 51.16 ± 1.65 | 0.32 |"
    assert text.count(nott) == 1  # the IID table's NoT row
    text = text.replace(nott, "| NoT ★ | 97.45 ± 0.85 | 96.81 ± 2.19 | 95.93 ± 0.64 "
                              "| 50.87 ± 1.30 | 0.39 |")
    text = text.replace("| PGD | 95.96 ± 1.76 |", "| PGDX | 95.96 ± 1.76 |")
    copy = tmp_path / "fidelity.md"
    copy.write_text(text)
    proc = _compare(str(DOCS), str(copy), "--cells")
    assert proc.returncode == 0, proc.stderr
    iid = proc.stdout.split(f"## {IID}\n")[1].split("\n## ")[0]
    assert "| MIA | 0.29 | NoT |" in iid
    assert "| Avg. Gap | 0.07 | NoT |" in iid
    assert "| Retain | 0.00 | — |" in iid
    assert "- NoT, MIA: 51.16 ± 1.65 -> 50.87 ± 1.30" in iid
    assert "only in the first file: PGD" in iid and "only in the second file: PGDX" in iid
    backdoor = proc.stdout.split("IID, backdoor")[1]
    assert "| MIA | 0.00 | — |" in backdoor  # the same NoT cell elsewhere is untouched


def test_files_without_a_shared_table_are_refused(tmp_path):
    other = tmp_path / "other.md"
    other.write_text("## another setting\n\n| Method | Retain |\n|---|---|\n| FT | 1.00 ± 0.00 |\n")
    proc = _compare(str(DOCS), str(other))
    assert proc.returncode == 1
    assert "share no table" in proc.stderr
    assert "settings only in" in proc.stdout and "another setting" in proc.stdout

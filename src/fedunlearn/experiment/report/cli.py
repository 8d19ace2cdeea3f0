"""``fedunlearn-report <dir>``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ...harness.results import RESULTS_FILE
from .writer import write_report

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedunlearn-report",
        description="Tables (summary.md/.csv) and plots (metrics.png, forget_ratio.png; "
                    "gap_by_perturbation.png, gap_by_layer.png from trajectories) from "
                    "every results.json under a directory, in the NoT paper's layout.")
    parser.add_argument("root", help="a sweep dir, job dir, or any folder of results")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/report)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    args = parser.parse_args(argv)
    if not Path(args.root).exists():
        parser.error(f"{args.root} does not exist")
    report = write_report(args.root, args.out)
    if report is None:
        print(f"fedunlearn-report: no {RESULTS_FILE} under {args.root}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(report.markdown)
    print(f"Report written to {report.out_dir}:")
    for path in report.files:
        print(f"  {path}")
    return 0


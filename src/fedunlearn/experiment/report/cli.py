"""``fedunlearn-report <dir>``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ...harness.results import RESULTS_FILE
from .figure_style import ALLOWED_FORMATS, FIGURE_FORMATS, check_formats
from .writer import write_report

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedunlearn-report",
        description="Tables (summary.md/.csv) and figures (metrics, forget_ratio; "
                    "gap_by_perturbation, gap_by_layer from trajectories; PNG and PDF) "
                    "from every results.json under a directory, in the NoT paper's layout; "
                    "with outputs.npz from >= 4 seeds also the forgetting audit "
                    "(forgetting-audit.md/.json, KLOM and attack-ROC figures).")
    parser.add_argument("root", help="a sweep dir, job dir, or any folder of results")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/report)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    parser.add_argument("--formats", default=",".join(FIGURE_FORMATS),
                        help="figure formats, comma-separated, png among them (allowed: "
                             f"{', '.join(ALLOWED_FORMATS)}; default: %(default)s)")
    args = parser.parse_args(argv)
    if not Path(args.root).exists():
        parser.error(f"{args.root} does not exist")
    try:
        formats = check_formats(args.formats)
    except ValueError as err:
        parser.error(f"--formats: {err}")
    report = write_report(args.root, args.out, formats)
    if report is None:
        print(f"fedunlearn-report: no {RESULTS_FILE} under {args.root}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(report.markdown)
    print(f"Report written to {report.out_dir}:")
    for path in report.files:
        print(f"  {path}")
    return 0


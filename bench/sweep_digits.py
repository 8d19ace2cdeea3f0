"""Benchmark: the paper's client-wise comparison on digits, as a Hydra sweep + report.

    python bench/sweep_digits.py                       # retrain,ft,not x ratio 0.1,0.5 x seeds 0,1,2
    python bench/sweep_digits.py --quick               # 2+1 rounds, seed 0: a smoke run
    python bench/sweep_digits.py --methods retrain,not --seeds 0 -- federation.unlearn.rounds=5

Runs ``python -m fedunlearn.experiment -m ...`` on digits with the paper's protocol (the
pyproject run-config defaults: 10 clients IID, 30 FedAvg pretraining rounds, 15 unlearning
rounds, SGD lr 0.01 momentum 0.9, batch 32, 1 local epoch), then ``fedunlearn-report``,
and prints the summary tables and the total wall time. Pretrained models are cached per
seed (``checkpoint_dir``), so only the first job of each seed pretrains.
Extra arguments after ``--`` are passed to the sweep as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="retrain,ft,not")
    parser.add_argument("--ratios", default="0.1,0.5", help="forget ratios (fraction of clients)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None,
                        help="sweep dir (default: bench/results/sweep_digits-<time>)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="pretrained-model cache shared by the jobs (default: the app's)")
    parser.add_argument("--quick", action="store_true",
                        help="2 pretraining + 1 unlearning round, seed 0 only (a smoke run)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args(argv)

    out = Path(args.out or ROOT / "bench" / "results" /
               f"sweep_digits-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    seeds = "0" if args.quick and args.seeds == "0,1,2" else args.seeds
    overrides = [f"method={args.methods}", f"forget.ratio={args.ratios}", f"seed={seeds}",
                 "dataset=digits", "model=cnn", "forget=client", "report=false"]
    if args.quick:  # the tiny protocol, but 10 clients so that the ratios mean 1 and 5 targets
        overrides += ["federation=tiny", "federation.num_clients=10"]
    if args.checkpoint_dir:
        overrides.append(f"checkpoint_dir={Path(args.checkpoint_dir).resolve()}")
    overrides += args.overrides
    jobs = 1
    for value in (args.methods, args.ratios, seeds):
        jobs *= len(value.split(","))
    cmd = [sys.executable, "-m", "fedunlearn.experiment", "-m", *overrides,
           f"hydra.sweep.dir={out}"]
    print(f"bench: {jobs} jobs -> {out}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, HYDRA_FULL_ERROR="1"))
    sweep_s = time.perf_counter() - start

    from fedunlearn.experiment.report import write_report

    report = write_report(out)
    total_s = time.perf_counter() - start
    if report is None:
        print(f"bench: no results under {out} (sweep exit code {rc})")
        return 1
    print(report.markdown)
    failed = sorted(str(p.parent) for p in out.rglob("error.txt"))
    (out / "bench.json").write_text(json.dumps({
        "command": cmd, "jobs": jobs, "failed": failed, "sweep_s": round(sweep_s, 1),
        "total_s": round(total_s, 1), "results": sum(1 for _ in out.rglob("results.json")),
    }, indent=2) + "\n")
    print(f"Report: {report.out_dir}")
    print(f"bench: {jobs} jobs ({len(failed)} failed) in {sweep_s:.0f}s; total wall time "
          f"with report {total_s:.0f}s ({total_s / 60:.1f} min)")
    return 0 if rc == 0 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

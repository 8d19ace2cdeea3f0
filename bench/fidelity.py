"""How close does each method get to Retrain, and at what cost? One Markdown table.

Runs, on digits with the paper's CNN and 10 clients, every registered method that serves
each setting (a method refusing a scope is left out of that setting) over seeds, as one
``flwr run`` job per (setting, seed):

* ``iid-client``: IID, client 0 forgotten (the default job);
* ``dirichlet-client``: Dirichlet alpha 0.3, client 0 forgotten;
* ``class``: every client forgets class 3 (the class-forgetting preset);
* ``backdoor``: client 0 plants a BadNets trigger, then is forgotten (the backdoor preset).

Writes one Markdown table per setting (mean ± std over seeds; Avg. Gap to Retrain; rounds;
communication; FLOPs; each method's cost as a ratio to Retrain's) to ``--out``/fidelity.md
and prints it::

    python bench/fidelity.py                         # 4 settings x 3 seeds
    python bench/fidelity.py --engine local          # the same, in-process
    python bench/fidelity.py --engine local --batch-clients 32   # its batched mode
    python bench/fidelity.py --settings iid-client,dirichlet-client --seeds 0 -- unlearn.stop=validation
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path

from fedunlearn.engine import local_run
from fedunlearn.experiment.report import (LABELS, display_name, group_results,
                                          load_results)
from fedunlearn.launch import (check_run_config, flwr_run, load_preset, parse_overrides,
                               project_root)
from fedunlearn.strategies import get_method, list_methods

SETTINGS = {
    "iid-client": ({}, "client"),
    "dirichlet-client": ({"federation.partitioning": "dirichlet", "federation.alpha": 0.3},
                         "client"),
    "class": ("class-forgetting", "class"),
    "backdoor": ("backdoor", "client"),
}


def methods_for(scope: str, wanted: list[str] | None, run_config: dict | None = None
                ) -> list[str]:
    """The methods serving ``scope`` that can run with ``run_config`` (e.g. FUKD needs
    ``server-data.fraction`` > 0); the others are named and left out."""
    names = [m for m in (wanted or list_methods()) if scope in get_method(m).scopes]
    usable = []
    for m in names:
        try:
            check_run_config({**(run_config or {}), "method": m})
        except ValueError as err:
            print(f"left out {m}: {err}", flush=True)
            continue
        usable.append(m)
    return usable


def _cell(mean: float, std: float) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.2f} ± {std:.2f}"


def _ratio(value: float, ref: float) -> str:
    if not (ref and math.isfinite(ref) and math.isfinite(value)):
        return "—"
    return f"{value / ref:.2f}"


def setting_table(group) -> str:
    keys = group.keys
    header = (["Method"] + [LABELS.get(k, k) for k in keys]
              + ["Avg. Gap", "Rounds", "Comm. (B)", "FLOPs", "Comm. / Retrain",
                 "FLOPs / Retrain", "Seeds"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ref = group.reference
    for row in group.rows:
        c = row.cost_mean
        cells = [_cell(row.mean[k], row.std[k]) for k in keys]
        gap = "—" if row.avg_gap is None or not math.isfinite(row.avg_gap) else f"{row.avg_gap:.2f}"
        cells += [gap, f"{c['rounds']:.1f}", f"{c['comm_bytes']:.3g}", f"{c['flops']:.3g}",
                  _ratio(c["comm_bytes"], ref.cost_mean["comm_bytes"]) if ref else "—",
                  _ratio(c["flops"], ref.cost_mean["flops"]) if ref else "—", str(row.n)]
        lines.append("| " + " | ".join([display_name(row.method) + (" ★" if row.best else "")]
                                        + cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="", help="default: every method serving the scope")
    p.add_argument("--out", default="")
    p.add_argument("--checkpoint-dir", default="")
    p.add_argument("--engine", choices=("flower", "local"), default="flower",
                   help="flower: one `flwr run` per job; local: the in-process engine "
                        "(the same jobs and numbers, no Ray start-up)")
    p.add_argument("--batch-clients", type=int, default=0,
                   help="with --engine local: its batched mode, N clients per pass")
    p.add_argument("overrides", nargs="*", help="extra run-config KEY=VALUE for every job")
    args = p.parse_args()
    if args.batch_clients and args.engine != "local":
        p.error("--batch-clients is a mode of the in-process engine: add --engine local")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or project_root() / "bench" / "results" / f"fidelity-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    extra = parse_overrides(args.overrides)
    wanted = [m for m in args.methods.split(",") if m] or None
    start = time.perf_counter()
    failed = []
    for name in args.settings.split(","):
        base, scope = SETTINGS[name]
        rc = dict(load_preset(base)) if isinstance(base, str) else dict(base)
        rc["method"] = ",".join(methods_for(scope, wanted, {**rc, **extra}))
        for seed in args.seeds.split(","):
            job = out / f"{name}-seed{seed}"
            run_config = {**rc, **extra, "seed": int(seed), "output-dir": str(job),
                          "eval.every": 1000}
            if args.checkpoint_dir:
                run_config["checkpoint-dir"] = args.checkpoint_dir
            t0 = time.perf_counter()
            options = {"batch_clients": args.batch_clients} if args.batch_clients else {}
            launcher = local_run if args.engine == "local" else flwr_run
            code = launcher(run_config, num_supernodes=10, log_file=out / f"{job.name}.log",
                            echo=False, **options)
            print(f"{job.name}: exit {code} in {time.perf_counter() - t0:.0f}s "
                  f"({rc['method']})", flush=True)
            if code != 0:
                failed.append(job.name)
    parts = [f"# Fidelity benchmark ({stamp})\n",
             f"Seeds {args.seeds}; extra run-config: {extra or 'none'}; "
             f"{time.perf_counter() - start:.0f} s in all; failed jobs: {failed or 'none'}.\n"]
    groups = group_results(load_results(out))
    for group in groups:
        parts += [f"## {group.title}\n", setting_table(group)]
    text = "\n".join(parts)
    (out / "fidelity.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

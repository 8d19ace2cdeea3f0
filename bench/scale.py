"""How do the two engines scale with the number of clients? Per-round time and peak memory.

For each number of clients (default 10, 100 and 1,000) and each engine (``local``: the
in-process engine; ``batched``: its batched mode, ``--batch-clients`` clients per pass;
``flower``: ``flwr run`` on Flower's simulation engine, Ray actors),
one ``fedunlearn-run`` job in a process of its own: ``synthetic`` data with 20 training
samples per client (``dataset.size`` = 20 x clients; 16 train, 4 validation each), the
digits-sized CNN, ``--rounds`` pretraining rounds, then one FT round from it. Reported:
the median seconds per pretraining round (the first round left out: it warms the Ray
actors and the caches), the whole job's wall time, and the job's peak memory: the sum
of the proportional set size (PSS, so shared libraries count once) of every process the
job started (launcher, SuperLink, ServerApp, Ray workers), sampled every 0.2 s; and the
peak resident set size of the job's own process as the kernel counts it (``wait4``'s
``ru_maxrss``: the whole job on the in-process engines, libraries counted whole, so it
does not move with what other processes on the machine map, as PSS does; under
``flower`` the largest process the launcher waited for)::

    python bench/scale.py                         # 10, 100, 1000 clients x both engines
    python bench/scale.py --clients 10,100 --engines local --rounds 5
    python bench/scale.py --clients 1000,10000 --engines local,batched
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARK = "FEDUNLEARN_SCALE_BENCH"


def job_pss_mb(tag: str) -> float:
    """PSS (MB) of every process whose environment carries ``MARK=tag``."""
    total = 0
    needle = f"{MARK}={tag}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes():
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_job(clients: int, engine: str, rounds: int, work: Path, batch_clients: int = 32
            ) -> dict:
    out = work / f"{engine}-{clients}"
    tag = f"{engine}-{clients}-{os.getpid()}"
    env = dict(os.environ, **{MARK: tag, "FLWR_HOME": str(work / f"home-{engine}-{clients}")})
    mode = ["--engine", "local", "--batch-clients", str(batch_clients)] \
        if engine == "batched" else ["--engine", engine]
    cmd = [str(Path(sys.executable).with_name("fedunlearn-run")), *mode, "method=ft", "unlearn.rounds=1", f"pretrain.rounds={rounds}", "eval.every=100000",
           "dataset.name=synthetic", f"dataset.size={20 * clients}",
           f"federation.num-clients={clients}", f"output-dir={out}",
           f"checkpoint-dir={work / f'ck-{engine}-{clients}'}", "eval.mia-max-members=200"]
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], job_pss_mb(tag))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if rc != 0:
        sys.exit(f"{engine} with {clients} clients failed (exit {rc}); see {out / 'job.log'}")
    cost = json.loads((out / "ft" / "results.json").read_text())["pretrain"]["cost"]
    per_round = statistics.median(cost["round_s"][1:] or cost["round_s"])
    return {"clients": clients, "engine": engine, "round_s": per_round, "job_s": wall,
            "peak_mb": peak[0], "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--engines", default="local,flower",
                   help="comma-separated: local, batched, flower")
    p.add_argument("--batch-clients", type=int, default=32,
                   help="the batched engine's clients per pass")
    p.add_argument("--rounds", type=int, default=3, help="pretraining rounds per job")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fu-scale-") as tmp:
        for clients in [int(c) for c in args.clients.split(",")]:
            for engine in args.engines.split(","):
                row = run_job(clients, engine, args.rounds, Path(tmp), args.batch_clients)
                rows.append(row)
                print(f"{clients} clients, {engine}: {row['round_s']:.3f} s/round, job "
                      f"{row['job_s']:.0f} s, peak {row['peak_mb']:.0f} MB (PSS), "
                      f"{row['rss_mb']:.0f} MB (peak RSS)", flush=True)
    print("\n| clients | engine | s / round | job wall (s) | peak memory (MB, PSS) | "
          "peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['engine']} | {r['round_s']:.3f} | {r['job_s']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

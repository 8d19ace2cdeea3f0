"""One setting over K training seeds on one data split, with per-example outputs.

For seeds 0..K-1 runs the method list (Retrain included) as one job per seed on the
in-process engine, with the partition seed fixed (the same forget ids and client
partitions in every job: ``partition-seed``) and ``audit.outputs=true`` (``outputs.npz``
beside each ``results.json``: the logits of the original and of the method's model on
the forget ids, a fixed retain sample, the test set and, on the backdoor, the trigger
points). With ``--matched``, each seed also runs the budget-matched Retrain
(``retrain.budget=matched``: pretraining plus recovery rounds) as a job of its own,
from the same cached pretrained model. Seeds whose
outputs are all there are skipped (resume); progress and each job's wall time are
printed and kept in ``<out>/<setting>/audit-seeds.json``::

    python bench/forgetting_audit.py --seeds 32                       # digits, client 0, IID
    python bench/forgetting_audit.py --setting backdoor --seeds 32 --matched
    python bench/forgetting_audit.py --seeds 2 --methods retrain,not -- unlearn.rounds=5
    python bench/forgetting_audit.py --seeds 16 --seed-stride 2    # seeds 0, 2, ..., 30
    python bench/forgetting_audit.py --setting backdoor --seeds 4 --relearn 10
    python bench/forgetting_audit.py --seeds 32 --jobs 2    # two jobs at a time (2 cores)
    python bench/forgetting_audit.py --setting class --seeds 4 --methods retrain,ft,not
    python bench/forgetting_audit.py --setting instance --seeds 4 --methods retrain,ft,not

A method that cannot serve the setting's requests (FedEraser, FUKD and PGD serve only
client-wise ones; BadT, RandL, l1-sparse, SSD and SalUn only class- and instance-wise
ones) is left out before any job runs, with the reason; one that a job refuses (its
``skipped.json``) is left out of that seed, the reason printed and kept in
``audit-seeds.json``.

Layout: ``<out>/<setting>/seed<k>/`` (one folder per method) and, with ``--matched``,
``<out>/<setting>/seed<k>-matched/``. At the end (``--no-report`` to skip) the audit over
the seeds there (:func:`fedunlearn.experiment.report.write_forgetting_audit`: KLOM and the
per-example attack of every method against each Retrain, with floors; the scalar metrics
as mean ± 95% CI) is written to ``<out>/<setting>/report/`` (docs/measuring-forgetting.md,
Running the audit; docs/experiments.md, Seeds and per-example outputs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedunlearn.engine import local_run
from fedunlearn.harness.outputs import OUTPUTS_FILE
from fedunlearn.harness.results import RESULTS_FILE, SKIPPED_FILE, results_path
from fedunlearn.launch import (check_run_config, flwr_run, load_preset, parse_overrides,
                               project_root)

#: Instance-wise: half of client 0's training samples (58 of its 115 on digits, drawn
#: under the partition seed, the same for every training seed): enough forget points for
#: per-example statistics (the default forget.fraction, 0.1, gives 12).
INSTANCE = {"forget.scope": "instance", "forget.clients": "0", "forget.fraction": 0.5}
#: The settings: a preset (empty: the default job, digits client 0 IID) and run-config
#: values on top of it.
SETTINGS = {"iid-client": ("", {}), "backdoor": ("backdoor", {}),
            "class": ("class-forgetting", {}),  # every client forgets class 3
            "instance": ("", INSTANCE)}
STATE_FILE = "audit-seeds.json"


@dataclass
class Job:
    """One job of the audit: its folder, run-config and the methods it writes."""

    name: str
    directory: Path
    run_config: dict
    methods: list[str] = field(default_factory=list)

    def method_dir(self, method: str) -> Path:
        return results_path(self.directory, method).parent

    def published(self, method: str) -> bool:
        return ((self.method_dir(method) / RESULTS_FILE).is_file()
                and (self.method_dir(method) / OUTPUTS_FILE).is_file())

    def refused(self) -> dict[str, str]:
        """The methods the job refused (their ``skipped.json``, no results) and why."""
        out = {}
        for method in self.methods:
            path = self.method_dir(method) / SKIPPED_FILE
            if path.is_file() and not self.published(method):
                out[method] = str(json.loads(path.read_text()).get("skipped", "refused"))
        return out

    def done(self) -> bool:
        """Every method's ``results.json`` and ``outputs.npz`` are there, or the job
        refused the method (``skipped.json``: running it again changes nothing)."""
        refused = self.refused()
        return all(m in refused or self.published(m) for m in self.methods)


def served(methods: list[str], scope: str) -> list[str]:
    """The ``methods`` that serve ``scope``-wise requests; the others are left out, the
    reason printed (a method's ``scopes``, as its refusal names them)."""
    from fedunlearn.strategies import get_method

    kept = []
    for method in methods:
        scopes = get_method(method).scopes
        if scope in scopes:
            kept.append(method)
        else:
            print(f"left out: {method} cannot serve {scope}-wise requests; it serves "
                  f"{', '.join(scopes)}-wise requests", flush=True)
    return kept


def _checked(run_config: dict) -> dict:
    """The run-config with every default, checked (a bad key or value: SystemExit)."""
    try:
        return check_run_config(run_config)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def plan(setting: str, seeds: int, methods: list[str], partition_seed: int,
         matched: bool, out: Path, extra: dict, stride: int = 1,
         relearn: int = 0) -> list[Job]:
    """The jobs of one setting, seed by seed (seeds ``0, stride, ..., (seeds-1)*stride``;
    the matched Retrain after its seed's job); ``relearn`` > 0: every job measures each
    method's relearn time (``audit.relearn-rounds``)."""
    if setting not in SETTINGS:
        raise SystemExit(f"--setting {setting!r}; choose from {sorted(SETTINGS)}")
    if "retrain" not in methods:
        raise SystemExit(f"--methods {','.join(methods)}: the audit's reference is Retrain; "
                         "add retrain")
    preset, values = SETTINGS[setting]
    base = {**(load_preset(preset) if preset else {}), **values}
    common = {**base, **extra, "partition-seed": partition_seed, "audit.outputs": True,
              "eval.every": 1000}
    if relearn:
        common["audit.relearn-rounds"] = relearn
    scope = _checked({**common, "method": ",".join(methods)})["forget.scope"]
    methods = served(methods, scope)
    jobs = []
    for seed in range(0, seeds * stride, stride):
        rc = {**common, "seed": seed, "method": ",".join(methods)}
        jobs.append(Job(f"seed{seed}", out / setting / f"seed{seed}", rc, list(methods)))
        if matched:
            params = " ".join(p for p in (str(common.get("method-params", "")),
                                          "retrain.budget=matched") if p)
            rc = {**common, "seed": seed, "method": "retrain", "method-params": params}
            jobs.append(Job(f"seed{seed}-matched", out / setting / f"seed{seed}-matched",
                            rc, ["retrain"]))
    for job in jobs:
        job.run_config["output-dir"] = str(job.directory)
    for job in jobs[:2]:  # a bad key or value: before any job runs
        _checked(job.run_config)
    return jobs


def _launch(job: Job, engine: str, checkpoint_dir: str):
    """The launcher and its arguments for ``job`` (picklable: a worker process runs it)."""
    if checkpoint_dir:
        job.run_config["checkpoint-dir"] = checkpoint_dir
    launcher = local_run if engine == "local" else flwr_run
    return launcher, job.run_config, {
        "num_supernodes": int(job.run_config.get("federation.num-clients", 10)),
        "log_file": job.directory.with_suffix(".log"), "echo": False}


def _timed(launcher, run_config: dict, kwargs: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    code = launcher(run_config, **kwargs)
    return code, time.perf_counter() - t0


class _Progress:
    """Prints each finished job with an estimate of the time left, keeps the state file."""

    def __init__(self, state_path: Path, total: int, workers: int) -> None:
        self.state_path, self.total, self.workers = state_path, total, workers
        self.state = json.loads(state_path.read_text()) if state_path.is_file() \
            else {"jobs": {}}
        self.done = 0
        self.failed: list[str] = []
        self.start = time.perf_counter()

    def finished(self, job: Job, code: int, seconds: float) -> None:
        self.done += 1
        ok = code == 0 and job.done()
        if not ok:
            self.failed.append(job.name)
        eta = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {job.name}: {'done' if ok else 'FAILED'} in "
              f"{seconds:.0f} s ({','.join(job.methods)}); about {eta / 60:.1f} min left",
              flush=True)
        refused = job.refused()
        for method, reason in refused.items():
            print(f"  left out of {job.name}: {method} refused: {reason}", flush=True)
        self.state["jobs"][job.name] = {
            "wall_s": round(seconds, 1), "ok": ok, "methods": job.methods,
            "seed": job.run_config["seed"], "workers": self.workers,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            **({"refused": refused} if refused else {})}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")


def run_jobs(jobs: list[Job], state_path: Path, engine: str, checkpoint_dir: str,
             workers: int = 1) -> list[str]:
    """Run the jobs not yet done, ``workers`` at a time (each a process of its own with
    one torch thread, as ``local_run`` gives a job), printing progress; the failed jobs'
    names. A seed's matched Retrain starts after its seed's job, whose pretrained model
    it reuses from the checkpoint cache."""
    todo = [j for j in jobs if not j.done()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} job(s) already done; {len(todo)} to run"
          + (f", {workers} at a time" if workers > 1 and len(todo) > 1 else ""), flush=True)
    progress = _Progress(state_path, len(todo), workers)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            progress.finished(job, *_timed(*_launch(job, engine, checkpoint_dir)))
        return progress.failed
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    names = {j.name for j in todo}
    waiting = [j for j in todo if j.name.endswith("-matched")
               and j.name.removesuffix("-matched") in names]
    ready = [j for j in todo if j not in waiting]
    running: dict = {}  # future -> (job, start); at most ``workers``: the start is the job's
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        while ready or running:
            while ready and len(running) < workers:
                job = ready.pop(0)
                launcher, run_config, kwargs = _launch(job, engine, checkpoint_dir)
                running[pool.submit(launcher, run_config, **kwargs)] = (job, time.perf_counter())
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job, started = running.pop(future)
                try:
                    code = future.result()
                except Exception as err:  # noqa: BLE001 - a worker died: the job failed
                    print(f"{job.name}: the worker raised {type(err).__name__}: {err}",
                          flush=True)
                    code = 1
                progress.finished(job, code, time.perf_counter() - started)
                ready[:0] = [j for j in waiting if j.name == f"{job.name}-matched"]
                waiting = [j for j in waiting if j.name != f"{job.name}-matched"]
    return progress.failed


def report(directory: Path) -> bool:
    """The forgetting audit of ``directory``'s seeds, printed and written to
    ``<directory>/report/``; False when it could not be written (the reason printed)."""
    from fedunlearn.experiment.report import write_forgetting_audit

    try:
        audit = write_forgetting_audit(directory, directory / "report")
    except ValueError as err:
        print(f"report: not written: {err}", flush=True)
        return False
    print(audit.markdown, flush=True)
    print(f"Forgetting audit written to {audit.out_dir} ({len(audit.files)} files)", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="iid-client", help=f"one of {sorted(SETTINGS)}")
    p.add_argument("--seeds", type=int, default=32, help="K: training seeds 0..K-1")
    p.add_argument("--seed-stride", type=int, default=1,
                   help="2: seeds 0, 2, ..., 2(K-1), so that no Original shares Retrain's "
                        "initialisation (Retrain at seed s starts where pretraining at s+1 "
                        "does)")
    p.add_argument("--methods", default="retrain,ft,not,puf")
    p.add_argument("--matched", action="store_true",
                   help="also the budget-matched Retrain (pretraining + recovery rounds)")
    p.add_argument("--partition-seed", type=int, default=0,
                   help="the data split every seed runs on (default 0)")
    p.add_argument("--out", default=str(project_root() / "bench" / "results" /
                                        "forgetting-audit"))
    p.add_argument("--checkpoint-dir", default="")
    p.add_argument("--engine", choices=("local", "flower"), default="local")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N jobs at a time, each in a process of its own with one torch "
                        "thread (in-process engine; e.g. the number of cores)")
    p.add_argument("--relearn", type=int, default=0, metavar="N",
                   help="after each method, at most N rounds of federated training with "
                        "the forget data until forget accuracy (ASR) is back: "
                        "results.json's relearn (audit.relearn-rounds; 0: off)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the forgetting audit of the setting's seeds at the end "
                        "(default: on; --no-report to skip)")
    p.add_argument("overrides", nargs="*", help="extra run-config KEY=VALUE for every job")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.seed_stride < 1 or args.jobs < 1:
        raise SystemExit(f"--seeds {args.seeds} --seed-stride {args.seed_stride} --jobs "
                         f"{args.jobs}: expected at least 1 each")
    if args.jobs > 1 and args.engine != "local":
        raise SystemExit(f"--jobs {args.jobs} runs in-process jobs side by side; with "
                         "--engine flower each job is a federation of its own: use --jobs 1")
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out).expanduser().resolve()
    jobs = plan(args.setting, args.seeds, methods, args.partition_seed, args.matched, out,
                parse_overrides(args.overrides), args.seed_stride, args.relearn)
    start = time.perf_counter()
    failed = run_jobs(jobs, out / args.setting / STATE_FILE, args.engine, args.checkpoint_dir,
                      args.jobs)
    print(f"{args.setting}: {len(jobs)} job(s) in {out / args.setting}; this run "
          f"{time.perf_counter() - start:.0f} s; failed: {failed or 'none'}", flush=True)
    if args.report:
        report(out / args.setting)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

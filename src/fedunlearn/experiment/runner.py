"""``fedunlearn-experiment`` / ``python -m fedunlearn.experiment``: Hydra jobs and sweeps.

One Hydra job is one ``flwr run`` simulation job::

    python -m fedunlearn.experiment                                   # the default job
    python -m fedunlearn.experiment method=not forget.ratio=0.5       # one job, one method
    python -m fedunlearn.experiment -m method=retrain,ft,not forget.ratio=0.1,0.5,0.9 seed=0,1,2

Each job flattens its composed config into the Flower run-config
(:func:`fedunlearn.experiment.config.to_run_config`), writes ``run_config.json``, runs the
app through :func:`fedunlearn.launch.flwr_run` (own ports, local SuperLink stopped after)
with ``output-dir`` = the job directory, keeps the full Flower log in ``flwr.log`` and
echoes only the phase/round lines. A failed job writes ``error.txt`` (the error and the
tail of the log) and the sweep goes on; the command exits 1 at the end if any job failed.
When the run or sweep ends, the report (:mod:`fedunlearn.experiment.report`) is written to
``<run or sweep dir>/report`` (``report=false`` turns it off).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..console import JobConsole
from ..launch import (HARNESS_FINISHED, STARTING, check_run_config, flwr_run, interrupted,
                      run_config_arg)
from .config import (conf_dir, federation_settings, foreign_method_settings,
                     method_setting_paths, to_run_config)

ERROR_FILE = "error.txt"
LOG_FILE = "flwr.log"
RUN_CONFIG_FILE = "run_config.json"
TAIL_LINES = 40

# What this process did (the basic launcher runs every job of a sweep in this process).
_STATE: dict[str, list] = {"job_dirs": [], "failed": []}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SHOWN = (STARTING, "Results written", "REJECTED", "No valid unlearning request", "Exit Code",
          "unhandled exception")


class JobFailed(RuntimeError):
    """A job that ran but did not produce its results (its message says why)."""


# ---------------------------------------------------------------------------------------
# progress output
# ---------------------------------------------------------------------------------------
def phase_markers() -> tuple[str, ...]:
    """``[pretrain]``, ``[measure]`` and one ``[<method>]`` per registered method."""
    from ..strategies import list_methods

    return tuple(f"[{name}]" for name in ("pretrain", "measure", *list_methods()))


class PhaseFilter(JobConsole):
    """The echo target of a Hydra job (:class:`fedunlearn.console.JobConsole`): a progress
    bar for the running phase, and of the rest of the log only the lines with a phase
    marker (``[measure] original: ...``, ``[not] unlearned: ...``), errors and the final
    "Results written" line, each after the time of day and the job's tag. ``verbose``:
    every line as it came. The job's log file (``flwr.log``) has everything.
    """

    def __init__(self, out, tag: str, markers: tuple[str, ...], verbose: bool = False):
        self.markers = markers
        super().__init__(out, verbose=verbose, tag=tag, show=self._shown)

    def _shown(self, message: str) -> bool:
        return (any(m in message for m in self.markers)
                or any(s in message for s in _SHOWN))


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = _ANSI.sub("", Path(path).read_text(errors="replace"))
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def sweep_size(argv: list[str]) -> int | None:
    """Number of jobs the basic sweeper makes of ``argv`` (product of the sweeps)."""
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import ValueType

        args, _ = get_args_parser().parse_known_args(argv[1:])
        total = 1
        for override in OverridesParser.create().parse_overrides(args.overrides):
            if not override.is_sweep_override():
                continue
            if override.value_type not in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP,
                                           ValueType.RANGE_SWEEP):
                return None  # glob sweeps depend on the config groups
            total *= len(list(override.sweep_iterator()))
        return total
    except Exception:  # noqa: BLE001 - progress display only
        return None


# ---------------------------------------------------------------------------------------
# one job
# ---------------------------------------------------------------------------------------
def _absolute(path: str, base: Path) -> str:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def job_run_config(cfg: DictConfig | Mapping, job_dir: Path, base_dir: Path) -> dict:
    """The job's run-config: flattened, output in the job dir, paths made absolute.

    The ServerApp runs in another working directory (Flower installs the app under
    ``$FLWR_HOME``), so relative paths are resolved against ``base_dir`` (where the
    command was started).
    """
    run_config = to_run_config(cfg)
    run_config["output-dir"] = _absolute(str(run_config.get("output-dir") or job_dir), base_dir)
    for key in ("checkpoint-dir", "dataset.root"):
        if run_config.get(key):
            run_config[key] = _absolute(str(run_config[key]), base_dir)
    return run_config


def run_job(cfg: DictConfig | Mapping, job_dir: str | Path, *, tag: str = "[job]",
            base_dir: str | Path | None = None, verbose: bool = False, dry_run: bool = False,
            launcher: Callable[..., int] = flwr_run, out=None) -> bool:
    """Run one experiment job in ``job_dir``; return whether it produced results.

    Never raises for a failed job (bad config, ``flwr run`` failure, no results): it
    writes ``error.txt`` with the error and the tail of ``flwr.log`` and returns False,
    so that a sweep goes on with its next job. ``KeyboardInterrupt`` still stops it.
    ``dry_run``: validate and write ``run_config.json`` (with the ``--run-config`` string
    for ``flwr run``), start nothing.
    """
    out = out or sys.stdout
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    base = Path(base_dir or os.getcwd())
    log_file = job_dir / LOG_FILE
    start, started = time.perf_counter(), time.time() - 1.0  # mtime granularity
    try:
        run_config, fed = _checked_run_config(cfg, job_dir, base)
        _write_run_config(job_dir, run_config, fed)
        _note_foreign_settings(cfg, out, tag)
        if dry_run:
            out.write(f"{tag} dry run: --run-config '{run_config_arg(run_config)}'\n"
                      f"{tag} written to {job_dir / RUN_CONFIG_FILE}\n")
            out.flush()
            return True
        _refuse_service_mode(run_config)
        _announce(out, tag, run_config, log_file)
        with PhaseFilter(out, tag, phase_markers(), verbose=verbose) as filt, \
                contextlib.redirect_stdout(filt):
            rc = launcher(run_config, num_supernodes=fed["num_supernodes"],
                          num_cpus=fed["num_cpus"], num_gpus=fed["num_gpus"],
                          log_file=log_file, echo=True, finished_marker=HARNESS_FINISHED)
        if rc != 0:
            raise JobFailed(f"flwr run failed (exit code {rc})")
        _check_fresh_results(Path(run_config["output-dir"]), started)
    except Exception as err:  # noqa: BLE001 - a failed job must not stop the sweep
        _report_failure(err, job_dir, log_file, out, tag, start)
        return False
    (job_dir / ERROR_FILE).unlink(missing_ok=True)
    out.write(f"{tag} done in {time.perf_counter() - start:.0f}s -> {job_dir}\n")
    out.flush()
    return True


def _note_foreign_settings(cfg: DictConfig | Mapping, out, tag: str) -> None:
    """Say which of another method's settings this job's method runs without."""
    foreign = foreign_method_settings(cfg)
    if foreign:
        method = OmegaConf.select(cfg, "method.name") if isinstance(cfg, DictConfig) \
            else cfg["method"]["name"]
        out.write(f"{tag} note: {method} has no {', '.join(foreign)} (another method's "
                  "setting in this sweep): ignored\n")


def _checked_run_config(cfg: DictConfig | Mapping, job_dir: Path,
                        base: Path) -> tuple[dict, dict]:
    """``(run_config, federation settings)`` of a job, checked: one simulated SuperNode
    per client, and a valid run-config."""
    run_config = job_run_config(cfg, job_dir, base)
    fed = federation_settings(cfg)
    if fed["num_supernodes"] != run_config.get("federation.num-clients", 10):
        raise ValueError(
            f"federation.num_supernodes={fed['num_supernodes']} but "
            f"federation.num_clients={run_config.get('federation.num-clients', 10)}: "
            "each simulated SuperNode holds one client's partition, they must be equal")
    check_run_config(run_config)
    return run_config, fed


def _write_run_config(job_dir: Path, run_config: dict, fed: dict) -> None:
    """The job's ``run_config.json``: the run-config, the federation settings and the
    ``--run-config`` string for ``flwr run``."""
    (job_dir / RUN_CONFIG_FILE).write_text(json.dumps(
        {"run_config": run_config, "federation": fed,
         "run_config_arg": run_config_arg(run_config)}, indent=2) + "\n")


def _refuse_service_mode(run_config: dict) -> None:
    """``ValueError`` for a service-mode run-config: it is no sweep job."""
    if run_config.get("service.rounds", 0):
        raise ValueError(
            f"service.rounds={run_config['service.rounds']}: service mode is a federation "
            "that trains and serves requests until its budget, not a sweep job measured "
            "into tables; run it with fedunlearn-run, on a deployment (this job's "
            "run_config.json with dry_run=true gives the --run-config for `flwr run . "
            "<connection>`), or with fedunlearn.UnlearningService")


def _announce(out, tag: str, run_config: dict, log_file: Path) -> None:
    """The job's main run-config keys and its log file, on ``out``."""
    out.write(f"{tag} run-config: " + " ".join(
        f"{k}={run_config[k]}" for k in ("method", "dataset.name", "model.name", "seed",
                                         "forget.scope", "forget.clients")
        if k in run_config) + f"\n{tag} log: {log_file}\n")
    out.flush()


def _check_fresh_results(results_dir: Path, started: float) -> None:
    """:class:`JobFailed` unless the run wrote a ``results.json`` under ``results_dir``
    since ``started``."""
    fresh = [p for p in results_dir.rglob("results.json") if p.stat().st_mtime >= started]
    if not fresh:
        hint = (" - no valid unlearning request (see no-request.json)"
                if (results_dir / "no-request.json").exists() else "")
        raise JobFailed(f"the run ended without writing results.json in {results_dir}{hint}")


def _report_failure(err: Exception, job_dir: Path, log_file: Path, out, tag: str,
                    start: float) -> None:
    """A failed job (called while ``err`` is handled): ``error.txt`` with the error, its
    traceback and the tail of the log, and a summary on ``out``."""
    detail = str(err) if isinstance(err, JobFailed) else traceback.format_exc()
    tail = log_tail(log_file)
    (job_dir / ERROR_FILE).write_text(
        f"{type(err).__name__}: {err}\n\n{detail}\n\n--- last {TAIL_LINES} lines of "
        f"{log_file} ---\n{tail}\n")
    out.write(f"{tag} FAILED after {time.perf_counter() - start:.0f}s: "
              f"{type(err).__name__}: {err}\n")
    if log_file.exists():
        out.write("\n".join(f"{tag} | {line}" for line in tail.splitlines()[-15:]) + "\n")
    out.write(f"{tag} details: {job_dir / ERROR_FILE}\n")
    out.flush()


def launcher_for(engine, batch_clients=0) -> Callable[..., int]:
    """The job launcher of ``engine``: ``flower`` (``flwr run``, the default) or ``local``
    (the in-process engine, :func:`fedunlearn.engine.local_run`), with its batched mode
    when ``batch_clients`` > 0."""
    from ..batching import check_batch_clients
    from ..engine import ENGINES, local_run

    engine = "flower" if engine in (None, "") else str(engine)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose from {ENGINES}")
    batch_clients = check_batch_clients(0 if batch_clients is None else batch_clients)
    if engine != "local":
        if batch_clients:
            raise ValueError(f"batch_clients={batch_clients} is the in-process engine's "
                             "batched mode: add engine=local (or set batch_clients=0)")
        return flwr_run
    return functools.partial(local_run, batch_clients=batch_clients) if batch_clients \
        else local_run


# ---------------------------------------------------------------------------------------
# Hydra entry point
# ---------------------------------------------------------------------------------------
@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> bool:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = " ".join(hc.overrides.task) or "(defaults)"
    if hc.mode == RunMode.MULTIRUN:
        num = int(hc.job.num) + 1
        total = sweep_size(sys.argv)
        position = f"{num}/{total}" if total else f"{num}"
        remaining = f", {total - num} after this one" if total else ""
        tag = f"[job {position}]"
        print(f"\n=== job {position}{remaining}: {overrides}", flush=True)
    else:
        tag = "[job]"
        print(f"\n=== job: {overrides}", flush=True)
    # Hydra logs the root logger at INFO; importing Flower's server side in this process
    # (engine=local) makes alembic announce its plugins there.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    ok = run_job(cfg, job_dir, tag=tag, base_dir=hc.runtime.cwd, verbose=bool(cfg.get("verbose")),
                 dry_run=bool(cfg.get("dry_run")), launcher=launcher_for(cfg.get("engine"),
                                                    cfg.get("batch_clients", 0)))
    _STATE["job_dirs"].append(str(job_dir))
    if not ok:
        _STATE["failed"].append(str(job_dir))
    return ok


class ReportCallback(Callback):
    """At the end of a run or sweep: list failed jobs and write the report."""

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            root = Path(HydraConfig.get().runtime.output_dir)
        except Exception:  # noqa: BLE001
            root = Path(_STATE["job_dirs"][-1]) if _STATE["job_dirs"] else None
        self._finish(config, root)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(config, Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def _finish(config: DictConfig, root: Path | None) -> None:
        if root is None or not root.exists():
            return
        failed = sorted(root.rglob(ERROR_FILE))
        if failed:
            print(f"\n{len(failed)} job(s) failed:")
            for path in failed:
                first = path.read_text(errors="replace").splitlines()[:1]
                print(f"  {path.parent}: {first[0] if first else ''}")
        if not OmegaConf.select(config, "report", default=True):
            return
        from .report import write_report

        try:
            report = write_report(root)
        except Exception as err:  # noqa: BLE001 - the results are there; say why no report
            print(f"\nreport: not written ({type(err).__name__}: {err}); "
                  f"run `fedunlearn-report {root}` to retry")
            return
        if report is not None:
            print(f"\n{report.markdown}\nReport: {report.out_dir}")


_METHOD_LIST = re.compile(r"^method=([A-Za-z0-9_]+(?:,[A-Za-z0-9_]+)+)$")


def rewrite_method_list(argv: list[str]) -> list[str]:
    """``method=a,b`` in a single (non ``-m``) run: one flwr job running both methods.

    Hydra would reject the comma list outside a multirun; it becomes
    ``method=compare method.name='a,b'``.
    """
    multirun = any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN" for a in argv)
    if multirun:
        return list(argv)
    out = []
    for arg in argv:
        match = _METHOD_LIST.match(arg)
        if match:
            out += ["method=compare", f"method.name='{match.group(1)}'"]
        else:
            out.append(arg)
    return out


_METHOD_SETTING = re.compile(r"^method\.([A-Za-z0-9_.]+)=")


def open_method_settings(argv: list[str]) -> list[str]:
    """In a multirun, ``method.<path>=...`` for a setting some method of ``conf/method/``
    declares becomes ``++method.<path>=...``, so that a sweep over methods can set one
    method's setting (``-m method=retrain,not method.params.perturbation=negate,reinit``):
    in the jobs of the other methods it is dropped with a note
    (:func:`fedunlearn.experiment.config.foreign_method_settings`). A path no method
    declares is left as it is, for Hydra to refuse."""
    if not any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN" for a in argv):
        return list(argv)
    declared = set().union(*method_setting_paths().values())
    return [f"++{arg}" if (m := _METHOD_SETTING.match(arg)) and m.group(1) in declared else arg
            for arg in argv]


def main() -> None:
    """Console script ``fedunlearn-experiment``; exits 1 if any job failed."""
    sys.argv = open_method_settings(rewrite_method_list(sys.argv))
    try:
        hydra_main()
    except KeyboardInterrupt:
        sys.exit(interrupted("fedunlearn-experiment"))
    if _STATE["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

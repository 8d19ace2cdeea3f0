"""``fedunlearn-run``: one ``flwr run`` simulation job, started and cleaned up (or, with
``--engine local``, the same job in this process: :mod:`fedunlearn.engine`).

``flwr run .`` starts a detached local SuperLink that keeps running after the job and is
reused by later jobs on the same ports. This wrapper gives each job its own ports (or
the ones you pass), streams the logs, and stops the SuperLink it caused to start, so
that jobs never share a stale SuperLink and nothing is left running.

Everything after the options is passed on as run-config, e.g.::

    fedunlearn-run method=not forget.scope=class forget.classes=3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .batching import check_batch_clients
from .console import strip_colours
from .engine import flatten, project_root  # noqa: F401  (public here too)

# `flwr run --stream` exits 0 even when the ServerApp fails; its log says so instead.
_FAILURE = re.compile(r"Exit Code: (\d+)|An unhandled exception occurred")
# What the harness's ServerApp logs when it finished: without it the ServerApp died (e.g.
# killed) while `flwr run --stream` still exits 0.
HARNESS_FINISHED = re.compile(r"Results written to |No valid unlearning request was received|"
                              r"\[service\] stopped at round ")

FLWR_ENV_DEFAULTS = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def free_port_pair() -> tuple[int, int]:
    """Two free TCP ports on the loopback interface."""
    socks = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def toml_value(value) -> str:
    """A run-config value as TOML (strings quoted, bools lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config_arg(run_config: Mapping) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


def find_processes(*needles: str) -> list[int]:
    """PIDs of processes whose command line contains every one of ``needles``."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in args for n in needles):
            pids.append(int(proc.name))
    return pids


def superlink_pids(control_port: int) -> list[int]:
    """PIDs of local SuperLink processes (and their SuperExec) bound to ``control_port``."""
    pids = find_processes("flower-superlink", f"127.0.0.1:{control_port}")
    children = [c for p in pids for c in find_processes("flower-superexec", f"--parent-pid {p}")]
    return pids + children


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return not Path("/proc").is_dir()
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def stop_pids(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the PIDs that needed SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_running(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if pid_running(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return killed


#: Start of the line :func:`flwr_run` prints while Flower starts (a blank screen otherwise).
STARTING = "starting Flower"


def flwr_run(run_config: Mapping, *, num_supernodes: int = 10, num_cpus: int = 1,
             num_gpus: float = 0.0, app: str | Path | None = None,
             ports: tuple[int, int] | None = None, env: Mapping[str, str] | None = None,
             log_file: str | Path | None = None, echo: bool = True,
             finished_marker: re.Pattern | None = None) -> int:
    """Run one simulation job through ``flwr run --stream`` and stop its SuperLink.

    With ``finished_marker`` (e.g. :data:`HARNESS_FINISHED`), a job whose output never
    matches it is a failure (exit code 1) even when ``flwr run`` exits 0.

    Returns ``flwr run``'s exit code. Output goes to stdout (``echo``, as it comes)
    and/or ``log_file`` (without colour codes).
    """
    http_port, control_port = ports or free_port_pair()
    full_env = _flwr_env(env, http_port, control_port)
    cmd = _flwr_command(run_config, num_supernodes, num_cpus, num_gpus, app)
    log = open(log_file, "a") if log_file else None
    try:
        if log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
        if echo:  # Flower prints nothing a user reads until the first round
            sys.stdout.write(f"{STARTING}: a simulation of {int(num_supernodes)} SuperNodes "
                             "(the first round follows in 20-80 s) ...\n")
            sys.stdout.flush()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        failed, finished = _stream_output(proc.stdout, log, echo, finished_marker)
        rc = proc.wait()
        if rc == 0 and not failed and finished_marker is not None and not finished:
            message = ("fedunlearn: the ServerApp did not finish (no closing line in its "
                       "output: it was killed or lost); no results were written for the "
                       "methods it had not finished")
            sys.stderr.write(message + "\n")
            if log:
                log.write(message + "\n")
            return 1
        return rc if rc != 0 else (1 if failed else 0)
    finally:
        if log:
            log.close()
        stop_pids(superlink_pids(control_port))


def _flwr_env(env: Mapping[str, str] | None, http_port: int, control_port: int) -> dict:
    """The environment of ``flwr run``: this one, :data:`FLWR_ENV_DEFAULTS` where unset,
    ``env``, this interpreter's scripts first on ``PATH`` and the local SuperLink's
    ports."""
    full_env = dict(os.environ)
    for key, value in FLWR_ENV_DEFAULTS.items():
        full_env.setdefault(key, value)
    full_env.update(env or {})
    # flwr starts `flower-superlink` by name: make this interpreter's scripts findable.
    bindir = str(Path(sys.executable).parent)
    full_env["PATH"] = bindir + os.pathsep + full_env.get("PATH", "")
    full_env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    full_env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    return full_env


def _flwr_command(run_config: Mapping, num_supernodes: int, num_cpus: int, num_gpus: float,
                  app: str | Path | None) -> list[str]:
    """The ``flwr run --stream`` command line of a simulation job."""
    federation = (f"num-supernodes={int(num_supernodes)} "
                  f"client-resources-num-cpus={int(num_cpus)} "
                  f"client-resources-num-gpus={num_gpus}")
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(app or project_root()),
           "--stream", "--federation-config", federation]
    if run_config:
        cmd += ["--run-config", run_config_arg(run_config)]
    return cmd


def _stream_output(lines, log, echo: bool,
                   finished_marker: re.Pattern | None) -> tuple[bool, bool]:
    """Pass ``flwr run``'s output on to stdout (``echo``) and ``log`` (without colour
    codes); return ``(failed, finished)``: whether a line reported a failure, and
    whether one matched ``finished_marker``."""
    failed = finished = False
    for line in lines:
        failed = failed or bool(_FAILURE.search(line))
        finished = finished or bool(finished_marker and finished_marker.search(line))
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        if log:
            log.write(strip_colours(line))
    return failed, finished


def default_run_config(app: str | Path | None = None) -> dict:
    """The app's run-config defaults from ``[tool.flwr.app.config]``, flattened."""
    import tomllib

    data = tomllib.loads((Path(app or project_root()) / "pyproject.toml").read_text())
    return flatten(data["tool"]["flwr"]["app"]["config"])


def check_run_config(overrides: Mapping, app: str | Path | None = None) -> dict:
    """Merge ``overrides`` into the defaults and validate, before starting Flower.

    Raises ``ValueError`` for an unknown key or a bad value, naming it.
    """
    from .harness.config import ExperimentConfig

    merged = default_run_config(app)
    unknown = sorted(set(overrides) - set(merged))
    if unknown:
        raise ValueError("; ".join(unknown_key_message(key, merged) for key in unknown)
                         + " (every key and its default: docs/running.md)")
    merged.update(overrides)
    from .harness.methods import check_methods

    cfg = ExperimentConfig.from_run_config(merged)
    check_methods(cfg)
    check_machine(cfg)
    return merged


def unknown_key_message(key: str, known) -> str:
    """``unknown run-config key 'x'`` with the closest known keys (``did you mean``: the
    key with dashes for underscores, else a close name in its section, else a close key
    anywhere), or else the keys of its section (the part before the first dot)."""
    import difflib

    known = sorted(known)
    section, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    close = [key.replace("_", "-")] if key.replace("_", "-") in known else [
        siblings[n] for n in difflib.get_close_matches(name, sorted(siblings), n=2, cutoff=0.6)
    ] or difflib.get_close_matches(key, known, n=2, cutoff=0.8)
    if close:
        return f"unknown run-config key {key!r}: did you mean {' or '.join(map(repr, close))}?"
    top = key.split(".")[0]
    same = [k for k in known if k.split(".")[0] == top]
    return f"unknown run-config key {key!r}" + (f"; the {top!r} keys: {same}" if same else "")


def check_machine(cfg) -> None:
    """What only this machine can tell, before Flower starts: the device exists and the
    output and checkpoint folders can be written. Raises ``ValueError`` naming the key."""
    import torch

    if cfg.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= count:
            have = (f"CUDA devices 0..{count - 1}" if count else "no CUDA device")
            raise ValueError(f"device={cfg.device!r}: this machine has {have}; use "
                             "'auto', 'cpu' or an existing 'cuda:N'")
    folders = [("checkpoint-dir", cfg.resolved_checkpoint_dir())]
    if cfg.output_dir:
        folders.insert(0, ("output-dir", Path(cfg.output_dir).expanduser()))
    for key, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".fedunlearn-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"{key}={str(folder)!r} is not a folder this user can write "
                             f"({err.strerror or err}); give a writable folder") from None


def preset_path(name: str, app: str | Path | None = None) -> Path:
    """``presets/<name>.toml`` of the app (or ``name`` itself if it is a file)."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    root = Path(app or project_root()) / "presets"
    path = root / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in root.glob("*.toml"))
        raise ValueError(f"preset {name!r} not found; available presets: {known}")
    return path


def load_preset(name: str, app: str | Path | None = None) -> dict:
    """A preset's run-config values, flattened to dotted keys."""
    import tomllib

    return flatten(tomllib.loads(preset_path(name, app).read_text()))


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"run-config override {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_scalar(value.strip())
    return out


def _parse_scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # SIGTERM -> SystemExit, so the `finally` that stops the SuperLink still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.batch_clients and args.engine != "local":
            raise ValueError(f"--batch-clients={args.batch_clients} is a mode of the "
                             "in-process engine: add --engine local")
        check_batch_clients(args.batch_clients)
        overrides = load_preset(args.preset, args.app) if args.preset else {}
        overrides.update(parse_overrides(args.overrides))
        check_run_config(overrides, args.app)
    except ValueError as err:
        parser.error(str(err))
    if args.check:
        print("run-config OK")
        return 0
    n = args.num_supernodes or int(overrides.get("federation.num-clients", 10))
    log_file = _job_log_file(args, overrides)
    from .console import JobConsole

    try:
        with JobConsole(sys.stdout, verbose=args.verbose) as console, \
                contextlib.redirect_stdout(console):
            if args.engine == "local":
                from .engine import local_run

                return local_run(overrides, num_supernodes=n, num_cpus=args.num_cpus,
                                 num_gpus=args.num_gpus, app=args.app, log_file=log_file,
                                 batch_clients=args.batch_clients)
            return flwr_run(overrides, num_supernodes=n, num_cpus=args.num_cpus,
                            num_gpus=args.num_gpus, app=args.app, log_file=log_file,
                            finished_marker=HARNESS_FINISHED if args.app is None else None)
    except KeyboardInterrupt:
        return interrupted("fedunlearn-run")


def interrupted(command: str) -> int:
    """What a launcher does on Ctrl-C (after its ``finally`` blocks stopped what it
    started): one line instead of a traceback, and the shell's exit code for SIGINT."""
    sys.stderr.write(f"\n{command}: interrupted (Ctrl-C); the processes it started were "
                     "stopped; methods it had not finished wrote no results\n")
    return 128 + signal.SIGINT


def _parser() -> argparse.ArgumentParser:
    """The command line of ``fedunlearn-run``."""
    parser = argparse.ArgumentParser(
        prog="fedunlearn-run",
        description="Run one fedunlearn simulation job with `flwr run --stream` "
                    "and stop the local SuperLink afterwards.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="run-config overrides, e.g. method=not forget.clients=0,1")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="simulated SuperNodes (default: federation.num-clients or 10)")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs per client actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per client actor")
    parser.add_argument("--app", default=None, help="Flower App directory")
    parser.add_argument("--preset", default=None,
                        help="run-config preset from presets/ (e.g. backdoor, "
                             "class-forgetting); KEY=VALUE overrides still apply")
    parser.add_argument("--engine", choices=("flower", "local"), default="flower",
                        help="flower: `flwr run` on Flower's simulation engine (Ray actors, "
                             "GPUs per actor; the default); local: the in-process engine "
                             "(the same strategies and ClientApp handlers in this process, "
                             "no Ray, no SuperLink: the same results, much faster for "
                             "small models)")
    parser.add_argument("--batch-clients", type=int, default=0, metavar="N",
                        help="with --engine local: train the plain train messages of a "
                             "round together, N clients per torch.func pass (0: one message "
                             "at a time; see docs/running.md)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the whole log as it comes (Flower's per-round lines, "
                             "Ray's notes) instead of the progress display; the log file "
                             "has everything either way")
    parser.add_argument("--log-file", default=None,
                        help="the job's full log, without colour codes (default: "
                             "<output-dir>/job.log)")
    parser.add_argument("--check", action="store_true",
                        help="only check the run-config (every key, this machine's device "
                             "and folders) and exit: 0 when it is good, 2 naming the bad "
                             "value")
    return parser


def _job_log_file(args: argparse.Namespace, overrides: dict) -> Path | str | None:
    """The job's log file (``--log-file``, else ``<output-dir>/job.log``), its folder
    made; without ``--app`` and an ``output-dir``, the harness's default output folder
    is chosen here (into ``overrides``) so that the log goes beside the results."""
    log_file = args.log_file
    if args.app is None and not overrides.get("output-dir"):
        # The harness's default (~/fedunlearn-results/<time>), chosen here so that the
        # job's log file goes beside its results.
        from .harness.run import resolve_output_dir

        overrides["output-dir"] = str(resolve_output_dir(""))
    if log_file is None and overrides.get("output-dir"):
        log_file = Path(str(overrides["output-dir"])).expanduser() / "job.log"
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    return log_file

if __name__ == "__main__":
    sys.exit(main())

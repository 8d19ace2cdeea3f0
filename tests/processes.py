"""Background processes a test starts, stopped for sure: at the fixture's teardown, when
pytest is interrupted (Ctrl-C, SIGTERM, SIGHUP) and when pytest itself is killed.

:func:`start_group` starts a command as the leader of its own process group (its own
session: a Ctrl-C in pytest's terminal does not reach it half-way) and records it. Every
process the command starts stays in that group unless it makes a session of its own, so
one ``killpg`` stops the lot:

- :func:`stop_group` (a fixture's finalizer): SIGTERM to the group, SIGKILL to whatever
  is left after ``timeout``;
- an ``atexit`` hook and SIGTERM/SIGHUP handlers, installed with the first group, stop
  every group still recorded when pytest exits or is told to stop (a Ctrl-C raises
  ``KeyboardInterrupt``, after which pytest runs the finalizers and exits);
- on Linux the leader gets SIGTERM from the kernel when pytest dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``), so a script with a cleanup trap (``scripts/deploy_local.sh``)
  still stops what it started.

No torch or flwr import here: a child pytest that checks this module starts in a second.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedunlearn.launch import pid_running, stop_pids

_GROUPS: dict[int, subprocess.Popen] = {}  # process-group id -> its leader
_INSTALLED = False
_PR_SET_PDEATHSIG = 1


running = pid_running  # tests ask whether a process they started still runs
stop = stop_pids


def _die_with_parent() -> None:
    """In the child before ``exec``: SIGTERM when the process that started it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_group(args: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **popen_kwargs)`` as the leader of a new process group,
    recorded until :func:`stop_group` stops it."""
    _install()
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent,
                            **popen_kwargs)
    _GROUPS[proc.pid] = proc  # a new session's group id is its leader's PID
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    if not Path("/proc").is_dir():
        return True
    for entry in Path("/proc").iterdir():  # zombies still count for killpg
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
                return True
    return False


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGTERM ``proc``'s process group (the leader's trap runs), SIGKILL what is left
    after ``timeout`` s; True when SIGKILL was needed. The leader is reaped."""
    pgid = proc.pid
    _GROUPS.pop(pgid, None)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pgid):
        if proc.poll() is None:
            time.sleep(0.1)
        else:
            time.sleep(0.05)
    needed_kill = _group_alive(pgid)
    if needed_kill:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return needed_kill


def stop_all(timeout: float = 10.0) -> None:
    """Stop every recorded group (pytest exits or was told to stop)."""
    for proc in list(_GROUPS.values()):
        stop_group(proc, timeout)


def _on_signal(signum, frame) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal, as without the handler


def _install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; atexit and PDEATHSIG still hold
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_signal)

"""Interrupting pytest leaves no process a test started (``tests/processes.py``, the way
``tests/test_deployment.py`` starts ``scripts/deploy_local.sh``).

A child pytest runs a test whose fixture starts a fake deployment through
:func:`tests.processes.start_group`: a bash script with a cleanup trap like
``deploy_local.sh``'s, two children and, except where noted, a grandchild the trap does
not know (it is orphaned when its parent stops). The child pytest is then stopped the
three ways a user stops it (Ctrl-C, SIGTERM, kill -9) and every one of those processes
must be gone. A second, cheap test checks the SIGKILL step of :func:`stop_group`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .processes import running, start_group, stop_group

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and prctl")

# A deployment in small: children recorded and stopped by the EXIT trap (TERM, then KILL
# after 1 s, as deploy_local.sh does); with ORPHAN=1 a grandchild the trap never sees.
FAKE_DEPLOYMENT = r"""
set -u
STARTED=()
cleanup() {
    trap - EXIT INT TERM
    kill -TERM "${STARTED[@]}" 2>/dev/null
    sleep 1
    kill -KILL "${STARTED[@]}" 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
sleep 300 & STARTED+=("$!")
bash -c 'trap "" TERM; while :; do sleep 1; done' & STARTED+=("$!")
pids="$$ ${STARTED[*]}"
if [[ "$ORPHAN" == 1 ]]; then
    bash -c 'sleep 300 & echo $! > grandchild; wait' & STARTED+=("$!")
    while [[ ! -s grandchild ]]; do sleep 0.05; done
    pids="$pids ${STARTED[2]} $(cat grandchild)"
fi
echo "$pids" > pids.tmp && mv pids.tmp pids
wait
"""

INNER_TEST = """
import os, signal, subprocess, sys, time
import pytest
# Ctrl-C as in a terminal: a test runner started in the background by a non-interactive
# shell (a CI script) inherits SIGINT ignored, and so would this pytest.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
from tests.processes import start_group, stop_group

@pytest.fixture
def deployment():
    proc = start_group(["bash", "-c", {script!r}], cwd={cwd!r}, env=dict(os.environ, ORPHAN={orphan!r}),
                       stdin=subprocess.DEVNULL)
    yield proc
    stop_group(proc, timeout=3.0)

def test_runs_long(deployment):
    time.sleep(300)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return [int(p) for p in path.read_text().split()]
        assert proc.poll() is None, f"the child pytest ended early: {proc.communicate()}"
        time.sleep(0.1)
    pytest.fail(f"no {path.name} within {timeout:.0f}s")


@pytest.mark.parametrize("how,orphan", [
    (signal.SIGINT, "1"),   # Ctrl-C: KeyboardInterrupt, pytest runs the finalizer
    (signal.SIGTERM, "1"),  # the handler stops every recorded group, then pytest dies
    (signal.SIGKILL, "0"),  # nothing runs in pytest: the kernel's SIGTERM runs the trap
], ids=["ctrl-c", "sigterm", "kill-9"])
def test_stopping_pytest_stops_what_its_test_started(tmp_path, how, orphan):
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(INNER_TEST).format(
        repo=str(REPO), script=FAKE_DEPLOYMENT, cwd=str(tmp_path), orphan=orphan))
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    pytest_proc = start_group(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(inner)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        pids = _wait_for(tmp_path / "pids", pytest_proc, timeout=120)
        assert len(pids) == (5 if orphan == "1" else 3) and all(map(running, pids))
        os.kill(pytest_proc.pid, how)
        pytest_proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(running, pids)):
            time.sleep(0.1)
        left = [p for p in pids if running(p)]
        assert not left, f"left running after {how.name}: {left}"
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        stop_group(pytest_proc, timeout=5.0)


def test_stop_group_kills_what_ignores_sigterm(tmp_path):
    proc = start_group(["bash", "-c", "trap '' TERM; sleep 300 & echo $! > child; wait"],
                       cwd=tmp_path, stdin=subprocess.DEVNULL)
    child = _wait_for(tmp_path / "child", proc, timeout=30)[0]
    assert stop_group(proc, timeout=1.0) is True  # SIGTERM was not enough
    assert proc.returncode == -signal.SIGKILL and not running(child)

"""End to end on a real Flower deployment: ``flower-superlink`` + 3 ``flower-supernode``s.

``scripts/deploy_local.sh`` starts the SuperLink and the SuperNodes on loopback with
ports of their own, writes the CLI connection into a private ``FLWR_HOME`` and runs
``flwr run . <connection> --stream``. Node 0 asks to be forgotten through its
node-config (``forget-scope="client"``), node 1 sends an invalid request (a class outside
the label set) that the server must reject, and the run-config's ``forget.clients`` is
empty, so only node-config requests count.

In a deployment every message starts a fresh ``flwr-clientapp`` process (torch and
fedunlearn imported again, 8-9 CPU-seconds each) and SuperNodes poll the SuperLink every
3 s, so even this small job (3 pretraining rounds, 2 NoT rounds: 24 ClientApp processes,
about 250 CPU-seconds in all) takes about 2.5 minutes on an idle 2-core machine.

Every process the run starts, down to the SuperExec, ServerApp and ClientApp processes,
is stopped by PID: by the script's trap, and if anything survives it, by the fixture's
teardown, which then fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "deploy_local.sh"
BIN_DIR = Path(sys.executable).parent
RUN_TIMEOUT_S = 540  # ~150 s on an idle 2-core machine, up to ~300 s on a busy one

pytestmark = pytest.mark.skipif(
    not (BIN_DIR / "flower-supernode").exists() or sys.platform != "linux",
    reason="needs Linux and flower-superlink/flower-supernode next to the Python running pytest",
)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _processes_with_home_under(root: Path) -> list[int]:
    """PIDs of live processes whose ``FLWR_HOME`` lies under ``root``.

    Every Flower process of the deployment (SuperLink, SuperNodes, SuperExecs, ServerApp,
    ClientApps, ``flwr run``) inherits a ``FLWR_HOME`` inside the test's work dir, which
    no other process on the machine has.
    """
    prefix = f"FLWR_HOME={root}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(var.startswith(prefix) for var in environ.split(b"\0")) and _running(
                int(entry.name)):
            found.append(int(entry.name))
    return found


def _stop(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM, then SIGKILL after ``timeout``; returns the PIDs that needed SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if _running(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return killed


class Deployment:
    """``scripts/deploy_local.sh`` run in the background, stopped for sure at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir.parent / "deploy_local.log"
        self.proc: subprocess.Popen | None = None

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> int:
        full_env = dict(os.environ, WORKDIR=str(self.workdir), FLWR_BIN_DIR=str(BIN_DIR),
                        **env)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"deploy_local.sh ran over {timeout:.0f}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def recorded_pids(self) -> list[int]:
        """The PIDs the script wrote: what it started and their descendants (as a record;
        liveness is checked with :func:`_processes_with_home_under`)."""
        pid_file = self.workdir / "pids"
        if not pid_file.exists():
            return []
        return sorted({int(line) for line in pid_file.read_text().split() if line.isdigit()})

    def teardown(self) -> list[int]:
        """Stop the script (its trap stops the rest); return PIDs still alive after it.

        Only processes that carry this deployment's ``FLWR_HOME`` count, so a PID the
        system has reused for someone else's process is never touched.
        """
        if self.proc is not None and self.proc.poll() is None:
            _stop([self.proc.pid], timeout=30.0)  # SIGTERM runs the script's cleanup trap
            self.proc.wait()
        leftover = _processes_with_home_under(self.workdir)
        if leftover:
            _stop(leftover, timeout=5.0)
        return leftover


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path / "deploy")
    yield dep
    leftover = dep.teardown()
    assert not leftover, f"processes left running after the deployment: {leftover}"
    assert not _processes_with_home_under(dep.workdir)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------
def test_not_client_wise_request_from_node_config(tmp_path, deployment):
    out = tmp_path / "out"
    env = {
        "NUM_NODES": "3",
        "FORGET_NODE": "0",
        "FORGET_SCOPE": "client",
        "METHOD": "not",
        "OUTPUT_DIR": str(out),
        # Node 1 asks for a class that does not exist: the server must reject it by name.
        "NODE_CONFIG_1": 'forget-scope="class" forget-classes="42"',
        # Flower's SuperExecs look for new ClientApp/ServerApp tasks every 1 s by default.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
    }
    args = ['dataset.name="digits"', 'model.name="cnn"', "pretrain.rounds=3",
            "unlearn.rounds=2", "eval.every=100", "eval.mia-max-members=200",
            f'checkpoint-dir="{tmp_path / "checkpoints"}"']
    start = time.monotonic()
    rc = deployment.run(args, env, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - start
    log = deployment.output()
    assert rc == 0, log[-6000:]
    print(f"deployment run: {wall:.1f}s")

    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "not"
    assert len(res["request"]) == 1, res["request"]
    request = res["request"][0]
    assert (request["scope"], request["partition_id"]) == ("client", 0)
    assert request["node_id"] > 0  # bound by the server to the sending SuperNode
    assert len(res["rejected"]) == 1, res["rejected"]
    assert res["rejected"][0]["node_id"] not in (0, request["node_id"])
    assert "class(es) [42] outside the label set 0..9" in res["rejected"][0]["reason"]
    for which in ("original", "unlearned"):
        assert set(res[which]) >= {"retain", "forget", "test", "mia"}, res[which]
        for key in ("retain", "forget", "test", "mia"):
            assert 0.0 <= res[which][key] <= 100.0, (which, key, res[which][key])
    assert res["cost"]["comm_bytes"] > 0
    assert res["cost"]["rounds"] == 2
    assert res["pretrain"]["cached"] is False
    assert res["config"]["forget"]["clients"] == []  # only the node-config request counted

    # What the operator sees in the streamed ServerApp log.
    assert f"Unlearning request accepted from node {request['node_id']}" in log
    assert (f"Unlearning request REJECTED from node {res['rejected'][0]['node_id']}: "
            "class(es) [42] outside the label set 0..9") in log

    # The script started the SuperLink, 3 SuperNodes and `flwr run` (and those started
    # SuperExecs, the ServerApp and ClientApps), and stopped all of them itself.
    assert len(deployment.recorded_pids()) >= 5, deployment.recorded_pids()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _processes_with_home_under(deployment.workdir):
        time.sleep(0.1)
    assert not _processes_with_home_under(deployment.workdir)


def test_script_rejects_bad_node_count(tmp_path, deployment):
    rc = deployment.run([], {"NUM_NODES": "zero"}, timeout=30)
    assert rc == 2
    assert "NUM_NODES=zero must be a positive integer" in deployment.output()

"""End to end on a secured Flower deployment: ``flower-superlink`` + 3 ``flower-supernode``s
with TLS and SuperNode authentication, request inboxes, receipts and the audit log.

``scripts/deploy_local.sh`` generates a throwaway CA, a SuperLink certificate and one
ECDSA key pair per SuperNode (``scripts/make_certs.py``, nothing downloaded), starts the
SuperLink with TLS and ``--enable-supernode-auth``, registers the SuperNodes' public keys
(``flwr supernode register``), starts them with their private keys, and one more
SuperNode whose key is not registered (it claims partition 0): the SuperLink must refuse
it while the job completes. Once the SuperNodes run, node 0's data owner files a
client-wise request and node 1's a request for a class that does not exist
(``fedunlearn request file``, in each node's inbox). The run-config keeps the default
``forget.clients="0"``, which a deployment ignores. After the run the test reads back the
receipts on the nodes (``fedunlearn request list/show``) and checks the server's audit
log record by record.

In a deployment every message starts a fresh ``flwr-clientapp`` process (torch and
fedunlearn imported again, 8-9 CPU-seconds each) and SuperNodes poll the SuperLink every
3 s, so even this small job (3 pretraining rounds, 2 NoT rounds, 3 receipts: 27 ClientApp
processes) takes about 3 minutes on an idle 2-core machine.

Every process the run starts, down to the SuperExec, ServerApp and ClientApp processes,
is stopped by PID: by the script's trap, and if anything survives it, by the fixture's
teardown, which then fails the test. The script runs as the leader of its own process
group (``tests/processes.py``): when pytest is interrupted (Ctrl-C, SIGTERM, SIGHUP) the
group is stopped, and when pytest is killed the script gets SIGTERM and its trap runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import running, start_group, stop, stop_group

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "deploy_local.sh"
BIN_DIR = Path(sys.executable).parent
RUN_TIMEOUT_S = 900  # ~3 min on an idle 2-core machine, up to ~8 min on a busy one

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (BIN_DIR / "flower-supernode").exists() or sys.platform != "linux",
    reason="needs Linux and flower-superlink/flower-supernode next to the Python running pytest",
)]


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
def _processes_with_home_under(root: Path) -> list[int]:
    """PIDs of live processes whose ``FLWR_HOME`` lies under ``root``.

    Every Flower process of the deployment (SuperLink, SuperNodes, SuperExecs, ServerApp,
    ClientApps, ``flwr run``) inherits a ``FLWR_HOME`` inside the test's work dir, which
    no other process on the machine has.
    """
    prefix = f"FLWR_HOME={root}/".encode()
    exact = f"FLWR_HOME={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(var.startswith(prefix) or var == exact for var in environ.split(b"\0")) and running(
                int(entry.name)):
            found.append(int(entry.name))
    return found


class Deployment:
    """``scripts/deploy_local.sh`` run in the background, stopped for sure at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir.parent / "deploy_local.log"
        self.proc: subprocess.Popen | None = None

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> int:
        self.start(args, env)
        return self.wait(timeout)

    def start(self, args: list[str], env: dict[str, str]) -> None:
        """Start the script without waiting (see :meth:`wait`)."""
        full_env = dict(os.environ, WORKDIR=str(self.workdir), FLWR_BIN_DIR=str(BIN_DIR),
                        **env)
        with self.log.open("wb") as out:
            self.proc = start_group(
                ["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"deploy_local.sh ran over {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait_for_log(self, pattern: str, after: str | None = None, timeout: float = 600) -> None:
        """Block until the job's log (``logs/run.log``) has a line matching ``pattern``
        (after the first line matching ``after``, when given)."""
        regex, start = re.compile(pattern), re.compile(after) if after else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            path = self.workdir / "logs" / "run.log"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            if start is not None:
                begin = next((i for i, line in enumerate(lines) if start.search(line)), None)
                lines = [] if begin is None else lines[begin:]
            if any(regex.search(line) for line in lines):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the deployment ended before {pattern!r}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in the job's log within {timeout:.0f}s")

    def kill_supernode(self, name: str) -> list[int]:
        """``kill -9`` SuperNode ``name`` and every process it started (its ClientApps):
        the machine is gone."""
        pids = _processes_with_home_under(self.workdir / f"supernode-{name}")
        assert pids, f"no process of SuperNode {name}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

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
            stop([self.proc.pid], timeout=30.0)  # SIGTERM runs the script's cleanup trap
            self.proc.wait()
        leftover = _processes_with_home_under(self.workdir)
        if self.proc is not None:
            stop_group(self.proc, timeout=5.0)  # what the trap missed; forgets the group
        if leftover:
            stop(leftover, timeout=5.0)
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
def fedunlearn_cli(*args: str) -> str:
    """Run the ``fedunlearn`` command as a data owner or auditor would."""
    exe = BIN_DIR / "fedunlearn"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedunlearn.cli"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def test_secured_deployment_with_inbox_receipts_and_audit(tmp_path, deployment):
    out = tmp_path / "out"
    env = {
        "NUM_NODES": "3",
        "SECURE": "1",
        "STRANGER_NODES": "1",  # an unregistered key claiming partition 0
        "FORGET_NODE": "0",
        "FORGET_VIA": "inbox",
        "FORGET_SCOPE": "client",
        # Node 1's data owner asks for a class that does not exist: rejected by name.
        "INBOX_REQUEST_1": "--scope class --classes 42",
        "METHOD": "not",
        "OUTPUT_DIR": str(out),
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
    work = deployment.workdir

    # --- TLS and SuperNode authentication ------------------------------------------------
    registered = dict(line.split() for line in (work / "node-ids").read_text().splitlines())
    assert sorted(registered) == ["0", "1", "2"]
    node_of = {int(p): int(n) for p, n in registered.items()}
    assert "TLS + SuperNode authentication" in log
    connection = (work / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in connection and "insecure" not in connection
    stranger = (work / "strangers").read_text().split()
    assert stranger[:2] == ["stranger-0", "exited"] and stranger[2] != "0", stranger
    stranger_log = (work / "logs" / "supernode-stranger-0.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in stranger_log, stranger_log[-2000:]

    # --- Results: the request came from node 0's inbox, bound to its registered id -------
    res = json.loads((out / "not" / "results.json").read_text())
    assert res["method"] == "not"
    assert [(r["scope"], r["partition_id"], r["node_id"]) for r in res["request"]] == [
        ("client", 0, node_of[0])]
    assert len(res["rejected"]) == 1, res["rejected"]
    rejected = res["rejected"][0]
    assert rejected["node_id"] == node_of[1]
    assert "class(es) [42] outside the label set 0..9" in rejected["reason"]
    assert res["config"]["forget"]["clients"] == []  # the default "0" was ignored
    assert "forget.clients=0 is ignored on a deployment" in log
    for which in ("original", "unlearned"):
        for key in ("retain", "forget", "test", "mia"):
            assert 0.0 <= res[which][key] <= 100.0, (which, key, res[which][key])
    assert res["cost"]["comm_bytes"] > 0 and res["cost"]["rounds"] == 2
    assert res["pretrain"]["cached"] is False
    assert f"Unlearning request accepted from node {node_of[0]}" in log
    assert (f"Unlearning request REJECTED from node {node_of[1]}: "
            "class(es) [42] outside the label set 0..9") in log

    # --- Receipts, read back on the nodes with the data owner's command ------------------
    inbox0 = json.loads(fedunlearn_cli("request", "list", "--inbox", str(work / "inbox-0"),
                                       "--json"))["requests"]
    inbox1 = json.loads(fedunlearn_cli("request", "list", "--inbox", str(work / "inbox-1"),
                                       "--json"))["requests"]
    assert [r["status"] for r in inbox0] == ["honoured"] and inbox0[0]["scope"] == "client"
    assert [r["status"] for r in inbox1] == ["rejected"]
    assert "outside the label set" in inbox1[0]["detail"]
    shown = json.loads(fedunlearn_cli("request", "show", "--inbox", str(work / "inbox-0"),
                                      inbox0[0]["id"], "--json"))
    events = shown["receipts"]
    assert [e["status"] for e in events] == ["sent", "accepted", "honoured"]
    assert {e["node"] for e in events} == {node_of[0]}
    run_id = events[0]["run"]
    assert all(e["run"] == run_id for e in events)

    # --- The audit log, record by record ------------------------------------------------
    from fedunlearn.audit import read_audit

    reading = read_audit(out / "audit.jsonl")
    assert reading.intact and not reading.skipped, (reading.chain_breaks, reading.skipped)
    records = reading.records
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert all(r["run"] == run_id for r in records)
    by_event: dict[str, list[dict]] = {}
    for r in records:
        by_event.setdefault(r["event"], []).append(r)
    order = [r["event"] for r in records]
    assert order[0] == "job.started" and order[1] == "federation.verified"
    assert order[-1] == "job.finished"
    started = records[0]
    assert started["deployment"] is True and started["ignored_forget_clients"] == [0]
    assert started["methods"] == ["not"] and started["num_clients"] == 3
    assert records[1]["nodes"] == {str(n): p for p, n in node_of.items()}
    assert "node.excluded" not in by_event  # the stranger never got in
    received = {r["node"]: r for r in by_event["request.received"]}
    assert set(received) == {node_of[0], node_of[1]}
    assert received[node_of[0]]["scope"] == "client"
    assert received[node_of[0]]["inbox_ids"] == [inbox0[0]["id"]]
    assert received[node_of[1]]["classes"] == [42]
    assert all(len(r["digest"]) == 64 and "sample_ids" not in r for r in received.values())
    assert [r["node"] for r in by_event["request.accepted"]] == [node_of[0]]
    assert [(r["node"], r["reason"]) for r in by_event["request.rejected"]] == [
        (node_of[1], rejected["reason"])]
    verdicts = {(r["node"], r["status"]) for r in by_event["receipt.sent"]}
    assert verdicts == {(node_of[0], "accepted"), (node_of[1], "rejected"),
                        (node_of[0], "honoured")}
    (begun,) = by_event["unlearning.started"]
    (finished,) = by_event["unlearning.finished"]
    assert begun["method"] == finished["method"] == "not"
    assert begun["targets"] == [node_of[0]]
    assert finished["rounds"] == 2 and finished["comm_bytes"] == res["cost"]["comm_bytes"]
    assert finished["metrics"] == res["unlearned"]
    before = finished["model_before_arrays_sha256"]
    assert begun["model_before_arrays_sha256"] == before != finished["model_arrays_sha256"]
    assert events[1]["model_before_arrays_sha256"] == before
    assert events[2]["model_sha256"] == finished["model_sha256"] == res["model"]["sha256"]
    assert events[2]["method"] == "not" and events[2]["rounds"] == 2
    assert order.index("request.accepted") < order.index("unlearning.started") < order.index(
        "unlearning.finished")
    table = fedunlearn_cli("audit", str(out / "audit.jsonl"))
    assert table.splitlines()[-1] == f"{len(records)} record(s); chain intact"
    for event in ("job.started", "request.rejected", "unlearning.finished", "receipt.sent"):
        assert event in table
    # The data owners check the log against the chain heads their receipts carry.
    anchored = fedunlearn_cli("audit", str(out / "audit.jsonl"), "--inbox",
                              str(work / "inbox-0"), "--inbox", str(work / "inbox-1"))
    assert anchored.splitlines()[-1].endswith("receipt anchor(s) checked")
    assert "; chain intact, " in anchored.splitlines()[-1]

    # The script started the SuperLink, 4 SuperNodes, `flwr run` (and those started
    # SuperExecs, the ServerApp and ClientApps), and stopped all of them itself.
    assert len(deployment.recorded_pids()) >= 6, deployment.recorded_pids()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _processes_with_home_under(deployment.workdir):
        time.sleep(0.1)
    assert not _processes_with_home_under(deployment.workdir)


def test_nodes_killed_mid_job_fail_their_method_and_their_metrics(tmp_path, deployment):
    """``method=puf,not`` on 3 insecure SuperNodes. Node 0's data owner asks to be
    forgotten (client-wise, inbox). Node 0's SuperNode is killed (``kill -9``, with its
    ClientApps) as PUF's unlearning round starts: PUF, which needs the target, fails with
    the departed node in its ``failed.json`` and the audit log; NoT still runs. Node 2's
    SuperNode is killed after NoT's first recovery round: the later rounds count it as
    failed, and the unlearned model's Retain / Forget / MIA are missing (the original
    was measured over every node), never a number over fewer nodes. The job exits 1."""
    out = tmp_path / "out"
    env = {"NUM_NODES": "3", "SECURE": "0", "FORGET_NODE": "0", "FORGET_SCOPE": "client",
           "METHOD": "puf,not", "OUTPUT_DIR": str(out),
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    args = ["pretrain.rounds=2", "unlearn.rounds=3", "eval.every=1",
            "eval.mia-max-members=200", f'checkpoint-dir="{tmp_path / "checkpoints"}"']
    start = time.monotonic()
    deployment.start(args, env)
    deployment.wait_for_log(r"\[puf\] unlearning starts")
    deployment.kill_supernode("0")
    deployment.wait_for_log(r"\[not\] round 1/3", after=r"\[not\] unlearning starts")
    deployment.kill_supernode("2")
    rc = deployment.wait(RUN_TIMEOUT_S)
    print(f"deployment with two kills: {time.monotonic() - start:.1f}s")
    log = deployment.output()
    assert rc == 1, log[-6000:]
    assert "job 1 FAILED" in log
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    node_of = {p: int(n) for n, p in next(e for e in events
                                          if e["event"] == "federation.verified")["nodes"].items()}
    departed = [(e["node"], e["partition"]) for e in events if e["event"] == "node.departed"]
    assert departed == [(node_of[0], 0), (node_of[2], 2)], departed

    # PUF could not finish: its failure, with the node that left, and no result.
    failed = json.loads((out / "puf" / "failed.json").read_text())
    assert "no target" in failed["failed"], failed["failed"]
    assert f"[{node_of[0]}] left the federation" in failed["failed"]
    assert failed["departed_nodes"] == [node_of[0]]
    assert not (out / "puf" / "results.json").exists()
    puf_failed = next(e for e in events if e["event"] == "unlearning.failed")
    assert puf_failed["method"] == "puf" and "left the federation" in puf_failed["reason"]

    # NoT finished; node 2 is failed from round 2 on, and the metrics it would have
    # changed are missing.
    res = json.loads((out / "not" / "results.json").read_text())
    assert res["measurement"]["original"]["failed_nodes"] == []
    assert node_of[2] in res["measurement"]["unlearned"]["failed_nodes"]
    for key in ("retain", "forget", "mia"):
        value = res["unlearned"][key]
        assert value is None or value != value, (key, value)
    assert 0 < res["unlearned"]["test"] <= 100  # the server's own test set needs no node
    assert sorted(res["departed_nodes"]) == sorted([node_of[0], node_of[2]])
    assert [e["method"] for e in events if e["event"] == "unlearning.finished"] == ["not"]
    assert "job.failed" in [e["event"] for e in events]
    # The target's verdict stays in the server's log (node 0 is gone: no receipt reached
    # it); its request stays pending for the next job.
    listed = json.loads(fedunlearn_cli("request", "list", "--inbox",
                                       str(deployment.workdir / "inbox-0"), "--json"))
    assert [r["status"] for r in listed["requests"]] == ["accepted"], listed


def _serverapp_pids(deployment) -> list[int]:
    return [pid for pid in _processes_with_home_under(deployment.workdir)
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_service_serverapp_killed_mid_step_resumes_and_serves_once(tmp_path, deployment):
    """Service mode on 3 SuperNodes. Node 1's data owner files a client-wise request
    while the federation trains; the ServerApp is killed (``kill -9``) during the
    unlearning step: ``flwr run --stream`` exits 0, the script says the ServerApp did not
    finish, and the audit log of that run ends without a terminal record (the next run
    records ``job.interrupted`` for it). Started again (``RESTARTS=1``, as a supervisor
    would) with the same run-config, it resumes from the checkpoint (round numbers go on,
    the version increases by one), the request is honoured exactly once, and the job
    completes."""
    out = tmp_path / "out"
    env = {"NUM_NODES": "3", "SECURE": "0", "METHOD": "not", "FORGET_NODE": "none",
           "OUTPUT_DIR": str(out), "RESTARTS": "1",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    args = ["service.rounds=3", "service.query-every=2", "pretrain.rounds=1",
            "unlearn.rounds=3", f'checkpoint-dir="{tmp_path / "checkpoints"}"']
    deployment.start(args, env)
    deployment.wait_for_log(r"\[service\] round 1 \|")
    request_id = fedunlearn_cli("request", "file", "--inbox",
                                str(deployment.workdir / "inbox-1"), "--scope",
                                "client").strip().split()[-1]
    deployment.wait_for_log(r"\[service\] unlearning step 1 at round")
    killed = _serverapp_pids(deployment)
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    rc = deployment.wait(RUN_TIMEOUT_S)
    log = deployment.output()
    assert rc == 0, log[-6000:]
    assert "the ServerApp did not finish" in log
    assert "the ServerApp died; restarting it (1/1)" in log
    summary = json.loads((out / "service.json").read_text())
    (step,) = summary["steps"]
    assert summary["resumed_from"] == step["round"] == 2 and summary["round"] == 3
    assert step["version"] == 1  # the checkpoint's version (0) + 1
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.count("request.accepted") == 1 and names.count("request.honoured") == 1
    assert names.count("unlearning.started") == 2 and names.count("unlearning.finished") == 1
    assert "service.resumed" in names
    interrupted = next(e for e in events if e["event"] == "job.interrupted")
    killed_run = next(e for e in events if e["event"] == "unlearning.started")["run"]
    assert interrupted["interrupted_run"] == killed_run != interrupted["run"]
    assert interrupted["last_event"] == "unlearning.started"
    resumed = next(e for e in events if e["event"] == "service.resumed")
    assert resumed["round"] == step["round"] and resumed["version"] == 0
    honoured = next(e for e in events if e["event"] == "request.honoured")
    assert honoured["published_version"] == 1 and honoured["round"] == step["round"]
    run_log = (deployment.workdir / "logs" / "run.log").read_text()
    after = run_log[run_log.index("[service] resumed from"):]
    assert f"[service] round {step['round'] + 1} |" in after
    assert "[service] round 1 |" not in after
    shown = fedunlearn_cli("request", "show", "--inbox", str(deployment.workdir / "inbox-1"),
                           request_id)
    assert "honoured" in shown and "node's check of version 1: model hash matches" in shown
    listed = fedunlearn_cli("versions", str(out), "--request", request_id)
    assert "unlearned" in listed and "hash ok" in listed


def test_service_with_a_dropout_and_a_puf_target_that_left(tmp_path, deployment):
    """Service mode on 5 SuperNodes with PUF; node 0 asks to be forgotten and its
    SuperNode is killed as the unlearning step starts. PUF cannot reach its target: it is
    tried again, then the request fails with the reason in the audit log (its receipt
    cannot reach the node that left: it is recorded as undelivered); the federation
    trains on with the 4 others, says so every round, and the job exits 1 naming the
    failed request."""
    out = tmp_path / "out"
    env = {"NUM_NODES": "5", "SECURE": "0", "METHOD": "puf", "FORGET_NODE": "0",
           "FORGET_SCOPE": "client", "OUTPUT_DIR": str(out),
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    args = ["service.rounds=3", "service.query-every=4", "pretrain.rounds=1",
            "unlearn.rounds=2", "service.method-retries=1",
            f'checkpoint-dir="{tmp_path / "checkpoints"}"']
    deployment.start(args, env)
    deployment.wait_for_log(r"\[service\] unlearning step 1 at round")
    deployment.kill_supernode("0")
    rc = deployment.wait(RUN_TIMEOUT_S)
    log = deployment.output()
    assert rc == 1, log[-6000:]
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    node_of = {p: int(n) for n, p in next(e for e in events
                                          if e["event"] == "federation.verified")["nodes"].items()}
    summary = json.loads((out / "service.json").read_text())
    assert summary["round"] == 3 and summary["steps"] == []
    (failed,) = summary["failed"]
    assert failed["node"] == node_of[0] and failed["attempts"] == 2
    assert "left the federation" in failed["reason"]
    assert summary["departed_nodes"] == [node_of[0]]
    names = [e["event"] for e in events]
    assert names.count("unlearning.failed") == 2 and names.count("request.failed") == 1
    undelivered = next(e for e in events if e["event"] == "receipt.undelivered")
    assert undelivered["node"] == node_of[0] and "could not serve" in undelivered["reason_failed"]
    run_log = (deployment.workdir / "logs" / "run.log").read_text()
    assert f"4/5 nodes (missing [{node_of[0]}])" in run_log
    assert "service: request(s) failed" in run_log


def test_script_rejects_bad_node_count(tmp_path, deployment):
    rc = deployment.run([], {"NUM_NODES": "zero"}, timeout=30)
    assert rc == 2
    assert "NUM_NODES=zero must be a positive integer" in deployment.output()


@pytest.mark.parametrize("env, message", [
    ({"SECURE": "yes"}, "SECURE=yes must be 1"),
    ({"SECURE": "0", "STRANGER_NODES": "1"}, "needs SECURE=1"),
    ({"FORGET_VIA": "email"}, "FORGET_VIA=email must be inbox or node-config"),
])
def test_script_rejects_bad_settings(tmp_path, deployment, env, message):
    assert deployment.run([], env, timeout=30) == 2
    assert message in deployment.output()


@pytest.mark.parametrize("args, message", [
    (["unlearn.lr=inf"], "unlearn.lr=inf: expected a finite number"),
    (["negation.layers=doesnotexist"], "negation.layers='doesnotexist': unknown layer"),
])
def test_script_checks_the_run_config_before_starting_anything(tmp_path, deployment, args,
                                                               message):
    assert deployment.run(args, {"SECURE": "0"}, timeout=60) == 2
    assert message in deployment.output() and "nothing was started" in deployment.output()
    assert not (deployment.workdir / "logs" / "superlink.log").exists()


# ---------------------------------------------------------------------------------------
# A user's own app on a deployment: nodes bring their own data (dataset-path)
# ---------------------------------------------------------------------------------------
def _write_node_data(root: Path, partition: int, num_partitions: int) -> None:
    """Node ``partition``'s private data as an on-disk Hugging Face folder."""
    import numpy as np
    from datasets import Dataset, DatasetDict
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    part = np.array_split(np.random.default_rng(42).permutation(len(y)), num_partitions)[partition]
    cut = int(0.8 * len(part))

    def table(ids):
        return Dataset.from_dict({"img": (x[ids] / 16.0).reshape(-1, 8, 8).tolist(),
                                  "label": y[ids].tolist()})

    DatasetDict({"train": table(part[:cut]), "test": table(part[cut:])}).save_to_disk(str(root))


def _serverapp_opens(roots: list[Path], stop, seen: list[str]) -> None:
    """Record every file under ``roots`` that a ServerApp process holds open."""
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"flwr-serverapp" not in (entry / "cmdline").read_bytes():
                    continue
                for fd in (entry / "fd").iterdir():
                    target = os.readlink(fd)
                    if any(target.startswith(str(r)) for r in roots):
                        seen.append(target)
            except OSError:
                continue
        time.sleep(0.2)


def test_user_app_on_a_deployment_with_private_data_folders(tmp_path, deployment):
    """examples/quickstart-pytorch-unlearning on a SuperLink and 3 SuperNodes, each
    reading its own dataset-path folder; the ServerApp's run-config names none of them,
    and no ServerApp process ever holds a file of them open. Node 1's data owner files a
    class-wise request, then an instance-wise one (ids local to node 1) and one naming
    an id node 1 does not hold; two jobs on the same federation serve them in turn (an
    inbox sends one scope per job)."""
    import threading

    data = [tmp_path / "node-data" / f"node-{i}" for i in range(3)]
    for i, root in enumerate(data):
        _write_node_data(root, i, 3)
    env = {"NUM_NODES": "3", "SECURE": "0", "FORGET_NODE": "none", "RUNS": "2",
           "OUTPUT_DIR": str(tmp_path / "out"), "RUN_TIMEOUT": str(RUN_TIMEOUT_S),
           "INBOX_REQUEST_1": ("--scope class --classes 3;--scope instance --sample-ids 0,1,2;"
                               "--scope instance --sample-ids 5,9999")}
    for i, root in enumerate(data):
        env[f"DATASET_PATH_{i}"] = str(root)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_serverapp_opens, args=(data, stop, seen), daemon=True)
    watcher.start()
    try:
        code = deployment.run(['--private-data', 'num-server-rounds=2', 'recovery-rounds=5',
                               'methods="not"'], env, timeout=2 * RUN_TIMEOUT_S + 60)
    finally:
        stop.set()
        watcher.join()
    output = deployment.output()
    assert code == 0, output[-6000:]
    assert not seen, f"the ServerApp opened node data: {sorted(set(seen))}"
    # Each SuperNode was started with its own folder and inbox only: no partition id.
    configs = re.findall(r"starting SuperNode \d .*--node-config '(.*)'", output)
    assert len(configs) == 3 and all(c.startswith("dataset-path=") and "inbox=" in c
                                     and "partition-id" not in c for c in configs), configs
    run_lines = [line for line in output.splitlines() if "--run-config" in line]
    assert len(run_lines) == 2 and not any("node-data" in line for line in run_lines)
    served = []
    for job in (1, 2):
        res = json.loads((tmp_path / "out" / f"run-{job}" / "not" / "results.json").read_text())
        assert res["status"] == "honoured"
        served.append([(r["node_id"] > 0, r["scope"]) for r in res["request"]])
    assert served == [[(True, "class")], [(True, "instance")]]
    inbox = deployment.workdir / "inbox-1"
    files = sorted((inbox / "requests").glob("*.json"))
    statuses = {}
    for f in files:
        shown = fedunlearn_cli("request", "show", "--inbox", str(inbox), f.stem)
        request = json.loads(f.read_text())
        statuses[tuple(request.get("sample_ids") or request.get("classes"))] = shown
    assert "honoured" in statuses[(3,)] and "honoured" in statuses[(0, 1, 2)]
    rejected = statuses[(5, 9999)]
    assert "rejected" in rejected and "sample id(s) 9999 are not in" in rejected
    assert "honoured" not in rejected
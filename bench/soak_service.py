"""Service mode under ``kill -9``: the service in a child process, killed at random
points and started again on the same state directory until its round budget is spent;
then every promise is checked.

The child runs :class:`fedunlearn.UnlearningService` (NoT, 2 recovery rounds) on
fedunlearn's own ClientApp over 5 digits nodes of the in-process engine (every node has
an inbox; node ids stay the same across restarts, as SuperNodes keep theirs). Node 2
*blips*: it is missing from the node list for one round (rounds 5 and 10: the query and
the training of that round go on without it). The parent, as the data owners:

* files a client-wise request on node 1 and an impossible one (class 11 of 10) on node 0
  at once, a class-wise one on node 4 after round 2, one on node 2 (the blipping node)
  after round 4, while it is away;
* files one on node 3 after round 6, and when its receipt says ``accepted`` kills the
  service at once and withdraws it (``fedunlearn request withdraw``) before the restart,
  unless the audit log already honours it (then it tries again with a new request);
* kills the service (``SIGKILL``) ``--kills`` times, each a random time (0 to 1.6 rounds)
  after the child said it runs: in the start or the resume, a query, an unlearning step,
  a publication, a checkpoint, a receipt and the node's check of it.

Checks: every request ends with exactly one final verdict on its receipt (``honoured``,
``rejected`` or ``withdrawn``, as expected) and one in the audit log; the round budget is
reached; versions are numbered without a gap, each number names one model (one
``version.published``, or ``version.abandoned``), and every version file holds the
model its entry names; no version file is unlisted and no temporary file is left;
``fedunlearn audit LOG --inbox DIR`` exits 0 for every inbox (chain, head file, receipt
anchors). Prints its figures and exits 1 when a check fails::

    python bench/soak_service.py                      # 20 kills, 15 rounds
    python bench/soak_service.py --kills 4 --rounds 6 # what tests/test_service_soak.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES = 5
BLIPPER, BLIP_ROUNDS = 2, (5, 10)
FINAL = ("rejected", "honoured", "withdrawn")
RUN_ID = 4242


# -- the child: one life of the service ---------------------------------------------------
def child(workdir: Path, rounds: int, seed: int) -> None:
    import torch
    from flwr.app import ArrayRecord

    from fedunlearn import NoT, Recovery, ServiceConfig, UnlearningService
    from fedunlearn.engine import LocalGrid, server_identity
    from fedunlearn.harness.models import create_model
    from fedunlearn.launch import default_run_config

    sys.path.insert(0, str(ROOT))
    from flower_apps.client_app import app

    torch.set_num_threads(1)
    rc = default_run_config()
    rc.update({"seed": seed, "dataset.name": "digits", "model.name": "cnn",
               "federation.num-clients": NUM_NODES})

    def model_fn():
        return create_model("cnn", num_classes=10, in_channels=1, image_size=8)

    torch.manual_seed(seed)
    service = UnlearningService(
        NoT(Recovery(rounds=2, lr=0.05, server_momentum=0.0), model_fn=model_fn,
            example_input=torch.zeros(1, 1, 8, 8), seed=seed),
        state_dir=workdir / "state",
        config=ServiceConfig(rounds=rounds, lr=0.05, seed=seed, query_every=1),
        on_round=lambda rnd, info: print(f"round {rnd}", flush=True))

    class BlippingGrid(LocalGrid):
        """Node ``BLIPPER`` is not in the node list while the service plays one of
        ``BLIP_ROUNDS`` (and gets nothing)."""

        def away(self) -> set[int]:
            state = getattr(service, "state", None)
            if state is None or state.round + 1 not in BLIP_ROUNDS:
                return set()
            return {n for n, c in self.contexts.items()
                    if c.node_config["partition-id"] == BLIPPER}

        def get_node_ids(self):
            return [n for n in super().get_node_ids() if n not in self.away()]

        def send_and_receive(self, messages, *, timeout=None):
            away = self.away()
            kept = [m for m in messages if int(m.metadata.dst_node_id) not in away]
            return list(super().send_and_receive(kept, timeout=timeout)) if kept else []

    grid = BlippingGrid(app, NUM_NODES, rc, run_id=RUN_ID, node_configs={
        p: {"inbox": str(workdir / f"inbox-{p}")} for p in range(NUM_NODES)})
    start = ArrayRecord(model_fn().state_dict())
    print("running", flush=True)
    with server_identity(grid.run.run_id):
        outcome = service.run(grid, start)
    print(f"finished {outcome.round} {outcome.stopped}", flush=True)


# -- the parent: the data owners and the operator's kill -9 -------------------------------
class Life:
    """One child process and the lines it prints."""

    def __init__(self, workdir: Path, rounds: int, seed: int, number: int) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.log = open(workdir / f"life-{number:03d}.log", "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(workdir), "--rounds", str(rounds),
             "--seed", str(seed)], stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line ("" when none came in ``timeout``; ``None`` once it exited)."""
        try:
            return self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return ""

    def wait_running(self) -> float:
        """Wait for "running" (the service is about to start); its time."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.next_line(1.0)
            if line is None:
                raise RuntimeError(f"a life exited before running: see {self.log.name}")
            if line == "running":
                return time.monotonic()
        raise RuntimeError(f"no 'running' in 300 s: see {self.log.name}")

    def follow(self, running: float, delay: float, most: int, clock: Clock,
               owners: DataOwners) -> str:
        """Follow the child's rounds (the data owners act on them) until ``delay``
        after ``running`` or its ``most``-th round (``"due"``), the watched request's
        acceptance (``"accepted"``) or its end (``"ended"``). ``delay`` < 0: a random
        time within its second round."""
        deadline = running + delay if delay >= 0 else float("inf")
        stamp, seen = running, 0
        while time.monotonic() < deadline:
            if owners.accepted():
                return "accepted"
            line = self.next_line(min(0.005, deadline - time.monotonic()))
            if line is None:
                self.proc.wait()
                self.log.close()
                return "ended"
            if line.startswith("round "):
                now = time.monotonic()
                (clock.rounds if seen else clock.startups).append(now - stamp)
                if delay < 0 and seen == 1:
                    deadline = now + random.uniform(0.0, now - stamp)
                stamp, seen = now, seen + 1
                clock.last_round = int(line.split()[1])
                owners.on_round(clock.last_round)
                if seen >= most:
                    return "due"
        return "due"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


class DataOwners:
    """The requests, filed and withdrawn as the rounds go, and what each must end as."""

    def __init__(self, workdir: Path) -> None:
        from fedunlearn.inbox import Inbox

        self.workdir = workdir
        self.inboxes = {p: Inbox(str(workdir / f"inbox-{p}")) for p in range(NUM_NODES)}
        self.expected: dict[str, tuple[int, str]] = {}  # id -> (partition, final status)
        self.filed: set[str] = set()
        self.watching: str | None = None  # the request to withdraw once accepted
        self.withdraw_tries = 0

    def file(self, key: str, partition: int, expect: str, **request) -> str:
        self.filed.add(key)
        rid = self.inboxes[partition].file(**request).id
        self.expected[rid] = (partition, expect)
        return rid

    def on_round(self, rnd: int) -> None:
        if "start" not in self.filed:
            self.file("start", 1, "honoured", scope="client")
            self.file("bad", 0, "rejected", scope="class", classes=[11])
        if rnd >= 2 and "d" not in self.filed:
            self.file("d", 4, "honoured", scope="class", classes=[4])
        if rnd >= BLIP_ROUNDS[0] - 1 and "blip" not in self.filed:
            self.file("blip", BLIPPER, "honoured", scope="class", classes=[3])
        if rnd >= 6 and "w" not in self.filed and self.withdraw_tries < 5:
            self.withdraw_tries += 1
            self.watching = self.file("w", 3, "withdrawn", scope="class",
                                      classes=[6 + self.withdraw_tries])

    def accepted(self) -> bool:
        """Whether the watched request's receipt says ``accepted`` (time to kill)."""
        if self.watching is None:
            return False
        return any(e["status"] == "accepted"
                   for e in self.inboxes[3].events(self.watching))

    def withdraw_watched(self, state: Path) -> bool:
        """With the service dead: withdraw the watched request unless the audit log
        already honours it (then it ends honoured and a new one is filed later)."""
        from fedunlearn.cli import main as cli

        rid, self.watching = self.watching, None
        if any(r.get("event") == "request.honoured" and rid in r.get("inbox_ids", [])
               for r in audit_records(state)):  # too late: it stays honoured
            self.expected[rid] = (3, "honoured")
            self.filed.discard("w")
            return False
        rc = cli(["request", "withdraw", "--inbox", str(self.inboxes[3].root), rid])
        if rc != 0:
            raise RuntimeError(f"withdrawing {rid} failed (rc {rc})")
        return True


def soak(workdir: Path, kills: int, rounds: int, seed: int) -> dict:
    """Run the service to its round budget through ``kills`` kill -9s; returns figures."""
    rng = random.Random(seed)
    random.seed(seed)  # the first life's kill (Life.follow)
    owners = DataOwners(workdir)
    clock = Clock()
    started, lives, killed, at_accepted = time.monotonic(), 0, 0, 0
    phases: dict[str, int] = {}
    while True:
        lives += 1
        life = Life(workdir, rounds, seed, lives)
        running = life.wait_running()
        owners.on_round(clock.last_round)
        delay, most = (clock.kill_plan(rng, rounds, kills - killed) if killed < kills
                       else (float("inf"), rounds))
        outcome = life.follow(running, delay, most, clock, owners)
        if outcome == "ended":
            if life.proc.returncode != 0 or killed < kills:
                raise RuntimeError(
                    f"life {lives} ended (rc {life.proc.returncode}) after {killed} of "
                    f"{kills} kills: see {life.log.name}"
                    + ("; give more --rounds" if life.proc.returncode == 0 else ""))
            break
        at_accepted += outcome == "accepted"
        life.kill()
        killed += 1
        phase = kill_phase(Path(life.log.name))
        phases[phase] = phases.get(phase, 0) + 1
        if owners.watching is not None and owners.accepted():
            owners.withdraw_watched(workdir / "state")
    figures = {"kills": killed, "kills_at_accepted": at_accepted, "kill_phases": phases,
               "lives": lives, "rounds": rounds,
               "wall_s": round(time.monotonic() - started, 1),
               "withdraw_tries": owners.withdraw_tries}
    figures.update(check(workdir, owners, rounds))
    return figures


class Clock:
    """How long a life takes to start (or resume) and a round to run, as measured."""

    def __init__(self) -> None:
        self.startups: list[float] = []
        self.rounds: list[float] = []
        self.last_round = 0

    def kill_plan(self, rng: random.Random, rounds: int, kills_left: int) -> tuple[float, int]:
        """``(delay, most)``: kill a random time after "running", and at the latest when
        the life has finished ``most`` rounds. ``most`` is drawn so that the kills left
        spend about the rounds left (one round kept for the last life); with ``most``
        0 the kill falls within the start or resume and the first round. ``(-1, 1)``
        before anything was measured: within the first life's second round."""
        if not self.startups:
            return -1.0, 2
        budget = max(0, rounds - self.last_round - 1) / max(1, kills_left)
        most = min(2, int(budget) + (rng.random() < budget - int(budget)))
        if most == 0:
            return rng.uniform(0.0, min(self.startups)), 0
        return rng.uniform(0.0, _median(self.startups) + most * _median(self.rounds or [0.0])), most


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def kill_phase(log: Path) -> str:
    """What the child was doing when it was killed: from the last line it logged."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for needle, phase in (("Receipt (", "receipt"), ("checked version", "receipt"),
                          ("published version", "publication"),
                          ("unlearning step", "unlearning step"), ("negated", "unlearning step"),
                          ("resumed from", "resume, query or first round"), ("| v", "training round"),
                          ("request accepted", "query"), ("REJECTED", "query"),
                          ("withdrew", "query"), ("Node ", "query")):
        if needle in last:
            return phase
    return "start" if not any("[service]" in line for line in lines) else "other"


# -- the checks ---------------------------------------------------------------------------
def audit_records(state: Path) -> list[dict]:
    """The audit log's complete records (a partial line a kill left is skipped)."""
    path = state / "audit.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            out.append(record)
    return out


def final_records(records: list[dict]) -> dict[str, list[str]]:
    """Inbox id -> the final verdicts the audit log gives it (a rejection is named by
    the request.received record of its node just before it)."""
    out: dict[str, list[str]] = {}
    received: dict[int, list[str]] = {}
    for r in records:
        event, ids = r["event"], list(r.get("inbox_ids") or [])
        if event == "request.received":
            received[r.get("node")] = ids
        elif event == "request.rejected":
            ids = received.pop(r.get("node"), [])
        elif event == "request.failed" and not r.get("final", True):
            continue
        if event in ("request.honoured", "request.withdrawn", "request.rejected",
                     "request.failed"):
            for rid in ids:
                out.setdefault(rid, []).append(event.split(".")[1])
    return out


def check_versions(state: Path, records: list[dict], problems: list[str]) -> list[dict]:
    from fedunlearn import load_model, read_versions
    from fedunlearn.audit import model_digest
    from fedunlearn.files import file_sha256

    versions = read_versions(state)
    if [v["version"] for v in versions] != list(range(len(versions))):
        problems.append(f"version numbers have a gap: {[v['version'] for v in versions]}")
    for v in versions:
        if (model_digest(load_model(v["path"])) != v["arrays_sha256"]
                or file_sha256(v["path"]) != v["sha256"]):
            problems.append(f"version {v['version']}'s file does not hold its model")
    published = [(r["published_version"], r["model_sha256"]) for r in records
                 if r["event"] == "version.published"]
    if published != [(v["version"], v["sha256"]) for v in versions if not v.get("abandoned")]:
        problems.append(f"version.published records {published} do not name the versions "
                        "one to one")
    abandoned = [r["published_version"] for r in records if r["event"] == "version.abandoned"]
    if abandoned != [v["version"] for v in versions if v.get("abandoned")]:
        problems.append(f"version.abandoned records {abandoned} do not match versions.json")
    listed = {Path(v["path"]).name for v in versions}
    unlisted = sorted(p.name for p in (state / "versions").iterdir() if p.name not in listed)
    if unlisted:
        problems.append(f"files in versions/ that versions.json does not list: {unlisted}")
    return versions


def check(workdir: Path, owners: DataOwners, rounds: int) -> dict:
    import contextlib
    import io

    import torch

    from fedunlearn.cli import main as cli

    state, problems = workdir / "state", []
    records = audit_records(state)
    finals = final_records(records)
    verdicts: dict[str, int] = {}
    for rid, (partition, expect) in owners.expected.items():
        on_receipt = [e["status"] for e in owners.inboxes[partition].events(rid)
                      if e["status"] in FINAL]
        in_log = finals.get(rid, [])
        if expect == "withdrawn" and not in_log and on_receipt == ["withdrawn"]:
            problems.append(f"{rid}: withdrawn before the service held it (no record)")
        if on_receipt != [expect] or in_log != [expect]:
            problems.append(f"{rid} (node {partition}): expected one {expect}; receipt "
                            f"{on_receipt}, audit log {in_log}")
        verdicts[expect] = verdicts.get(expect, 0) + 1
    blob = torch.load(state / "checkpoint.pt", weights_only=True)
    reached = json.loads(blob["state"])["round"]
    if reached != rounds:
        problems.append(f"the service stopped at round {reached} of {rounds}")
    versions = check_versions(state, records, problems)
    temporaries = sorted(str(p.relative_to(workdir)) for p in workdir.rglob(".*.tmp"))
    if temporaries:
        problems.append(f"temporary files left: {temporaries}")
    for inbox in owners.inboxes.values():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = cli(["audit", str(state / "audit.jsonl"), "--inbox", str(inbox.root)])
        if rc != 0:
            problems.append(f"fedunlearn audit --inbox {inbox.root} exited {rc}: "
                            f"{out.getvalue()[-500:]}")
    events = [r["event"] for r in records]
    return {"requests": len(owners.expected), "verdicts": verdicts,
            "versions": len(versions),
            "abandoned": sum(1 for v in versions if v.get("abandoned")),
            "resumes": events.count("service.resumed"),
            "starts": events.count("service.started"),
            "receipts_sent_again_not_rewritten": sum(
                int(r.get("already", 0)) for r in records if r["event"] == "receipt.sent"),
            "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.rounds, args.seed)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        figures = soak(workdir, args.kills, args.rounds, args.seed)
    print(json.dumps(figures, indent=1))
    print(f"kills {figures['kills']} ({figures['kills_at_accepted']} as a request was "
          f"accepted; where: {figures['kill_phases']}), {figures['lives']} lives, rounds {figures['rounds']}, requests "
          f"{figures['requests']}, verdicts {figures['verdicts']}, versions "
          f"{figures['versions']} ({figures['abandoned']} abandoned), wall "
          f"{figures['wall_s']} s: " + ("all checks hold" if not figures["problems"] else
                                         f"{len(figures['problems'])} problem(s)"))
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

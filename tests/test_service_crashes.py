"""Service mode killed at the points where a crash used to leave a double record: the
node-side check of an honoured receipt, between publishing a version and the checkpoint,
between a query's records and its checkpoint, while the committed records are written,
and during the start. Each test makes the process "die" by raising from a function at
that moment, then starts a fresh service on the same state directory (issue: service
mode that loses nothing, item 16)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.test_plugin import USER_NODE, fedavg, user_grid, userapp  # noqa: F401  (fixtures)
from tests.test_service_mode import _service, audit_events


class Killed(BaseException):
    """What the process gets instead of running on (a ``kill -9``)."""


def _versions_hold_their_models(state) -> list[dict]:
    """``versions.json``, checked: numbered 0..N without a gap, every file holding the
    model its entry names, one ``version.published`` per number that is not abandoned
    (naming that entry's model) and one ``version.abandoned`` per abandoned one."""
    from fedunlearn import load_model, read_versions
    from fedunlearn.audit import model_digest

    versions = read_versions(state)
    assert [v["version"] for v in versions] == list(range(len(versions)))
    for v in versions:
        assert model_digest(load_model(v["path"])) == v["arrays_sha256"]
        assert hashlib.sha256(Path(v["path"]).read_bytes()).hexdigest() == v["sha256"]
    log = audit_events(state / "audit.jsonl")
    published = [(e["published_version"], e["model_sha256"]) for e in log
                 if e["event"] == "version.published"]
    assert published == [(v["version"], v["sha256"]) for v in versions
                         if not v.get("abandoned")]
    assert [e["published_version"] for e in log if e["event"] == "version.abandoned"] == [
        v["version"] for v in versions if v.get("abandoned")]
    return versions


def _log_verifies(state, inbox) -> None:
    from fedunlearn.cli import main as cli

    assert cli(["audit", str(state / "audit.jsonl"), "--inbox", str(inbox)]) == 0


def test_an_honoured_receipt_sent_again_after_a_kill_reaches_the_data_owner_once(
        userapp, user_grid, tmp_path, capsys):
    """The service dies after its node wrote the honoured receipt (during the node's
    check, before the service learnt it arrived); resumed, it sends the receipt again,
    and the node does not write it again: one `honoured` event, the same check."""
    from fedunlearn.inbox import Inbox
    from fedunlearn.service import UnlearningService

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-0"))
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    arrays = fedavg(grid, task, rounds=1)
    filed = inbox.file(scope="client")
    service = _service(task, tmp_path, rounds=2)

    def dies(self, *args, **kwargs):  # the node has written its receipt and answered
        raise Killed()

    service._record_check = dies.__get__(service, UnlearningService)
    with pytest.raises(Killed):
        service.run(grid, arrays)
    assert inbox.entry(filed.id).status == "honoured"
    outcome = _service(task, tmp_path, rounds=2).run(grid, arrays)
    assert outcome.resumed_from == 0 and len(outcome.steps) == 1
    events = inbox.events(filed.id)
    honoured = [e for e in events if e["status"] == "honoured"]
    assert len(honoured) == 1 and honoured[0]["version"] == 1
    assert honoured[0]["check"]["model-arrays-sha256-ok"] is True
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    sent = [(e["written"], e.get("already", 0)) for e in log
            if e["event"] == "receipt.sent" and e["status"] == "honoured"]
    assert sent == [(1, 0), (0, 1)]
    assert [e["event"] for e in log].count("request.honoured") == 1
    _versions_hold_their_models(tmp_path / "state")
    _log_verifies(tmp_path / "state", tmp_path / "inbox-0")


def test_a_kill_between_publish_and_the_checkpoint_never_gives_one_number_two_models(
        userapp, user_grid, tmp_path, capsys):
    """The step publishes version 1 and dies before its checkpoint; the step runs again
    from the checkpoint and gives another model: version 1 stays as it was, marked
    abandoned (`version.abandoned`), and the step is published as version 2. No number
    ever has two `version.published` records; the receipt names version 2."""
    from flwr.app import ArrayRecord

    from fedunlearn.inbox import Inbox
    from fedunlearn.service import UnlearningService

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-2"))
    grid = user_grid(client_app.app, inboxes={2: tmp_path / "inbox-2"})
    arrays = fedavg(grid, task, rounds=1)
    filed = inbox.file(scope="class", classes=[0])
    service = _service(task, tmp_path, rounds=3)
    real = UnlearningService.publish

    def dies_after(self, kind, honours):
        if kind != "unlearned":
            return real(self, kind, honours)
        # A step whose model the step run again will not reproduce.
        self.arrays = ArrayRecord({k: v + 0.5 for k, v in
                                   self.arrays.to_torch_state_dict().items()})
        real(self, kind, honours)
        raise Killed()

    service.publish = dies_after.__get__(service, UnlearningService)
    with pytest.raises(Killed):
        service.run(grid, arrays)
    first = (tmp_path / "state" / "versions" / "v0001.pt").read_bytes()
    outcome = _service(task, tmp_path, rounds=3).run(grid, arrays)
    versions = _versions_hold_their_models(tmp_path / "state")
    assert [(v["kind"], bool(v.get("abandoned"))) for v in versions] == [
        ("start", False), ("unlearned", True), ("unlearned", False), ("final", False)]
    assert (tmp_path / "state" / "versions" / "v0001.pt").read_bytes() == first
    assert [s["version"] for s in outcome.steps] == [2]
    honoured = [e for e in inbox.events(filed.id) if e["status"] == "honoured"]
    assert [(e["version"], e["model_sha256"]) for e in honoured] == [
        (2, versions[2]["sha256"])]
    _log_verifies(tmp_path / "state", tmp_path / "inbox-2")
    _listing_flags_the_abandoned_version(tmp_path / "state", capsys, abandoned=1)


def _listing_flags_the_abandoned_version(state, capsys, abandoned: int) -> None:
    """``fedunlearn versions`` marks the abandoned version and says why; the others are
    ``published``."""
    from fedunlearn.cli import main as cli

    capsys.readouterr()
    assert cli(["versions", str(state)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    columns = header.split()
    assert columns[:4] == ["version", "round", "kind", "status"]
    status = {int(r.split()[0]): r.split()[3] for r in rows if r.split()[0].isdigit()}
    assert status == {v: "ABANDONED" if v == abandoned else "published" for v in status}
    assert len(status) == 4
    (why,) = [r for r in rows if r.startswith(f"version {abandoned} abandoned: ")]
    assert "cut short before its checkpoint" in why


def test_a_kill_between_a_querys_records_and_its_checkpoint_records_each_verdict_once(
        userapp, user_grid, tmp_path):
    """A request rejected at a query whose checkpoint was never written is received
    again after the resume: its rejection is in the audit log and on the receipt once."""
    from fedunlearn.inbox import Inbox
    from fedunlearn.service import UnlearningService

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-1"))
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "inbox-1"})
    arrays = fedavg(grid, task, rounds=1)
    filed = inbox.file(scope="class", classes=[9])  # the user's task has 4 classes
    service = _service(task, tmp_path, rounds=2)
    real = UnlearningService._rejection_receipts

    def dies_after(self, rejected, receipts):
        real(self, rejected, receipts)
        if rejected:
            raise Killed()

    service._rejection_receipts = dies_after.__get__(service, UnlearningService)
    with pytest.raises(Killed):
        service.run(grid, arrays)
    _service(task, tmp_path, rounds=2).run(grid, arrays)
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    assert [e["node"] for e in log if e["event"] == "request.rejected"] == [USER_NODE[1]]
    assert [e["status"] for e in inbox.events(filed.id)].count("rejected") == 1
    _log_verifies(tmp_path / "state", tmp_path / "inbox-1")


def test_a_kill_while_the_committed_records_are_written_leaves_each_once(
        userapp, user_grid, tmp_path, monkeypatch):
    """The step's checkpoint is written and the process dies after the first of the
    records it commits: the resume writes the others, each once, chain intact."""
    from fedunlearn.inbox import Inbox
    from fedunlearn.service.commit import ServiceAudit

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-3"))
    grid = user_grid(client_app.app, inboxes={3: tmp_path / "inbox-3"})
    arrays = fedavg(grid, task, rounds=1)
    filed = inbox.file(scope="client")
    real = ServiceAudit.write

    def dies_midway(self, entries):
        if any(e["event"] == "request.honoured" for e in entries):
            real(self, entries[:1])
            raise Killed()
        real(self, entries)

    monkeypatch.setattr(ServiceAudit, "write", dies_midway)
    with pytest.raises(Killed):
        _service(task, tmp_path, rounds=2).run(grid, arrays)
    monkeypatch.setattr(ServiceAudit, "write", real)
    names = [e["event"] for e in audit_events(tmp_path / "state" / "audit.jsonl")]
    assert "version.published" in names and "request.honoured" not in names
    _service(task, tmp_path, rounds=2).run(grid, arrays)
    names = [e["event"] for e in audit_events(tmp_path / "state" / "audit.jsonl")]
    assert names.count("unlearning.finished") == 1 and names.count("request.honoured") == 1
    _versions_hold_their_models(tmp_path / "state")
    assert inbox.entry(filed.id).status == "honoured"
    _log_verifies(tmp_path / "state", tmp_path / "inbox-3")


def test_a_service_killed_during_its_start_starts_again(userapp, user_grid, tmp_path):
    """Killed after version 0 is written but before the first full checkpoint: started
    again on the directory, the service makes its start again (version 0 reused: the
    same model), instead of refusing a directory that holds a version."""
    from fedunlearn.service import UnlearningService

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    service = _service(task, tmp_path, rounds=2)
    real = UnlearningService.publish

    def dies_after(self, kind, honours):
        real(self, kind, honours)
        raise Killed()

    service.publish = dies_after.__get__(service, UnlearningService)
    with pytest.raises(Killed):
        service.run(grid, arrays)
    assert (tmp_path / "state" / "versions" / "v0000.pt").exists()
    outcome = _service(task, tmp_path, rounds=2).run(grid, arrays)
    assert outcome.resumed_from is None and outcome.round == 2
    versions = _versions_hold_their_models(tmp_path / "state")
    assert [v["kind"] for v in versions] == ["start", "final"]
    names = [e["event"] for e in audit_events(tmp_path / "state" / "audit.jsonl")]
    assert names.count("service.started") == 1 and names.count("federation.verified") == 1

"""The server's audit log: append-only JSONL, one durable write per record, a chain that
shows removed or edited records, crash-tolerant reading, and ``fedunlearn audit``."""

from __future__ import annotations

import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord

import fedunlearn.audit as audit_mod
from fedunlearn.audit import AuditLog, audit_path, model_digest, read_audit
from fedunlearn.cli import main as cli


def test_records_are_appended_chained_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = AuditLog(tmp_path / "sub" / "audit.jsonl", run_id=2**64 - 1)
    first = log.record("job.started", methods=["not"], deployment=True)
    log.record("request.received", node=10, partition=0, scope="class", classes={3, 1},
               num_ids=0, digest="ab" * 32, score=float("nan"), count=np.int64(4))
    assert len(synced) == 2  # one fsync per record, before record() returns
    lines = (tmp_path / "sub" / "audit.jsonl").read_bytes().splitlines()
    assert len(lines) == 2
    second = json.loads(lines[1])
    assert first["seq"] == 0 and second["seq"] == 1 and second["run"] == 2**64 - 1
    assert second["classes"] == [1, 3] and second["score"] == "nan" and second["count"] == 4
    assert first["prev"] == "0" * 64
    # A second writer (a later job) continues the same chain.
    AuditLog(tmp_path / "sub" / "audit.jsonl", run_id=5).record("job.started")
    reading = read_audit(tmp_path / "sub" / "audit.jsonl")
    assert reading.intact and not reading.skipped
    assert [r["seq"] for r in reading.records] == [0, 1, 2]


def test_a_crash_mid_record_never_breaks_reading(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, run_id=1)
    log.record("job.started")
    log.record("federation.verified", nodes={10: 0})
    with open(path, "ab") as f:  # the process died in the middle of a write
        f.write(b'{"seq":2,"time":"2026-01-01T00:00:00","run":1,"event":"request.rec')
    reading = read_audit(path)
    assert [r["event"] for r in reading.records] == ["job.started", "federation.verified"]
    assert reading.intact and "incomplete last record" in reading.skipped[0]
    # The next writer seals the partial line and chains to the last complete record.
    log.record("job.started")
    reading = read_audit(path)
    assert [r["seq"] for r in reading.records] == [0, 1, 2]
    assert reading.intact
    assert "line 3: not a complete JSON record" in reading.skipped[0]


def test_removed_or_edited_records_break_the_chain(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, run_id=1)
    for event in ("job.started", "request.accepted", "unlearning.finished", "job.finished"):
        log.record(event, node=10)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["event"] = "request.rejected"
    path.write_text("\n".join([lines[0], json.dumps(edited, separators=(",", ":")),
                               lines[2], lines[3]]) + "\n")
    reading = read_audit(path)
    assert not reading.intact and "line 3" in reading.chain_breaks[0]
    assert cli(["audit", str(path)]) == 1
    assert "chain BROKEN" in capsys.readouterr().out
    path.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")  # one removed
    assert not read_audit(path).intact


def test_the_audit_command_prints_a_table(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, run_id=77)
    log.record("job.started", methods=["not"], deployment=True)
    log.record("request.received", node=123, partition=0, scope="client", digest="f" * 64)
    log.record("request.rejected", node=456, partition=1, reason="class(es) [42] outside")
    AuditLog(path, run_id=78).record("job.started", methods=["ft"])
    assert cli(["audit", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["seq", "time", "run", "event", "node", "partition", "details"]
    assert out[2].split()[3:6] == ["request.received", "123", "0"]
    assert "reason=class(es) [42] outside" in out[3]
    assert out[-1] == "4 record(s); chain intact"
    assert cli(["audit", str(path), "--event", "request.", "--run", "77"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 record(s); chain intact"
    assert cli(["audit", str(path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["records"]) == 4
    assert cli(["audit", str(tmp_path / "missing.jsonl")]) == 2


def test_audit_path_and_model_digest(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDUNLEARN_AUDIT_LOG", raising=False)
    assert audit_path(tmp_path) == tmp_path / "audit.jsonl"
    monkeypatch.setenv("FEDUNLEARN_AUDIT_LOG", str(tmp_path / "all-jobs.jsonl"))
    assert audit_path(tmp_path / "job") == tmp_path / "all-jobs.jsonl"
    a = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    b = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    c = ArrayRecord({"w": Array(np.array([1, 1, -1], dtype=np.float32))})
    assert model_digest(a) == model_digest(b) != model_digest(c)
    assert len(model_digest(a)) == 64

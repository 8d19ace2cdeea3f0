"""The server's audit log: append-only JSONL, one durable write per record, a chain that
shows removed or edited records, crash-tolerant reading, and ``fedunlearn audit``."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord

import fedunlearn.audit as audit_mod
from fedunlearn.audit import (AuditLog, audit_path, check_anchors, head_path, model_digest,
                              read_audit, receipt_anchors)
from fedunlearn.inbox import Inbox
from fedunlearn.cli import main as cli


def test_records_are_appended_chained_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = AuditLog(tmp_path / "sub" / "audit.jsonl", run_id=2**64 - 1)
    first = log.record("job.started", methods=["not"], deployment=True)
    log.record("request.received", node=10, partition=0, scope="class", classes={3, 1},
               num_ids=0, digest="ab" * 32, score=float("nan"), count=np.int64(4))
    assert len(synced) == 4  # the record and its head file, before record() returns
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
    assert reading.chain_breaks == ["line 2 (seq 1) was edited after it was written "
                                    "(line 3's prev no longer matches it)"]
    assert cli(["audit", str(path)]) == 1
    assert "chain BROKEN" in capsys.readouterr().out
    path.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")  # one removed
    breaks = read_audit(path).chain_breaks
    assert breaks == ["line 2 (seq 2): record(s) seq 1..1 are missing after line 1 (removed)"]
    path.write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")  # moved
    assert "line 3 (seq 1): out of order after seq 2 (a record was inserted or moved)" in \
        read_audit(path).chain_breaks


def _rechain(lines: list[str]) -> list[str]:
    """What someone with write access to the log does to hide an edit: recompute every
    ``prev`` (and the head file)."""
    out, prev = [], "0" * 64
    for line in lines:
        record = json.loads(line)
        record["prev"] = prev
        text = json.dumps(record, separators=(",", ":"))
        prev = hashlib.sha256(text.encode()).hexdigest()
        out.append(text)
    return out


def _events(log: AuditLog, n: int = 4) -> list[str]:
    for event in ("job.started", "request.accepted", "unlearning.finished", "job.finished")[:n]:
        log.record(event, node=10)
    return log.path.read_text().splitlines()


def test_the_head_file_shows_a_cut_tail_and_an_edited_last_record(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    lines = _events(AuditLog(path, run_id=1))
    head = json.loads(head_path(path).read_text())
    assert head["seq"] == 3 and head["sha256"] == hashlib.sha256(lines[3].encode()).hexdigest()
    assert read_audit(path).intact and not read_audit(path).notes
    # The last two records deleted.
    path.write_text("\n".join(lines[:2]) + "\n")
    assert read_audit(path).chain_breaks == [
        "line 2: the log ends at seq 1 but its head file names seq 3: record(s) seq 2..3 "
        "were cut"]
    assert cli(["audit", str(path)]) == 1
    assert "were cut" in capsys.readouterr().err
    # The last record edited.
    edited = json.loads(lines[3])
    edited["event"] = "job.failed"
    path.write_text("\n".join(lines[:3] + [json.dumps(edited, separators=(",", ":"))]) + "\n")
    assert read_audit(path).chain_breaks == [
        "line 4 (seq 3), the last record, was edited after it was written (it no longer "
        "matches the head file)"]
    # The last record replaced by a partial line (a crash is not an excuse: the head
    # names a record the log no longer holds whole).
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:30])
    reading = read_audit(path)
    assert "incomplete last record" in reading.skipped[0]
    assert "record(s) seq 3..3 were cut" in reading.chain_breaks[0]
    # A writer that died between the record and its head file: noted, not a break.
    path.write_text("\n".join(lines) + "\n")
    head_path(path).write_text(json.dumps({"seq": 2, "sha256": hashlib.sha256(
        lines[2].encode()).hexdigest(), "time": "t"}))
    reading = read_audit(path)
    assert reading.intact and "seq 3..3 were appended after the head file" in reading.notes[0]
    # No head file (an older log, or a copy without it): said, not a break.
    head_path(path).unlink()
    reading = read_audit(path)
    assert reading.intact and "no head file" in reading.notes[0]


def test_a_recomputed_chain_is_caught_by_a_receipt_anchor(tmp_path, capsys):
    """Rewriting the chain and the head file hides an edit from the log's own checks;
    the chain head a receipt carries does not move."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, run_id=1)
    lines = _events(log, 3)
    seq, digest = log.head()
    assert seq == 2 and digest == hashlib.sha256(lines[2].encode()).hexdigest()
    inbox = Inbox(tmp_path / "inbox")
    request = inbox.file("class", classes=[3])
    inbox.append_event(request.id, {"status": "honoured", "run": 1, "audit_seq": seq,
                                    "audit_sha256": digest})
    log.record("receipt.sent", node=10)
    assert cli(["audit", str(path), "--inbox", str(inbox.root)]) == 0
    assert "1 receipt anchor(s) checked" in capsys.readouterr().out
    # An edit before the anchor, the chain and the head file recomputed.
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["event"] = "request.rejected"
    lines[1] = json.dumps(edited, separators=(",", ":"))
    lines = _rechain(lines)
    path.write_text("\n".join(lines) + "\n")
    head_path(path).write_text(json.dumps(
        {"seq": 3, "sha256": hashlib.sha256(lines[3].encode()).hexdigest(), "time": "t"}))
    assert read_audit(path).intact  # the log's own checks are fooled ...
    assert cli(["audit", str(path), "--inbox", str(inbox.root)]) == 1  # ... the receipt not
    err = capsys.readouterr().err
    assert f"line 3 (seq 2) is not the record receipt {request.id}.jsonl line 1" in err
    assert "edited or rewritten at or before it" in err
    # A log cut below the anchor, head file and all.
    path.write_text("\n".join(lines[:2]) + "\n")
    head_path(path).unlink()
    reading = read_audit(path)
    problems = check_anchors(reading, receipt_anchors(inbox.receipts_dir))
    assert problems == [f"receipt {request.id}.jsonl line 1 (honoured, run 1): the log holds "
                        "no record seq 2 (cut or removed after the receipt was sent)"]


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


def test_receipts_of_another_jobs_log_are_noted_not_failed(tmp_path, capsys):
    """Two jobs, two logs, one inbox (issue: service mode that loses nothing, item 6):
    each log is checked against the anchors of its own run; the other job's receipts
    are noted, and an edit of this log's own anchored record is still caught."""
    inbox = Inbox(tmp_path / "inbox")
    request = inbox.file("class", classes=[3])
    logs = {}
    for run in (1, 2):
        path = tmp_path / f"audit-{run}.jsonl"
        log = AuditLog(path, run_id=run)
        _events(log, 2 + run)
        seq, digest = log.head()
        inbox.append_event(request.id, {"status": "sent", "run": run, "audit_seq": seq,
                                        "audit_sha256": digest})
        logs[run] = path
    for run, path in logs.items():
        assert cli(["audit", str(path), "--inbox", str(inbox.root)]) == 0, run
        captured = capsys.readouterr()
        assert "1 receipt anchor(s) of run(s) " in captured.err
        assert "not checked against it" in captured.err
    lines = logs[2].read_text().splitlines()
    edited = json.loads(lines[-1])
    edited["event"] = "request.rejected"
    lines[-1] = json.dumps(edited, separators=(",", ":"))
    logs[2].write_text("\n".join(lines) + "\n")
    assert cli(["audit", str(logs[2]), "--inbox", str(inbox.root)]) == 1


def test_junk_between_records_breaks_the_chain_a_crash_does_not(tmp_path, capsys):
    """Issue 'service mode that loses nothing', item 6: a line that no crash could have
    left (``[]``, text, a partial record of another seq) is a chain break, and the
    command exits 1; the partial line a crash leaves (sealed, same seq again) is not."""
    path = tmp_path / "audit.jsonl"
    lines = _events(AuditLog(path, run_id=1))
    for junk in ("[]", "hello, auditor", lines[2][:25].replace('"seq":2', '"seq":7')):
        path.write_text("\n".join(lines[:2] + [junk] + lines[2:]) + "\n")
        reading = read_audit(path)
        assert not reading.intact, junk
        assert "inserted" in reading.chain_breaks[0]
        assert cli(["audit", str(path)]) == 1
    crash = lines[2][:25]  # the start of seq 2, then seq 2 written whole by the next writer
    path.write_text("\n".join(lines[:2] + [crash] + lines[2:]) + "\n")
    assert read_audit(path).intact and cli(["audit", str(path)]) == 0


def test_forged_records_past_the_head_and_a_cut_tail_without_head_fail(tmp_path, capsys):
    """Item 6: correctly chained records appended past the head file (more than the one a
    dying writer can leave) are a break; a log whose head file is gone fails the command
    unless --no-head says that is expected."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, run_id=1)
    lines = _events(log)
    saved_head = head_path(path).read_text()
    log.record("request.honoured", node=10)
    log.record("receipt.sent", node=10)
    head_path(path).write_text(saved_head)  # the forger cannot update the head unseen
    reading = read_audit(path)
    assert "seq 4..5 follow the head file" in reading.chain_breaks[0]
    assert cli(["audit", str(path)]) == 1
    path.write_text("\n".join(lines[:2]) + "\n")  # tail cut, head file deleted
    head_path(path).unlink()
    assert cli(["audit", str(path)]) == 1
    assert "no head file" in capsys.readouterr().err
    assert cli(["audit", str(path), "--no-head"]) == 0

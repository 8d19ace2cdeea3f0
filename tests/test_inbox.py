"""The request inbox on a SuperNode: the data owner's command, the ClientApp answering
the unlearning query from it, and the receipts the server sends back."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedunlearn.cli import main as cli
from fedunlearn.client import handle_query
from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.federation import receipt_record
from fedunlearn.inbox import Inbox, InboxError
from fedunlearn.requests import (NODE_RECORD, QUERY_CONFIG, RECEIPT_ACK, RECEIPT_RECORD,
                                 REQUEST_RECORD, RUN_CONFIG_REQUESTS, WANT_REQUEST,
                                 UnlearningRequest)
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.node import harness_view

from .helpers import context, incoming, run_config

NUM = 4
RC = run_config(**{"federation.num-clients": NUM})


@pytest.fixture
def inbox(tmp_path):
    return Inbox(tmp_path / "inbox")


def ask(inbox: Inbox, partition: int = 1, run_config_requests: bool = True, rc=RC,
        run_id: int = 7, **node_config):
    """The ClientApp's answer to ``query.unlearn`` on the node holding ``partition``."""
    query = incoming(RecordDict({QUERY_CONFIG: ConfigRecord(
        {RUN_CONFIG_REQUESTS: run_config_requests})}), "query.unlearn")
    ctx = context(partition, rc, **{"inbox": str(inbox.root), **node_config})
    ctx.run_id = run_id
    return handle_query(query, ctx, harness_view)


def deliver_receipt(inbox: Inbox, record: ConfigRecord, partition: int = 1, **node_config):
    msg = incoming(RecordDict({RECEIPT_RECORD: record}), "query.unlearn")
    nc = {"inbox": str(inbox.root), **node_config} if inbox is not None else node_config
    return handle_query(msg, context(partition, RC, **nc), harness_view)


def sent_request(reply) -> UnlearningRequest | None:
    if REQUEST_RECORD not in reply.content:
        return None
    return UnlearningRequest.from_config_record(reply.content[REQUEST_RECORD])


# -- the data owner's command --------------------------------------------------------------
def test_file_list_show_withdraw_through_the_command(tmp_path, capsys):
    root = str(tmp_path / "inbox")
    assert cli(["request", "file", "--inbox", root, "--scope", "class", "--classes", "3,5",
                "--note", "patient 17"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli(["request", "file", "--inbox", root, "--scope", "instance",
                "--fraction", "0.25"]) == 0
    second = capsys.readouterr().out.strip()
    assert first != second
    assert cli(["request", "list", "--inbox", root]) == 0
    table = capsys.readouterr().out
    assert "class [3, 5]" in table and "instance fraction 0.25" in table
    assert table.count("filed") >= 3  # header + two rows
    assert cli(["request", "withdraw", "--inbox", root, second]) == 0
    capsys.readouterr()
    assert cli(["request", "show", "--inbox", root, second, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "withdrawn"
    assert [e["status"] for e in shown["receipts"]] == ["withdrawn"]
    assert cli(["request", "list", "--inbox", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["id"]: r["status"] for r in listed["requests"]} == {first: "filed",
                                                                  second: "withdrawn"}


@pytest.mark.parametrize("args, expected", [
    (["--scope", "class"], "a class-wise request names at least one class"),
    (["--scope", "client", "--classes", "1"], "only a class-wise request names classes"),
    (["--scope", "class", "--classes", "1,x"], "'x' is not an integer"),
    (["--scope", "class", "--classes", "2,2"], "2 is repeated"),
    (["--scope", "instance"], "names sample ids or a fraction"),
    (["--scope", "instance", "--fraction", "1.5"], "fraction=1.5"),
    (["--scope", "instance", "--fraction", "nan"], "fraction=nan"),
    (["--scope", "instance", "--sample-ids", "-3"], "-3 is out of range"),
])
def test_bad_requests_are_refused_by_the_command(tmp_path, capsys, args, expected):
    assert cli(["request", "file", "--inbox", str(tmp_path / "i"), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not list((tmp_path / "i" / "requests").glob("*.json"))


def test_command_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDUNLEARN_INBOX", raising=False)
    assert cli(["request", "list"]) == 2
    assert "pass --inbox DIR or set FEDUNLEARN_INBOX" in capsys.readouterr().err
    assert cli(["request", "list", "--inbox", str(tmp_path / "none")]) == 2
    assert "not a request inbox" in capsys.readouterr().err
    Inbox(tmp_path / "i")
    assert cli(["request", "withdraw", "--inbox", str(tmp_path / "i"), "nope"]) == 2
    assert "no request 'nope'" in capsys.readouterr().err
    monkeypatch.setenv("FEDUNLEARN_INBOX", str(tmp_path / "i"))
    assert cli(["request", "file", "--scope", "client"]) == 0


def test_the_node_config_inbox_must_be_an_absolute_path():
    query = incoming(RecordDict(), "query.unlearn")
    reply = handle_query(query, context(1, RC, inbox="relative/inbox"), harness_view)
    record = reply.content[REQUEST_RECORD]
    assert record["scope"] == "invalid" and "not an absolute path" in record["error"]


# -- the ClientApp answers from the inbox ---------------------------------------------------
def test_the_node_answers_from_its_inbox_and_records_that_it_sent(inbox):
    assert sent_request(ask(inbox)) is None  # empty inbox, partition 1 not in forget.clients
    filed = inbox.file("class", classes=[3])
    reply = ask(inbox, run_id=11)
    request = sent_request(reply)
    assert (request.scope, request.partition_id, request.classes) == ("class", 1, (3,))
    assert request.inbox_ids == (filed.id,)
    assert reply.content[NODE_RECORD]["partition-id"] == 1
    events = inbox.entry(filed.id).events
    assert [(e["status"], e["run"], e["partition"]) for e in events] == [("sent", 11, 1)]
    assert events[0]["digest"] == request.digest()
    assert inbox.entry(filed.id).pending  # sent, not yet decided: asked again next job


def test_pending_requests_are_merged_per_scope(inbox):
    a = inbox.file("class", classes=[3])
    b = inbox.file("instance", sample_ids=[5])
    c = inbox.file("class", classes=[5, 3])
    request = sent_request(ask(inbox))
    assert request.scope == "class" and request.classes == (3, 5)
    assert set(request.inbox_ids) == {a.id, c.id}  # b waits for a later job
    assert inbox.entry(b.id).status == "filed"
    d = inbox.file("client")
    request = sent_request(ask(inbox))
    assert request.scope == "client"
    assert set(request.inbox_ids) == {a.id, b.id, c.id, d.id}  # client-wise covers all


def test_instance_fraction_is_resolved_on_the_node_deterministically(inbox):
    data = federated_data(ExperimentConfig.from_run_config(RC))
    inbox.file("instance", fraction=0.5)
    first, second = sent_request(ask(inbox)), sent_request(ask(inbox))
    assert first.sample_ids == second.sample_ids
    train = set(data.train_indices(1).tolist())
    assert set(first.sample_ids) <= train
    assert len(first.sample_ids) == round(0.5 * len(train))


def test_inbox_wins_over_node_config_and_run_config(inbox):
    rc = run_config(**{"federation.num-clients": NUM, "forget.clients": "1"})
    # Nothing filed: the run-config request (a simulation) ...
    assert sent_request(ask(inbox, rc=rc)).scope == "client"
    # ... unless the server says run-config requests do not apply (a deployment).
    assert sent_request(ask(inbox, rc=rc, run_config_requests=False)) is None
    # The node-config request applies on a deployment too.
    assert sent_request(ask(inbox, rc=rc, run_config_requests=False,
                            **{"forget-scope": "class", "forget-classes": "4"})).classes == (4,)
    inbox.file("class", classes=[2])
    assert sent_request(ask(inbox, rc=rc, run_config_requests=False,
                            **{"forget-scope": "class", "forget-classes": "4"})).classes == (2,)


def test_the_partition_check_does_not_touch_the_inbox(inbox):
    filed = inbox.file("client")
    query = incoming(RecordDict({QUERY_CONFIG: ConfigRecord({WANT_REQUEST: False})}),
                     "query.unlearn")
    reply = handle_query(query, context(1, RC, inbox=str(inbox.root)), harness_view)
    assert REQUEST_RECORD not in reply.content and NODE_RECORD in reply.content
    assert inbox.entry(filed.id).events == []


def test_withdrawn_and_final_requests_are_not_sent(inbox, capsys):
    a = inbox.file("class", classes=[1])
    inbox.withdraw(a.id)
    assert sent_request(ask(inbox)) is None
    with pytest.raises(InboxError, match="already withdrawn"):
        inbox.withdraw(a.id)
    b = inbox.file("class", classes=[2])
    ask(inbox)
    deliver_receipt(inbox, receipt_record([b.id], "honoured", 3, method="not",
                                          model_sha256="ab" * 32))
    assert inbox.entry(b.id).status == "honoured"
    with pytest.raises(InboxError, match="already honoured.*stays unlearned"):
        inbox.withdraw(b.id)
    assert sent_request(ask(inbox)) is None
    # A withdrawal sticks even if a verdict of the job it was sent in arrives later.
    c = inbox.file("class", classes=[4])
    ask(inbox)
    inbox.withdraw(c.id)
    deliver_receipt(inbox, receipt_record([c.id], "accepted", 3))
    assert inbox.entry(c.id).status == "withdrawn"
    assert sent_request(ask(inbox)) is None


def test_hand_edited_request_files_are_reported_not_sent(inbox, caplog, capsys):
    (inbox.requests_dir / "bad.json").write_text('{"id": "bad", "scope": "class", '
                                                 '"classes": [3.5]}')
    (inbox.requests_dir / "worse.json").write_text("{not json")
    caplog.set_level(logging.WARNING)
    assert sent_request(ask(inbox)) is None
    assert "bad.json" in caplog.text and "3.5 (float) is not an integer" in caplog.text
    assert cli(["request", "list", "--inbox", str(inbox.root)]) == 1  # not "all is well"
    err = capsys.readouterr().err
    assert "unreadable: bad.json" in err and "unreadable: worse.json" in err


# -- receipts -------------------------------------------------------------------------------
def test_receipts_are_appended_to_each_request_history(inbox):
    a = inbox.file("class", classes=[3])
    b = inbox.file("class", classes=[4])
    ask(inbox)
    ack = deliver_receipt(inbox, receipt_record([a.id, b.id], "accepted", 2**63 + 5,
                                                model_before_arrays_sha256="cd" * 32))
    assert ack.content[RECEIPT_ACK]["written"] == 2
    deliver_receipt(inbox, receipt_record([a.id, b.id], "honoured", 2**63 + 5, method="not",
                                          model_sha256="ef" * 32, rounds=15, comm_bytes=10))
    entry = inbox.entry(a.id)
    assert [e["status"] for e in entry.events] == ["sent", "accepted", "honoured"]
    honoured = entry.events[-1]
    assert honoured["run"] == 2**63 + 5  # Flower run ids are unsigned 64-bit
    assert (honoured["method"], honoured["model_sha256"], honoured["rounds"]) == (
        "not", "ef" * 32, 15)
    # A rejection carries its reason.
    c = inbox.file("class", classes=[42])
    deliver_receipt(inbox, receipt_record([c.id], "rejected", 9,
                                          reason="class(es) [42] outside the label set 0..9"))
    assert inbox.entry(c.id).status == "rejected"
    assert "outside the label set" in inbox.entry(c.id).events[-1]["reason"]


def test_malformed_or_misplaced_receipts_change_nothing(inbox, tmp_path):
    a = inbox.file("client")
    for record in (ConfigRecord({"request-ids": [a.id], "status": "forgotten", "run": "1"}),
                   ConfigRecord({"request-ids": [a.id], "status": "honoured", "run": 1}),
                   ConfigRecord({"request-ids": ["../x"], "status": "honoured", "run": "1"}),
                   ConfigRecord({"request-ids": [a.id], "status": "honoured", "run": "1",
                                 "extra": 1})):
        ack = deliver_receipt(inbox, record)
        assert ack.content[RECEIPT_ACK]["written"] == 0 and "error" in ack.content[RECEIPT_ACK]
    ack = deliver_receipt(inbox, receipt_record(["20990101T000000Z-abcdef"], "honoured", 1))
    assert ack.content[RECEIPT_ACK]["written"] == 0  # unknown id
    ack = deliver_receipt(None, receipt_record([a.id], "honoured", 1))  # a node without inbox
    assert ack.content[RECEIPT_ACK]["written"] == 0
    assert inbox.entry(a.id).events == []


def test_a_partial_history_line_is_skipped_and_sealed(inbox):
    a = inbox.file("client")
    path = inbox.receipts_dir / f"{a.id}.jsonl"
    path.write_bytes(b'{"status":"sent","run":1}\n{"status":"acce')  # a crash mid-write
    assert [e["status"] for e in inbox.entry(a.id).events] == ["sent"]
    inbox.append_event(a.id, {"status": "accepted", "run": 1})
    assert [e["status"] for e in inbox.entry(a.id).events] == ["sent", "accepted"]
    assert path.read_bytes().count(b"\n") == 3


def test_at_most_max_inbox_ids_go_out_at_once_and_the_rest_wait(tmp_path, monkeypatch):
    """More pending requests than one record may carry: one query carries the oldest
    MAX_INBOX_IDS (here lowered to 5); the newest waits and goes out once they are
    decided."""
    import fedunlearn.inbox as inbox_module
    from fedunlearn.inbox import Inbox

    monkeypatch.setattr(inbox_module, "MAX_INBOX_IDS", 5)
    box = Inbox(str(tmp_path / "box"))
    ids = [box.file(scope="class", classes=[3]).id for _ in range(6)]
    scope, batch, problems = box.pending_batch()
    assert scope == "class" and not problems
    assert len(batch) == 5
    (waiting,) = set(ids) - {r.id for r in batch}
    latest = max(r.filed_at for r in batch)
    assert box.entry(waiting).request.filed_at >= latest  # the newest waits
    for r in batch:  # the server's verdict on the 5 that went out
        box.append_event(r.id, {"status": "honoured", "run": 1, "node": 5})
    scope, batch, _ = box.pending_batch()
    assert [r.id for r in batch] == [waiting]


def test_filing_never_replaces_an_existing_request(tmp_path, monkeypatch):
    """Two filings that draw the same id: the second gets a fresh one, the first stays."""
    import fedunlearn.inbox as inbox_module
    from fedunlearn.inbox import Inbox

    box = Inbox(str(tmp_path / "box"))
    draws = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(inbox_module, "_new_token", lambda: next(draws))
    monkeypatch.setattr(inbox_module, "_now", lambda: "2026-12-02T10:00:00.000+00:00")
    first = box.file(scope="class", classes=[3])
    second = box.file(scope="instance", sample_ids=[4])
    assert first.id.endswith("aaaaaa") and second.id.endswith("bbbbbb")
    assert box.entry(first.id).request.scope == "class"
    assert box.entry(second.id).request.scope == "instance"


def test_symbolic_links_in_the_inbox_are_refused_and_nothing_is_written_outside(tmp_path):
    from fedunlearn.client.query import handle_receipt
    from fedunlearn.federation import receipt_record
    from fedunlearn.inbox import Inbox, InboxError
    from fedunlearn.requests import RECEIPT_RECORD

    box = Inbox(str(tmp_path / "box"))
    real = box.file(scope="class", classes=[3])
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (box.receipts_dir / f"{real.id}.jsonl").symlink_to(outside)
    # A request file linked to a file outside the inbox is not a request.
    foreign = tmp_path / "foreign.json"
    foreign.write_text((box.requests_dir / f"{real.id}.json").read_text()
                       .replace(real.id, "20261202T000000Z-ffffff"))
    (box.requests_dir / "20261202T000000Z-ffffff.json").symlink_to(foreign)
    entries, problems = box.entries()
    assert [e.request.id for e in entries] == []  # the real one's history is a link
    assert any("symbolic link" in p for p in problems)
    with pytest.raises(InboxError, match="symbolic link"):
        box.append_event(real.id, {"status": "withdrawn"})
    receipt = receipt_record([real.id, "20261202T000000Z-ffffff"], "accepted", 3)
    msg = incoming(RecordDict({RECEIPT_RECORD: receipt}), "query.unlearn")
    ctx = Context(run_id=3, node_id=1, node_config={"inbox": str(box.root)},
                  state=RecordDict(), run_config={})
    reply = handle_receipt(msg, ctx)
    assert reply.content["receipt-ack"]["written"] == 0
    assert outside.read_text() == "" and "accepted" not in foreign.read_text()
    linked_dir = tmp_path / "box2"
    (linked_dir).mkdir()
    (linked_dir / "requests").symlink_to(tmp_path)
    with pytest.raises(InboxError, match="symbolic link"):
        Inbox(str(linked_dir))


def test_a_harness_node_rejects_a_bad_request_of_a_batch_alone(inbox):
    """One good and one bad instance-wise request pending on a harness node: the bad one
    goes back as the node's own rejection, the good one is the request."""
    from fedunlearn.client import NodeView

    view = harness_view(context(1, RC, inbox=str(inbox.root)))
    own = [int(i) for i in view.train_ids[:3]]
    good = inbox.file("instance", sample_ids=own)
    bad = inbox.file("instance", sample_ids=[own[0], 2 ** 40])
    reply = ask(inbox)
    request = sent_request(reply)
    assert request.inbox_ids == (good.id,) and sorted(request.sample_ids) == sorted(own)
    refused = reply.content["rejected"]
    assert list(refused["inbox-ids"]) == [bad.id]
    assert str(2 ** 40) in refused["reasons"][0] and len(refused["reasons"][0]) < 300


def test_a_fifo_a_deep_json_and_a_huge_file_in_the_inbox_are_refused_not_fatal(tmp_path):
    """Hostile inbox files (issue: service mode that loses nothing, items 11, 13, 16): a
    FIFO never blocks a reader, a few KB of nested JSON is an unreadable file with a
    reason, a file over the size cap is refused unread; the good request still goes out,
    and `fedunlearn audit --inbox` and `request list` finish."""
    import os

    from fedunlearn.inbox import MAX_FILE_BYTES

    inbox = Inbox(str(tmp_path / "inbox"))
    good = inbox.file(scope="client")
    requests_dir, receipts_dir = inbox.requests_dir, inbox.receipts_dir
    os.mkfifo(requests_dir / "20990101T000000Z-aaaaaa.json")
    os.mkfifo(receipts_dir / "20990101T000000Z-aaaaaa.jsonl")
    (requests_dir / "20990101T000000Z-bbbbbb.json").write_text("[" * 5000 + "]" * 5000)
    with open(requests_dir / "20990101T000000Z-cccccc.json", "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    entries, problems = inbox.entries()
    assert [e.request.id for e in entries] == [good.id]
    reasons = "\n".join(map(str, problems))
    assert "aaaaaa.json" in reasons and "not a regular file" in reasons
    assert "bbbbbb.json" in reasons and "nested too deeply" in reasons
    assert "cccccc.json" in reasons and "more than an inbox file may" in reasons
    scope, batch, _ = inbox.pending_batch()
    assert scope == "client" and [r.id for r in batch] == [good.id]
    assert cli(["request", "list", "--inbox", str(inbox.root)]) == 1
    from fedunlearn.audit import AuditLog

    log_ = AuditLog(tmp_path / "audit.jsonl", 1)
    log_.record("job.started")
    assert cli(["audit", str(log_.path), "--inbox", str(inbox.root)]) == 0  # the FIFO skipped


def _denied(monkeypatch, function: str, path) -> None:
    """``os.<function>`` raises PermissionError for ``path`` (as for a folder or file the
    SuperNode's user may not read; chmod alone does not stop root)."""
    import errno
    import os

    real = getattr(os, function)

    def guarded(target, *args, **kwargs):
        if os.fspath(target) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, function, guarded)


def test_a_requests_folder_nobody_can_list_is_an_error_not_no_requests(inbox, capsys,
                                                                        monkeypatch):
    """Issue item 15: an unreadable requests/ folder never reads as "no requests"."""
    inbox.file(scope="client")
    _denied(monkeypatch, "scandir", inbox.requests_dir)
    with pytest.raises(InboxError, match="cannot list .*requests.*permission"):
        inbox.entries()
    assert cli(["request", "list", "--inbox", str(inbox.root)]) != 0
    assert "cannot list" in capsys.readouterr().err
    reply = ask(inbox)  # the node reports the problem; the server rejects it by name
    record = reply.content[REQUEST_RECORD]
    assert record["scope"] == "invalid" and "cannot list" in record["error"]


def test_an_unreadable_request_file_is_rejected_once_with_the_reason(inbox, capsys,
                                                                     monkeypatch):
    """Issue item 15: an unreadable request file goes to the server as the node's own
    rejection (so the data owner's receipt says why), once; `request list` exits 1."""
    good = inbox.file(scope="class", classes=[3])
    locked = inbox.file(scope="class", classes=[4])
    _denied(monkeypatch, "open", inbox.requests_dir / f"{locked.id}.json")
    reply = ask(inbox)
    assert sent_request(reply).inbox_ids == (good.id,)
    refused = reply.content["rejected"]
    assert list(refused["inbox-ids"]) == [locked.id]
    assert "permission denied" in refused["reasons"][0]
    assert cli(["request", "list", "--inbox", str(inbox.root)]) == 1
    assert f"unreadable: {locked.id}.json" in capsys.readouterr().err
    inbox.append_event(locked.id, {"status": "rejected", "reason": refused["reasons"][0]})
    assert "rejected" not in ask(inbox).content  # final: not rejected again at every query

"""One verified view of the federation for the whole job, checked replies, requests from
the nodes on a deployment, receipts and the audit trail: whole jobs
(:func:`fedunlearn.harness.run.run_experiment`) on the in-process grid (LocalGrid: the
nodes answer with the real ClientApp) whose membership changes while the job runs.

Each test reproduces one hole of the deployment path and shows it closed with the job
completing:

1. a client-wise target that restarts under a new node id (same node-config) after its
   request was accepted is never trained or evaluated again;
2. a second node claiming a partition another node holds (before the check: the job
   refuses to start; after it: the impostor takes no part and its request is rejected,
   the real holder's request is served);
3. a node that replies malformed (train and evaluate) is a failed node for that round;
4. on a deployment the run-config's default ``forget.clients="0"`` makes no request: the
   request comes from a node's inbox, and the verdict comes back to it as a receipt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

import fedunlearn.federation as federation
from fedunlearn.audit import read_audit
from fedunlearn.cli import main as cli
from fedunlearn.inbox import Inbox
from fedunlearn.harness.run import run_experiment
from fedunlearn.harness.data import federated_data
from fedunlearn.harness.node import harness_view

from .helpers import RecordingGrid, node_ids, run_config

NUM = 4
RUN_ID = 4242
NODE_ID = node_ids(NUM, RUN_ID)
"""``NODE_ID[p]``: the node holding partition ``p`` when a LiveGrid starts."""


@pytest.fixture(scope="module")
def app():
    from flower_apps.client_app import app as client_app

    return client_app


def job_config(tmp_path: Path, **overrides) -> dict:
    return run_config(**{"federation.num-clients": NUM, "dataset.name": "synthetic",
                         "pretrain.rounds": 2, "unlearn.rounds": 2, "method": "ft",
                         "output-dir": str(tmp_path / "out"),
                         "checkpoint-dir": str(tmp_path / "ck"),
                         "eval.mia-max-members": 40, "eval.every": 100, **overrides})


class LiveGrid(RecordingGrid):
    """The in-process grid (a LocalGrid: each node answers with the real ClientApp under its
    own node-config and state) of run ``RUN_ID``, whose membership a test changes while
    the job runs: ``on_send(grid, messages)`` may restart a node under a new id, let one
    join or leave before a batch is delivered; ``tamper(node, reply)`` may replace a
    node's reply. A message to a node that left gets Flower's error reply."""

    def __init__(self, app, rc: dict, node_configs: dict[int, dict] | None = None,
                 on_send=None, tamper=None):
        super().__init__(app, NUM, rc, node_configs, run_id=RUN_ID, tamper=tamper)
        self.rc, self.on_send = rc, on_send
        self.batches = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.on_send is not None:
            self.on_send(self, messages)
        self.batches += 1
        return super().send_and_receive(messages, timeout=timeout)

    def join(self, node: int, node_config: dict) -> None:
        """A node connects (fresh state) with ``node_config``."""
        self.contexts[node] = Context(run_id=RUN_ID, node_id=node,
                                      node_config=dict(node_config), state=RecordDict(),
                                      run_config=self.rc)

    def leave(self, node: int) -> None:
        self.contexts.pop(node, None)

    def restart(self, node: int, new_id: int) -> None:
        """``node``'s SuperNode restarts under ``new_id``: same node-config, fresh state."""
        self.join(new_id, self.contexts.pop(node).node_config)


def nodes_config(**extra_by_partition) -> dict[int, dict]:
    """Node-config pairs by partition: ``p<i>={...}`` adds them to partition ``i``'s node
    (LiveGrid gives node ``NODE_ID[p]`` ``partition-id=p`` and ``num-partitions``)."""
    return {int(key[1:]): dict(extra) for key, extra in extra_by_partition.items()}


def audit_events(out_dir: Path) -> list[dict]:
    reading = read_audit(out_dir / "audit.jsonl")
    assert reading.intact and not reading.skipped, (reading.chain_breaks, reading.skipped)
    return reading.records


def is_query(messages) -> bool:
    return bool(messages) and messages[0].metadata.message_type == "query.unlearn"


# -- 1. a restarted target does not come back ------------------------------------------------
def test_restarted_target_under_a_new_node_id_takes_no_part(app, tmp_path, server_identity,
                                                            single_thread, caplog):
    """Partition 0's node asks for client-wise forgetting; once its request is accepted
    it restarts as node 99 with the same node-config. Without the verified view, node 99
    would train in every recovery round and its data would count as retained."""
    rc = job_config(tmp_path)  # forget.clients="0": a simulation, partition 0 asks
    queries = []

    def restart_after_requests(grid, messages):
        if is_query(messages) and "receipt" not in messages[0].content:
            queries.append(len(messages))
            return
        if len(queries) == 2 and NODE_ID[0] in grid.contexts:  # the requests are in
            grid.restart(NODE_ID[0], 99)

    grid = LiveGrid(app, rc, nodes_config(), on_send=restart_after_requests)
    results = run_experiment(grid, rc)
    assert set(results) == {"ft"}
    res = results["ft"]
    assert [(r["scope"], r["partition_id"], r["node_id"]) for r in res["request"]] == [
        ("client", 0, NODE_ID[0])]
    assert grid.messages_to(99) == [], "the restarted target must not be sent anything"
    # Evaluation counted partitions 1..3 only as retained, and nothing as forget data:
    # partition 0's node is gone, node 99 is a stranger.
    evaluated = [m for m in grid.replies if m.metadata.message_type == "evaluate.unlearn"
                 and not m.has_error() and "retain-total" in m.content["metrics"]]
    assert {m.metadata.src_node_id for m in evaluated} <= set(NODE_ID)
    assert all(m.metadata.src_node_id != 99 for m in grid.replies)
    events = audit_events(tmp_path / "out")
    excluded = [e for e in events if e["event"] == "node.excluded"]
    assert [e["node"] for e in excluded] == [99]
    assert "Node 99 is not in the verified federation" in caplog.text
    # Partition 0's node left after its request was accepted: it is a failed node of the
    # model's evaluation, so Retain / Forget / MIA are missing, not measured on fewer nodes.
    assert res["measurement"]["unlearned"]["failed_nodes"] == [NODE_ID[0]]
    assert res["unlearned"]["retain"] is None or res["unlearned"]["retain"] != res["unlearned"]["retain"]
    assert [e["node"] for e in events if e["event"] == "node.departed"] == [NODE_ID[0]]
    assert res["cost"]["rounds"] >= 1


# -- 2. two nodes claiming one partition --------------------------------------------------
def test_two_holders_of_one_partition_before_the_check_stop_the_job(app, tmp_path,
                                                                    server_identity):
    rc = job_config(tmp_path)
    grid = LiveGrid(app, rc)
    grid.join(77, {"partition-id": 0, "num-partitions": NUM})
    holders = sorted([NODE_ID[0], 77])  # by node id
    with pytest.raises(RuntimeError, match=re.escape(f"partition 0 is held by several nodes "
                                                     f"{holders}")):
        run_experiment(grid, rc)
    events = audit_events(tmp_path / "out")
    assert [e["event"] for e in events] == ["job.started", "job.failed"]
    assert "held by several nodes" in events[-1]["error"]


def test_impostor_claiming_a_held_partition_takes_no_part(app, tmp_path, server_identity,
                                                          single_thread):
    """After the partition check, node 77 joins claiming partition 0 (held by NODE_ID[0])
    with a client-wise request; NODE_ID[0] asks for class 1. Only NODE_ID[0]'s request is
    served, and node 77 is never sent anything (had its request arrived, it would be
    rejected: see the next test)."""
    rc = job_config(tmp_path, **{"forget.clients": "0", "forget.scope": "class",
                                 "forget.classes": "1"})

    def join_after_check(grid, messages):
        if is_query(messages) and 77 not in grid.contexts:
            if sum(1 for m in grid.sent if m.metadata.message_type == "query.unlearn"):
                grid.join(77, {"partition-id": 0, "num-partitions": NUM,
                               "forget-scope": "client"})

    grid = LiveGrid(app, rc, nodes_config(), on_send=join_after_check)
    res = run_experiment(grid, rc)["ft"]
    assert [(r["node_id"], r["scope"], r["partition_id"]) for r in res["request"]] == [
        (NODE_ID[0], "class", 0)]
    assert 77 in grid.contexts
    assert grid.messages_to(77) == [], "the impostor is asked, trained and evaluated never"
    events = audit_events(tmp_path / "out")
    assert any(e["event"] == "node.excluded" and e["node"] == 77 for e in events)


def test_collect_requests_without_a_verified_map_refuses_shared_partitions(server_identity):
    """Checked against the replies' own claims, a partition claimed twice serves neither
    claimant's request: nobody can tell which holder is genuine."""
    from flwr.app import ConfigRecord

    
    from fedunlearn.harness.config import ExperimentConfig
    from fedunlearn.requests import NODE_RECORD, REQUEST_RECORD

    from .helpers import reply_from

    data = federated_data(ExperimentConfig.from_run_config(
        run_config(**{"federation.num-clients": NUM})))

    def reply(node, partition, request):
        content = RecordDict({NODE_RECORD: ConfigRecord({"partition-id": partition,
                                                         "num-partitions": NUM})})
        if request:
            content[REQUEST_RECORD] = ConfigRecord(request)
        return reply_from(node, content)

    replies = [reply(10, 0, {"scope": "client", "partition-id": 0}),
               reply(77, 0, {"scope": "client", "partition-id": 0}),
               reply(11, 1, {"scope": "client", "partition-id": 1})]
    accepted, rejected = federation.collect_valid_requests(replies, data)
    assert list(accepted) == [11]
    assert {r["node_id"] for r in rejected} == {10, 77}
    assert all("claimed by several nodes [10, 77]" in r["reason"] for r in rejected)
    # Against the verified view, the stranger is rejected and the holder served.
    accepted, rejected = federation.collect_valid_requests(
        replies, data, verified={10: 0, 11: 1, 12: 2, 13: 3})
    assert sorted(accepted) == [10, 11]
    assert [r["node_id"] for r in rejected] == [77]
    assert "not in the verified federation" in rejected[0]["reason"]


# -- 3. malformed replies are failed nodes ------------------------------------------------
def test_malformed_train_and_evaluate_replies_are_failed_nodes(app, tmp_path, server_identity,
                                                               single_thread, caplog):
    """Partition 2's node answers every train round without its metric keys and every
    evaluation with a feature vector whose length is not a multiple of 3 (and partition 3's
    node once with NaN weights). The job completes on the other nodes' replies."""
    rc = job_config(tmp_path)
    nan_sent = []

    def tamper(node, reply):
        if reply.has_error():
            return reply
        kind = reply.metadata.message_type.split(".")[0]
        content = reply.content
        if node == NODE_ID[2] and kind == "train":
            return Message(RecordDict({"arrays": content["arrays"],
                                       "metrics": MetricRecord({"loss": 0.5})}),
                           metadata=reply.metadata)
        if node == NODE_ID[2] and kind == "evaluate" and "retain-total" in content["metrics"]:
            metrics = dict(content["metrics"])
            metrics["retain-features"] = [0.1] * 7
            return Message(RecordDict({"metrics": MetricRecord(metrics)}),
                           metadata=reply.metadata)
        if node == NODE_ID[3] and kind == "train" and not nan_sent:
            nan_sent.append(True)
            arrays = content["arrays"]
            name = next(iter(arrays.keys()))
            values = arrays[name].numpy().copy()
            values.flat[0] = float("nan")
            from flwr.app import Array

            arrays[name] = Array(values)
        return reply

    grid = LiveGrid(app, rc, tamper=tamper)
    res = run_experiment(grid, rc)["ft"]
    assert res["cost"]["rounds"] >= 1 and 0 <= res["unlearned"]["test"] <= 100
    assert "metrics.num-examples is missing" in caplog.text
    assert "metrics.retain-features" in caplog.text and "multiple of 3" in caplog.text
    assert "NaN or infinity" in caplog.text
    refused = [e for e in audit_events(tmp_path / "out") if e["event"] == "reply.refused"]
    assert {e["node"] for e in refused} == {NODE_ID[2], NODE_ID[3]}
    assert {e["message_type"].split(".")[0] for e in refused} == {"train", "evaluate"}


# -- 4. deployment: requests come from the nodes -------------------------------------------
def test_deployment_ignores_default_forget_clients_and_serves_the_inbox(
        app, tmp_path, server_identity, single_thread, monkeypatch, caplog):
    """On a deployment (``is_deployment`` true) with the run-config's default
    ``forget.clients="0"``, partition 0 asks for nothing; partition 1's data owner filed a
    class-wise request in its inbox, which is served, and whose receipts (sent, accepted,
    honoured with the run and the model hash) come back to the inbox."""
    monkeypatch.setattr(federation, "is_deployment", lambda grid: True)
    rc = job_config(tmp_path)
    assert rc["forget.clients"] == "0"
    inbox = Inbox(tmp_path / "inbox-1")
    filed = inbox.file("class", classes=[2], note="owner of partition 1")
    grid = LiveGrid(app, rc, nodes_config(p1={"inbox": str(inbox.root)}))
    res = run_experiment(grid, rc)["ft"]
    assert [(r["node_id"], r["scope"], r["partition_id"], r.get("classes")) for r in
            res["request"]] == [(NODE_ID[1], "class", 1, [2])]
    assert list(res["config"]["forget"]["clients"]) == []
    assert "forget.clients=0 is ignored on a deployment" in caplog.text
    # Queries told the nodes not to use the run-config's forget.* ...
    queries = [m for m in grid.sent if m.metadata.message_type == "query.unlearn"
               and "config" in m.content]
    assert queries and all(m.content["config"]["run-config-requests"] is False
                           for m in queries)
    # ... and the receipts reached the inbox.
    entry = inbox.entry(filed.id)
    assert [e["status"] for e in entry.events] == ["sent", "accepted", "honoured"]
    assert entry.status == "honoured" and not entry.pending
    assert {e["run"] for e in entry.events} == {RUN_ID}
    honoured = entry.events[-1]
    events = audit_events(tmp_path / "out")
    finished = next(e for e in events if e["event"] == "unlearning.finished")
    assert honoured["model_sha256"] == finished["model_sha256"]
    assert honoured["model_arrays_sha256"] == finished["model_arrays_sha256"]
    assert honoured["method"] == "ft" and honoured["rounds"] == finished["rounds"]
    assert (entry.events[1]["model_before_arrays_sha256"]
            == finished["model_before_arrays_sha256"])
    names = [e["event"] for e in events]
    assert names[:2] == ["job.started", "federation.verified"]
    assert events[0]["deployment"] is True and events[0]["ignored_forget_clients"] == [0]
    received = next(e for e in events if e["event"] == "request.received")
    assert received["node"] == NODE_ID[1] and received["inbox_ids"] == [filed.id]
    assert "sample_ids" not in received and len(received["digest"]) == 64
    assert names.count("receipt.sent") == 2 and names[-1] == "job.finished"
    assert all(e["run"] == RUN_ID for e in events)
    # Each receipt carries the audit chain's head when it was sent: the data owner checks
    # the server's log against it.
    log = tmp_path / "out" / "audit.jsonl"
    seqs = [e["audit_seq"] for e in entry.events[1:]]
    assert seqs == sorted(seqs) and all(len(e["audit_sha256"]) == 64 for e in entry.events[1:])
    # The honoured receipt is anchored at the request's own request.honoured record,
    # written right after the method's unlearning.finished.
    anchor = events[seqs[-1]]
    assert anchor["event"] == "request.honoured"
    assert anchor["model_sha256"] == finished["model_sha256"]
    assert events[seqs[-1] - 1]["event"] == "unlearning.finished"
    assert cli(["audit", str(log), "--inbox", str(inbox.root)]) == 0
    # A second job finds nothing pending in the inbox: partition 1 asks for nothing.
    rc2 = job_config(tmp_path, **{"output-dir": str(tmp_path / "out2")})
    run_experiment(LiveGrid(app, rc2, nodes_config(p1={"inbox": str(inbox.root)})), rc2)
    assert json.loads((tmp_path / "out2" / "no-request.json").read_text())["rejected"] == []
    # The last records of the first job's log removed: the head file says so; the same
    # cut with the head file rewritten is caught by the receipt.
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:seqs[-1]]))
    assert cli(["audit", str(log)]) == 1
    head = read_audit(log, head=False)
    (tmp_path / "out" / "audit.jsonl.head").write_text(json.dumps(
        {"seq": head.records[-1]["seq"], "sha256": head.digests[head.records[-1]["seq"]][1]}))
    assert cli(["audit", str(log)]) == 0
    assert cli(["audit", str(log), "--inbox", str(inbox.root)]) == 1


# -- 5. the harness's server checks requests with what the nodes report -------------------
class _NoPartitions:
    """The server's data with the client partitions out of reach: any read of a
    partition's ids fails the test."""

    def __init__(self, data):
        self._data = data

    def __getattr__(self, name):
        if name in ("train_indices", "val_indices", "partitions"):
            raise AssertionError(f"the server read the client partitions ({name})")
        return getattr(self._data, name)


def test_the_harness_server_checks_requests_without_the_client_partitions(
        app, tmp_path, server_identity, single_thread, monkeypatch):
    """Partition 1's node asks for class 1, partition 2's for an id it does not hold: the
    server accepts and rejects them from the nodes' reports (same reasons as before), bounds
    replies by the reported counts, and never reads a partition of its own copy of the
    data."""
    import fedunlearn.harness.run as server

    real = server.federated_data
    monkeypatch.setattr(server, "federated_data", lambda cfg: _NoPartitions(real(cfg)))
    from fedunlearn.client import NodeView

    from .helpers import context as node_context

    rc = job_config(tmp_path, **{"forget.clients": "", "forget.scope": "class"})
    foreign = int(harness_view(node_context(3, rc)).train_ids[0])  # partition 3's
    nodes = nodes_config(p1={"forget-scope": "class", "forget-classes": "1"},
                         p2={"forget-scope": "instance", "forget-sample-ids": str(foreign)})
    grid = LiveGrid(app, rc, nodes)
    res = run_experiment(grid, rc)["ft"]
    assert [(r["scope"], r["node_id"]) for r in res["request"]] == [("class", NODE_ID[1])]
    (rejected,) = res["rejected"]
    assert rejected["node_id"] == NODE_ID[2]
    assert f"sample id(s) {foreign} are not in partition 2's training split" in rejected["reason"]
    # Measured on the nodes, bounded by what they reported: every count came back.
    assert res["measurement"]["unlearned"]["failed_nodes"] == []
    assert 0.0 <= res["unlearned"]["forget"] <= 100.0
    # results.json's record of the design (forget_ids): partition 1's class-1 samples in
    # the split the run-config assigns, built from the run-config apart from the server's
    # guarded copy, after the checks
    import numpy as np

    from fedunlearn.harness.config import ExperimentConfig

    data = real(ExperimentConfig.from_run_config(rc))
    ids = data.train_indices(1)
    labels = np.asarray([int(data.train[i][1]) for i in ids])
    assert res["forget_ids"] == [int(i) for i in ids[labels == 1]] != []


def test_harness_nodes_that_hold_their_own_data_folders(app, tmp_path, server_identity,
                                                       single_thread, monkeypatch):
    """fedunlearn's own ClientApp on nodes whose node-config names a dataset-path folder:
    they train and evaluate on it (not on the run-config's partitions), report counts,
    and a request filed on partition 1's node is checked on the node and served; the server never
    reads a partition and does not use the shared pretraining cache for them."""
    import numpy as np
    from datasets import Dataset, DatasetDict
    from sklearn.datasets import load_digits

    import fedunlearn.harness.run as server

    real = server.federated_data
    monkeypatch.setattr(server, "federated_data", lambda cfg: _NoPartitions(real(cfg)))
    x, y = load_digits(return_X_y=True)
    parts = np.array_split(np.random.default_rng(7).permutation(len(y)), NUM)
    roots = {}
    for p, ids in enumerate(parts):
        ids = ids[:120]
        roots[p] = tmp_path / f"node-{p}"
        DatasetDict({"train": Dataset.from_dict({"img": (x[ids[:100]] / 16.0).reshape(-1, 8, 8).tolist(),
                                                 "label": y[ids[:100]].tolist()}),
                     "test": Dataset.from_dict({"img": (x[ids[100:]] / 16.0).reshape(-1, 8, 8).tolist(),
                                                "label": y[ids[100:]].tolist()})}
                    ).save_to_disk(str(roots[p]))
    inbox = Inbox(str(tmp_path / "inbox-1"))
    filed = inbox.file(scope="instance", sample_ids=[0, 1, 2, 3])
    rc = job_config(tmp_path, **{"dataset.name": "digits", "forget.clients": ""})
    nodes = nodes_config(**{f"p{p}": {"dataset-path": str(root)} for p, root in roots.items()})
    nodes[1]["inbox"] = str(inbox.root)
    grid = LiveGrid(app, rc, nodes)
    res = run_experiment(grid, rc)["ft"]
    assert [(r["scope"], r["node_id"], r["num_samples"]) for r in res["request"]] == [
        ("instance", NODE_ID[1], 4)]
    assert res["forget_ids"] is None  # the node's own data: no split of the run-config's
    assert res["pretrain"]["cached"] is False
    assert str(tmp_path / "out" / "pretrained") in res["pretrain"]["path"]
    assert res["measurement"]["unlearned"]["failed_nodes"] == []
    assert inbox.events(filed.id)[-1]["status"] == "honoured"
    # Every train reply was bounded by the node's own training set (100 samples).
    train = [m for m in grid.replies if m.metadata.message_type.startswith("train")
             and not m.has_error()]
    assert train and all(0 < int(m.content["metrics"]["num-examples"]) <= 100 for m in train)


# -- 6. a retained node that drops out during recovery ------------------------------------
def test_a_retained_node_that_drops_out_is_a_failed_node_not_a_smaller_federation(
        app, tmp_path, server_identity, single_thread):
    """Partition 2's node (retained) leaves during the recovery rounds: every later round and the
    unlearned model's evaluation count it as failed; Retain / Forget / MIA of the
    unlearned model are missing (the original was measured over all nodes), never a
    number over fewer nodes; the audit log records the departure."""
    rc = job_config(tmp_path, **{"unlearn.rounds": 3})
    state = {"queries": 0, "recovery_rounds": 0}

    def drop_during_recovery(grid, messages):
        if is_query(messages) and "receipt" not in messages[0].content:
            state["queries"] += 1
        elif state["queries"] == 2 and messages and \
                messages[0].metadata.message_type.startswith("train"):
            state["recovery_rounds"] += 1
            if state["recovery_rounds"] == 2:
                grid.leave(NODE_ID[2])

    grid = LiveGrid(app, rc, nodes_config(), on_send=drop_during_recovery)
    res = run_experiment(grid, rc)["ft"]
    assert res["measurement"]["original"]["failed_nodes"] == []
    assert res["measurement"]["unlearned"]["failed_nodes"] == [NODE_ID[2]]
    for key in ("retain", "forget", "mia"):
        value = res["unlearned"][key]
        assert value is None or value != value, (key, value)
    assert res["unlearned"]["test"] > 0  # the server's own test set needs no node
    events = audit_events(tmp_path / "out")
    departed = [e for e in events if e["event"] == "node.departed"]
    assert [(e["node"], e["partition"]) for e in departed] == [(NODE_ID[2], 2)]
    assert res["departed_nodes"] == [NODE_ID[2]]
    # It was never sent anything after it left (the grid answered for it).
    assert all(int(m.metadata.dst_node_id) != NODE_ID[2] for m in grid.sent[-4:])


# -- 7. one method's failure is that method's ---------------------------------------------
def test_a_method_whose_target_left_fails_alone_and_the_job_says_so(
        app, tmp_path, server_identity, single_thread):
    """method=puf,ft; partition 0's node (the client-wise target, asking through its inbox)
    leaves just before PUF's unlearning round: PUF fails with the reason in its failed.json,
    the audit log and the receipt; FT still runs and writes its results; the job raises
    naming PUF."""
    from fedunlearn.strategies import UnlearningFailed

    inbox = Inbox(str(tmp_path / "inbox-0"))
    filed = inbox.file(scope="client")
    rc = job_config(tmp_path, **{"method": "puf,ft", "forget.clients": ""})

    def leave_before_puf(grid, messages):
        if messages and messages[0].metadata.message_type == "train.pseudo_gradient":
            grid.leave(NODE_ID[0])

    grid = LiveGrid(app, rc, nodes_config(p0={"inbox": str(inbox.root)}),
                    on_send=leave_before_puf)
    with pytest.raises(UnlearningFailed, match="puf"):
        run_experiment(grid, rc)
    out = tmp_path / "out"
    failed = json.loads((out / "puf" / "failed.json").read_text())
    assert "no target" in failed["failed"]
    assert f"[{NODE_ID[0]}] left the federation" in failed["failed"]
    assert failed["departed_nodes"] == [NODE_ID[0]]
    assert not (out / "puf" / "results.json").exists()
    ft = json.loads((out / "ft" / "results.json").read_text())
    assert ft["method"] == "ft" and ft["departed_nodes"] == [NODE_ID[0]]
    events = [e["event"] for e in audit_events(out)]
    assert "unlearning.failed" in events and events.count("unlearning.finished") == 1
    statuses = [e["status"] for e in inbox.events(filed.id)]
    # The target left, so no receipt reached it after PUF's failure: the audit log holds the
    # verdict, and the request stays pending for the next job.
    assert statuses[:2] == ["sent", "accepted"] and inbox.entry(filed.id).pending


# -- 8. many pending requests on one node -------------------------------------------------
def test_sixty_five_pending_inbox_requests_all_get_a_verdict_in_one_harness_job(
        app, tmp_path, server_identity, single_thread, monkeypatch):
    """65 class-wise requests pending in partition 1's inbox (more than a record once took):
    one harness job on a deployment serves them all, one receipt each."""
    monkeypatch.setattr(federation, "is_deployment", lambda grid: True)
    inbox = Inbox(tmp_path / "inbox-1")
    ids = [inbox.file("class", classes=[c % 3]).id for c in range(65)]
    rc = job_config(tmp_path, **{"unlearn.rounds": 1})
    res = run_experiment(LiveGrid(app, rc, nodes_config(p1={"inbox": str(inbox.root)})),
                         rc)["ft"]
    assert [(r["node_id"], r["classes"]) for r in res["request"]] == [(NODE_ID[1], [0, 1, 2])]
    assert {inbox.entry(i).status for i in ids} == {"honoured"}
    assert all(inbox.entry(i).events[-1]["audit_seq"] >= 0 for i in ids)


def test_a_node_away_for_one_look_is_asked_again_when_it_is_back(app, tmp_path,
                                                                 server_identity):
    """Membership follows the SuperLink round by round: a verified node missing from one
    look at the node list (a heartbeat gap, a SuperNode restart under the same id) is a
    failed node while it is away and is asked again once it is connected again."""
    from fedunlearn.audit import AuditLog

    rc = job_config(tmp_path)
    inner = LiveGrid(app, rc, nodes_config())
    log_ = AuditLog(tmp_path / "audit.jsonl", RUN_ID)
    grid = federation.GuardedGrid(inner, log_)
    grid.verify({n: p for p, n in enumerate(NODE_ID)})
    node = NODE_ID[2]
    config = inner.contexts[node].node_config
    inner.leave(node)
    assert node not in grid.get_node_ids() and grid.departed == [node]
    inner.join(node, config)
    assert node in grid.get_node_ids() and grid.departed == []
    query = federation.query(grid, [node], run_config_requests=False)
    assert [int(r.metadata.src_node_id) for r in query] == [node]
    assert not query[0].has_error()  # it was asked, and it answered
    events = [e["event"] for e in read_audit(tmp_path / "audit.jsonl").records]
    assert events == ["node.departed", "node.rejoined"]

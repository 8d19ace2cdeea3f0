"""Service mode (fedunlearn.UnlearningService): continuous training, requests served as
they arrive, versions, checkpoint/resume, dropouts, the node's own check on the receipt.

The plugin tests run the user's app that tests/test_plugin.py writes outside fedunlearn
(every message reaches the user's ClientApp); the simulation test runs fedunlearn's own
ClientApp over 10 digits nodes on the in-process engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_plugin import USER_NODE, fedavg, user_grid, userapp  # noqa: F401  (fixtures)
from tests.helpers import bench_module

ROOT = Path(__file__).resolve().parents[1]
#: |final forget accuracy of the served model - that of a model that never saw the
#: node| on node 3's data, 40 rounds, seed 0; bench/service.py measures it over seeds
#: (docs/service.md).
FORGET_TOLERANCE = 6.0


def _service(task, tmp_path, method=None, state="state", rebuild=False, **config):
    from fedunlearn import NoT, Recovery, ServiceConfig, UnlearningService

    method = method or NoT(Recovery(rounds=2, lr=0.05, server_momentum=0.0),
                           model_fn=task.Net, example_input=torch.zeros(1, 1, 8, 8))
    testset = task.Blobs(64, seed=999)

    def evaluate(a):
        net = task.Net()
        net.load_state_dict(a.to_torch_state_dict())
        return {"test": task.test(net, testset)}

    return UnlearningService(method, state_dir=tmp_path / state,
                             config=ServiceConfig(**{"rounds": 6, "lr": 0.05, **config}),
                             evaluate_fn=evaluate, rebuild=rebuild)


def audit_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def trained_nodes(sent) -> list[tuple[int, str]]:
    return [(int(m.metadata.dst_node_id), m.metadata.message_type) for m in sent
            if m.metadata.message_type.startswith("train")]


def test_requests_arriving_while_training_are_served_and_training_goes_on(userapp, tmp_path,
                                                                           capsys, user_grid):
    from fedunlearn import read_versions
    from fedunlearn.cli import main as cli
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inboxes = {i: tmp_path / f"inbox-{i}" for i in range(4)}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=2)
    filed, sent_at = {}, {}

    def on_round(rnd, info):
        sent_at[rnd] = len(grid.sent)
        if rnd == 2:
            filed["client"] = Inbox(str(inboxes[0])).file(scope="client").id
        if rnd == 4:
            filed["class"] = Inbox(str(inboxes[2])).file(scope="class", classes=[1]).id

    service = _service(task, tmp_path, rounds=6)
    service.on_round = on_round
    outcome = service.run(grid, arrays)
    assert outcome.round == 6 and outcome.stopped == "round budget 6 reached"
    assert [s["round"] for s in outcome.steps] == [2, 4]
    assert [s["targets"] for s in outcome.steps] == [[USER_NODE[0]], [USER_NODE[2]]]
    versions = read_versions(tmp_path / "state")
    assert [v["kind"] for v in versions] == ["start", "unlearned", "unlearned", "final"]
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    assert versions[1]["honours"][0]["inbox_ids"] == [filed["client"]]
    assert versions[2]["honours"][0]["classes"] == [1]
    for v in versions:
        from fedunlearn import load_model
        from fedunlearn.audit import model_digest
        assert model_digest(load_model(v["path"])) == v["arrays_sha256"]
        assert hashlib.sha256(Path(v["path"]).read_bytes()).hexdigest() == v["sha256"]
    # After its step the client-wise target never trains again; the class-wise target
    # trains on its retained data (train.retained with its forget set) from then on.
    after_first = trained_nodes(grid.sent[sent_at[2]:])
    assert after_first and all(n != USER_NODE[0] for n, _ in after_first)
    after_second = trained_nodes(grid.sent[sent_at[5] - 0:])
    assert (USER_NODE[2], "train.retained") in after_second
    assert (USER_NODE[1], "train") in after_second
    retained = [m for m in grid.sent[sent_at[4]:] if m.metadata.message_type == "train.retained"
                and int(m.metadata.dst_node_id) == USER_NODE[2]]
    assert retained and list(retained[-1].content["config"]["forget.classes"]) == [1]
    # The audit log: received -> accepted -> honoured, each with round and version.
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    flow = [(e["event"], e["round"], e["version"]) for e in log
            if e["event"] in ("request.received", "request.accepted", "request.honoured")]
    assert flow == [("request.received", 2, 0), ("request.accepted", 2, 0),
                    ("request.honoured", 2, 1), ("request.received", 4, 1),
                    ("request.accepted", 4, 1), ("request.honoured", 4, 2)]
    honoured = [e for e in log if e["event"] == "request.honoured"]
    assert honoured[0]["published_version"] == 1 and honoured[0]["inbox_ids"] == [filed["client"]]
    # The data owner's receipt: version, hash, the node's own check, time from filing.
    last = Inbox(str(inboxes[2])).events(filed["class"])[-1]
    assert last["status"] == "honoured" and last["version"] == 2 and last["round"] == 4
    assert last["model_sha256"] == versions[2]["sha256"]
    check = last["check"]
    assert check["model-arrays-sha256-ok"] is True and check["forget-total"] > 0
    assert 0 <= check["forget-accuracy"] <= 100 and check["retain-loss"] >= 0
    assert last["filed_to_honoured_s"] >= 0
    client_check = Inbox(str(inboxes[0])).events(filed["client"])[-1]["check"]
    assert client_check["retain-total"] == 0 and "retain-accuracy" not in client_check
    assert versions[2]["node_checks"][str(USER_NODE[2])]["forget-total"] == check["forget-total"]
    # What the operator and the data owner read.
    capsys.readouterr()
    assert cli(["versions", str(tmp_path / "state"), "--request", filed["class"]]) == 0
    out = capsys.readouterr().out
    assert "unlearned" in out and f"node {USER_NODE[2]} class [1]" in out and "hash ok" in out
    assert cli(["request", "show", "--inbox", str(inboxes[2]), filed["class"]]) == 0
    out = capsys.readouterr().out
    assert "node's check of version 2: model hash matches" in out and "filed -> honoured" in out


def test_a_killed_service_resumes_from_its_checkpoint_and_serves_once(userapp, tmp_path, user_grid):
    """The ServerApp dies in the middle of an unlearning step; started again on the same
    state directory it resumes: the request is honoured exactly once, round numbers go
    on, the version increases by one."""
    from fedunlearn.inbox import Inbox

    class Killed(BaseException):
        pass

    client_app, task = userapp
    inboxes = {1: tmp_path / "inbox-1"}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=2)
    request_id = {}

    def on_round(rnd, info):
        if rnd == 3:
            request_id["id"] = Inbox(str(inboxes[1])).file(scope="client").id

    real = grid.send_and_receive
    recovery_rounds = []

    def dying(messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages) and request_id and \
                not any(int(m.metadata.dst_node_id) == USER_NODE[1] for m in messages):
            recovery_rounds.append(1)
            if len(recovery_rounds) == 2:  # NoT's second recovery round: the process dies
                raise Killed()
        return real(messages, timeout=timeout)

    grid.send_and_receive = dying
    service = _service(task, tmp_path, rounds=8)
    service.on_round = on_round
    with pytest.raises(Killed):
        service.run(grid, arrays)
    state = json.loads(torch.load(tmp_path / "state" / "checkpoint.pt",
                                  weights_only=True)["state"])
    assert state["round"] == 3 and state["version"] == 0 and len(state["pending"]) == 1

    grid.send_and_receive = real  # a fresh ServerApp on the same federation
    again = _service(task, tmp_path, rounds=8)
    rounds_seen = []
    again.on_round = lambda rnd, info: rounds_seen.append(rnd)
    outcome = again.run(grid, arrays)
    assert outcome.resumed_from == 3 and rounds_seen == [4, 5, 6, 7, 8]
    assert [s["version"] for s in outcome.steps] == [1] and outcome.steps[0]["round"] == 3
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    events = [e["event"] for e in log]
    assert events.count("request.accepted") == 1 and events.count("request.honoured") == 1
    assert events.count("unlearning.started") == 2 and "service.resumed" in events
    assert [e["status"] for e in Inbox(str(inboxes[1])).events(request_id["id"])
            if e["status"] == "honoured"] == ["honoured"]


def departing(grid):
    """A grid whose nodes can leave: a node removed from ``grid.contexts`` is no longer
    connected, and a message to it gets no reply (wraps the in-process grid, which would
    answer for it with Flower's NODE_UNAVAILABLE error reply)."""
    real = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        return [r for m in messages if int(m.metadata.dst_node_id) in grid.contexts
                for r in real([m], timeout=timeout)]

    grid.send_and_receive = send_and_receive
    return grid


def test_a_node_that_drops_out_leaves_the_round_to_the_others_and_is_logged(userapp, tmp_path,
                                                                           caplog, user_grid):
    from fedunlearn import ServiceError

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    gone = {}

    def on_round(rnd, info):
        gone.setdefault(rnd, info)
        if rnd == 2:
            del grid.contexts[USER_NODE[3]]  # the node's machine goes away

    departing(grid)
    service = _service(task, tmp_path, rounds=4, min_replies=3)
    service.on_round = on_round
    caplog.clear()
    outcome = service.run(grid, arrays)
    assert outcome.round == 4
    # One line per round says who took part; Flower's own per-round lines stay out.
    lines = [r.getMessage() for r in caplog.records]
    assert (f"[service] round 3 | v0 | 3/4 nodes (missing [{USER_NODE[3]}]) | train loss"
            in "\n".join(lines))
    assert not [m for m in lines if m.startswith("aggregate_train")]
    assert gone[2]["participants"] == 4 and gone[3]["participants"] == 3
    assert gone[3]["missing"] == [USER_NODE[3]]
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    assert any(e["event"] == "node.departed" and e["node"] == USER_NODE[3] for e in log)

    # With more replies required than nodes answer, the round is retried, then the
    # service stops at its last checkpoint, saying why.
    grid = departing(user_grid(client_app.app))
    strict = _service(task, tmp_path, state="strict", rounds=3, min_replies=4,
                      round_retries=1)
    strict.on_round = lambda rnd, info: grid.contexts.pop(USER_NODE[3], None)
    with pytest.raises(ServiceError, match=r"round 2: fewer than 4 usable replies in 2 "
                                           rf"tries.*missing \[{USER_NODE[3]}\].*round 1"):
        strict.run(grid, arrays)
    log = audit_events(tmp_path / "strict" / "audit.jsonl")
    assert [e["event"] for e in log].count("round.retried") == 1
    assert log[-1]["event"] == "service.failed"
    state = json.loads(torch.load(tmp_path / "strict" / "checkpoint.pt",
                                  weights_only=True)["state"])
    assert state["round"] == 1


def test_a_puf_request_whose_target_left_fails_after_retries_with_the_reason(userapp, tmp_path,
                                                                             user_grid):
    from fedunlearn import PUF, Recovery
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inboxes = {0: tmp_path / "inbox-0"}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=1)
    request_id = Inbox(str(inboxes[0])).file(scope="client").id
    departing(grid)
    real = grid.send_and_receive

    def target_leaves(messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type.startswith("train.") for m in messages):
            grid.contexts.pop(USER_NODE[0], None)  # PUF's round starts: the target's node dies
        return real(messages, timeout=timeout)

    grid.send_and_receive = target_leaves
    service = _service(task, tmp_path, rounds=5, method=PUF(Recovery(rounds=2, lr=0.05)),
                       method_retries=2, retry_after=1, deadline_rounds=3, warn_at=0.5)
    outcome = service.run(grid, arrays)
    assert outcome.round == 5 and not outcome.steps
    (failed,) = outcome.failed
    assert failed["node"] == USER_NODE[0] and failed["attempts"] == 3
    assert str(USER_NODE[0]) in failed["reason"] and "left the federation" in failed["reason"]
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    events = [e["event"] for e in log]
    assert events.count("unlearning.failed") == 3 and events.count("request.failed") == 1
    near = [e for e in log if e["event"] == "request.deadline_near"]
    assert near and near[0]["node"] == USER_NODE[0]
    undelivered = [e for e in log if e["event"] == "receipt.undelivered"]
    assert undelivered and "could not serve" in undelivered[0]["reason_failed"]
    # The node never got to write it: the request is still pending in its inbox.
    assert Inbox(str(inboxes[0])).entry(request_id).status in ("accepted", "sent")


def test_a_forgotten_node_that_reconnects_under_a_new_id_never_trains_again(userapp, tmp_path,
                                                                            user_grid):
    from flwr.app import Context, RecordDict

    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inboxes = {0: tmp_path / "inbox-0"}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(inboxes[0])).file(scope="client")
    mark = {}

    def on_round(rnd, info):
        if rnd == 2:  # partition 0's SuperNode restarts: same data, same inbox, new node id
            old = grid.contexts.pop(USER_NODE[0])
            grid.contexts[999] = Context(run_id=grid.run.run_id, node_id=999,
                                         node_config=old.node_config, state=RecordDict(),
                                         run_config={})
            mark["at"] = len(grid.sent)

    service = _service(task, tmp_path, rounds=5)
    service.on_round = on_round
    outcome = service.run(grid, arrays)
    assert outcome.steps[0]["targets"] == [USER_NODE[0]] and outcome.round == 5
    later = grid.sent[mark["at"]:]
    assert later and all(int(m.metadata.dst_node_id) not in (USER_NODE[0], 999) for m in later)
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    assert any(e["event"] == "node.excluded" and e["node"] == 999 for e in log)


def test_bad_service_settings_and_a_checkpoint_of_another_method_are_refused(userapp,
                                                                             tmp_path, user_grid):
    from fedunlearn import FineTune, Recovery, ServiceConfig, ServiceError

    with pytest.raises(ValueError, match=r"query_every \(run-config service.query-every\)=0"):
        ServiceConfig(query_every=0)
    with pytest.raises(ValueError, match=r"min_replies.*=2.5: expected a count"):
        ServiceConfig(min_replies=2.5)
    with pytest.raises(ValueError, match="no budget"):
        _service(userapp[1], tmp_path, rounds=0)
    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    _service(task, tmp_path, rounds=1).run(grid, arrays)
    other = _service(task, tmp_path, rounds=2, method=FineTune(Recovery(rounds=1)))
    with pytest.raises(ServiceError, match="method 'not'; this one is 'ft'"):
        other.run(grid, arrays)


# -- fedunlearn's own ClientApp, 10 nodes ------------------------------------------------
def test_simulation_serves_two_requests_and_the_served_model_is_close_to_never_seen(tmp_path):
    """10 digits nodes; node 3 files a client-wise request after round 5, node 6 a
    class-wise one after round 12; both are served while training goes on, and node 3's
    final forget accuracy is within FORGET_TOLERANCE of a federation that forgot node 3
    at round 0 (bench/service.py: the same scenario, over seeds)."""
    bench = bench_module("service")
    torch.set_num_threads(1)
    served = bench.scenario(0, tmp_path / "served", rounds=40)
    never = bench.scenario(0, tmp_path / "never", rounds=40, reference=True)
    steps = served["steps"]
    assert [s["round"] for s in steps] == [5, 12] and [s["version"] for s in steps] == [1, 2]
    assert served["outcome"].round == 40
    log = audit_events(tmp_path / "served" / "state" / "audit.jsonl")
    flow = [(e["event"], e["round"], e["version"], e["node"]) for e in log
            if e["event"] in ("request.received", "request.accepted", "request.honoured")]
    node3, node6 = steps[0]["targets"][0], steps[1]["targets"][0]
    assert flow == [("request.received", 5, 0, node3), ("request.accepted", 5, 0, node3),
                    ("request.honoured", 5, 1, node3), ("request.received", 12, 1, node6),
                    ("request.accepted", 12, 1, node6), ("request.honoured", 12, 2, node6)]
    rounds = [e["round"] for e in log if e["event"] == "version.published"]
    assert rounds == [0, 5, 12, 40]
    assert abs(served["forget"] - never["forget"]) <= FORGET_TOLERANCE, (served["forget"],
                                                                         never["forget"])
    assert served["receipts"]["class"]["check"]["model-arrays-sha256-ok"] is True


def test_harness_service_mode_resumes_to_a_larger_round_budget(tmp_path):
    """``fedunlearn-run --engine local service.rounds=N``; run again with a larger
    budget on the same output dir: it resumes (round numbers go on), the request
    honoured in the first run is not served again."""
    out = tmp_path / "out"
    base = [sys.executable, "-m", "fedunlearn.launch", "--engine", "local",
            f'output-dir="{out}"', "pretrain.rounds=2", "unlearn.rounds=1",
            'forget.clients="2"', 'method="not"', "federation.num-clients=4"]
    first = subprocess.run(base + ["service.rounds=3"], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "service.json").read_text())
    assert summary["round"] == 3 and summary["steps"][0]["round"] == 0
    second = subprocess.run(base + ["service.rounds=5"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((out / "service.json").read_text())
    assert summary["resumed_from"] == 3 and summary["round"] == 5
    assert [s["round"] for s in summary["steps"]] == [0]  # served once, in the first run
    text = second.stdout + second.stderr
    assert "[service] round 4 |" in text and "[service] round 1 |" not in text
    log = audit_events(out / "audit.jsonl")
    assert [e["event"] for e in log].count("request.honoured") == 1


@pytest.mark.parametrize("dies_in", ["publish", "audit_steps"])
def test_a_crash_between_publishing_and_recording_neither_skips_nor_repeats(userapp, tmp_path,
                                                                            dies_in, user_grid):
    """The process dies right after an unlearned version is written, or while the step's
    records are made (both before the checkpoint that commits the step): resumed, the
    step runs again; the version numbers have no gap and never name two models (the
    cut-short version is reused when the step gives the same model, else abandoned),
    and the request is honoured once in the audit log and on the receipt."""
    from fedunlearn import read_versions
    from fedunlearn.inbox import Inbox
    from fedunlearn.service import UnlearningService

    class Killed(BaseException):
        pass

    client_app, task = userapp
    inboxes = {2: tmp_path / "inbox-2"}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=1)
    request_id = Inbox(str(inboxes[2])).file(scope="class", classes=[0]).id
    service = _service(task, tmp_path, rounds=3)
    real = getattr(UnlearningService, dies_in)

    def dying(self, *args, **kwargs):
        if dies_in == "audit_steps":  # the step's checkpoint is written, its records not
            raise Killed()
        result = real(self, *args, **kwargs)
        if args[0] == "unlearned":  # the version is written, the checkpoint not
            raise Killed()
        return result

    setattr(service, dies_in, dying.__get__(service))
    with pytest.raises(Killed):
        service.run(grid, arrays)
    outcome = _service(task, tmp_path, rounds=3).run(grid, arrays)
    assert outcome.resumed_from == 0 and len(outcome.steps) == 1
    versions = read_versions(tmp_path / "state")
    assert [v["version"] for v in versions] == list(range(len(versions)))
    kept = [v for v in versions if not v.get("abandoned")]
    assert [v["kind"] for v in kept] == ["start", "unlearned", "final"]
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    published = [(e["published_version"], e["model_sha256"]) for e in log
                 if e["event"] == "version.published"]
    assert published == [(v["version"], v["sha256"]) for v in kept]
    abandoned = [e["published_version"] for e in log if e["event"] == "version.abandoned"]
    assert abandoned == [v["version"] for v in versions if v.get("abandoned")]
    names = [e["event"] for e in log]
    assert names.count("request.honoured") == 1 and names.count("unlearning.finished") == 1
    events = Inbox(str(inboxes[2])).events(request_id)
    assert [e["status"] for e in events].count("honoured") == 1
    assert events[-1]["version"] == outcome.steps[0]["version"] == kept[1]["version"]


def test_stop_and_wall_clock_budgets_and_validation_lines(userapp, tmp_path, caplog, user_grid):
    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    seen = []
    service = _service(task, tmp_path, rounds=0, wall_s=3600.0, validate_every=2)
    service.on_round = lambda rnd, info: seen.append(info)
    service.stop = lambda: len(seen) >= 3
    caplog.clear()
    outcome = service.run(grid, arrays)
    assert outcome.stopped == "stop() asked" and outcome.round == 3
    assert "val_accuracy" not in seen[0] and 0 <= seen[1]["val_accuracy"] <= 100
    assert "| val " in "\n".join(r.getMessage() for r in caplog.records
                                 if r.getMessage().startswith("[service] round 2 |"))
    quick = _service(task, tmp_path, state="quick", rounds=0, wall_s=1e-9)
    assert quick.run(grid, arrays).stopped == "wall-clock budget 1e-09 s spent"


def test_requests_that_cannot_be_served_get_a_rejected_receipt_and_bad_models_are_refused(
        userapp, tmp_path, user_grid):
    from flwr.app import Array, ArrayRecord

    from fedunlearn import ServiceError
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inboxes = {i: tmp_path / f"inbox-{i}" for i in (0, 1)}
    grid = user_grid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(inboxes[0])).file(scope="client")
    Inbox(str(inboxes[1])).file(scope="class", classes=[2])
    later = {}

    def on_round(rnd, info):
        if rnd == 1:  # node 0 was forgotten client-wise, node 1 forgets class 2
            later["forgotten"] = Inbox(str(inboxes[0])).file(scope="class", classes=[1]).id
            later["other"] = Inbox(str(inboxes[1])).file(scope="instance",
                                                         sample_ids=[3]).id

    service = _service(task, tmp_path, rounds=3)
    service.on_round = on_round
    outcome = service.run(grid, arrays)
    assert len(outcome.steps) == 1 and outcome.steps[0]["targets"] == sorted(USER_NODE[:2])
    forgotten = Inbox(str(inboxes[0])).events(later["forgotten"])[-1]
    assert forgotten["status"] == "rejected"
    assert "already forgotten client-wise" in forgotten["reason"]
    other = Inbox(str(inboxes[1])).events(later["other"])[-1]
    assert other["status"] == "rejected" and "an instance-wise request on top" in other["reason"]
    log = audit_events(tmp_path / "state" / "audit.jsonl")
    assert [e["event"] for e in log].count("request.accepted") == 2  # the first two only

    # Arrays of another model are refused before anything is written.
    wrong = ArrayRecord({"w": Array(torch.zeros(3).numpy())})
    fresh = _service(task, tmp_path, state="wrong", rounds=2)
    with pytest.raises(ValueError, match=r"not the model model_fn builds: missing .*unexpected \['w'\]"):
        fresh.run(grid, wrong)
    assert not (tmp_path / "wrong" / "checkpoint.pt").exists()
    # Same names, other shapes: a resume refuses it, and says so in the audit log.
    reshaped = ArrayRecord({k: Array(torch.zeros(2).numpy()) if k == "fc.bias" else v
                            for k, v in arrays.items()})
    again = _service(task, tmp_path, rounds=4)
    again.model_fn = None
    with pytest.raises(ServiceError, match=r"shapes differ for \['fc.bias'\]"):
        again.run(grid, reshaped)
    assert audit_events(tmp_path / "state" / "audit.jsonl")[-1]["event"] == "service.failed"


def test_the_example_app_in_service_mode(tmp_path):
    """examples/quickstart-pytorch-unlearning with ``service-rounds``: the user's FedAvg,
    then the user's ServerApp serves node 0's inbox request in service mode (the
    in-process engine runs the app's own ServerApp and ClientApp)."""
    from fedunlearn import read_versions
    from fedunlearn.engine import run_app

    out = tmp_path / "out"
    torch.set_num_threads(1)
    run_app({"num-server-rounds": 2, "recovery-rounds": 2, "methods": "not",
             "service-rounds": 3, "output-dir": str(out),
             "inbox-root": str(tmp_path / "inboxes")}, 4,
            app=ROOT / "examples" / "quickstart-pytorch-unlearning", run_id=5)
    versions = read_versions(out)
    assert [v["kind"] for v in versions] == ["start", "unlearned", "final"]
    assert versions[1]["round"] == 0 and versions[1]["honours"][0]["scope"] == "client"
    check = next(iter(versions[1]["node_checks"].values()))
    assert check["model-arrays-sha256-ok"] is True and check["forget-total"] > 0
    assert all(0 <= v["metrics"]["test"] <= 100 for v in versions)


def test_the_default_method_is_not(userapp, tmp_path, user_grid):
    from fedunlearn import UnlearningService
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(tmp_path / "i1")).file(scope="client")
    service = UnlearningService(state_dir=tmp_path / "s", model_fn=task.Net,
                                example_input=torch.zeros(1, 1, 8, 8))
    service.config = type(service.config)(rounds=1, lr=0.05)
    outcome = service.run(grid, arrays)
    assert outcome.steps[0]["method"] == "not" and outcome.steps[0]["rounds"] == 11


def test_service_mode_refuses_a_history_method_up_front(tmp_path):
    """A method that replays the training history cannot serve a federation that trains
    on: refused when the service is built and by the run-config check, never after
    accepting requests (issue: service mode that loses nothing, item 8)."""
    from torch import nn

    from fedunlearn import FedEraser, PGD, Recovery, UnlearningService
    from fedunlearn.launch import check_run_config

    for method in (FedEraser(Recovery(), model_fn=lambda: nn.Linear(2, 2)),
                   PGD(Recovery(), model_fn=lambda: nn.Linear(2, 2))):
        with pytest.raises(ValueError, match=rf"method={method.name}: service mode cannot"):
            UnlearningService(method, state_dir=tmp_path / method.name)
    with pytest.raises(ValueError, match="method=federaser: service mode"):
        check_run_config({"method": "federaser", "service.rounds": 3})


def test_a_hostile_receipt_acknowledgement_neither_stops_nor_bloats_the_service(
        userapp, local_grid, tmp_path, capsys):
    """A node's acknowledgement of its honoured receipt is parsed strictly (issue:
    service mode that loses nothing, item 10): a bytes value, a 20,000,000-character
    note, an unknown key and a retain count without its accuracy are left out and
    recorded, the service goes on, and `fedunlearn versions` still lists every version."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedunlearn import read_versions
    from fedunlearn.cli import main as cli
    from fedunlearn.inbox import Inbox
    from fedunlearn.requests import RECEIPT_ACK

    client_app, task = userapp

    def hostile(node, reply):
        if reply.has_error() or RECEIPT_ACK not in reply.content.config_records:
            return reply
        ack = ConfigRecord({"written": 1, "check-model-arrays-sha256-ok": True,
                            "check-forget-accuracy": b"\x00\x01",
                            "check-error": "x" * 20_000_000, "check-owned": 1.0,
                            "check-retain-total": 5})
        return Message(RecordDict({RECEIPT_ACK: ack}), reply_to=_incoming_of(reply))

    inbox = tmp_path / "inbox-0"
    grid = local_grid(client_app.app, 4, {}, {0: {"inbox": str(inbox)}}, run_id=7,
                      arrival="sent", tamper=hostile)
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(inbox)).file(scope="client")
    outcome = _service(task, tmp_path, rounds=3).run(grid, arrays)
    assert outcome.round == 3 and len(outcome.steps) == 1
    versions = read_versions(tmp_path / "state")
    check = next(iter(versions[1]["node_checks"].values()))
    assert check["model-arrays-sha256-ok"] is True and check["retain-total"] == 5
    assert "forget-accuracy" not in check and "owned" not in check
    assert len(check["error"]) == 300
    assert (tmp_path / "state" / "versions.json").stat().st_size < 100_000
    sent = [e for e in audit_events(tmp_path / "state" / "audit.jsonl")
            if e["event"] == "receipt.sent" and e.get("status") == "honoured"]
    assert any("check-forget-accuracy" in p for p in sent[0]["check_refused"])
    assert cli(["versions", str(tmp_path / "state")]) == 0
    assert "retained -%" in capsys.readouterr().out


def _incoming_of(reply):
    """The message a reply answers (enough of it for ``Message(reply_to=...)``)."""
    from flwr.app import Message, Metadata, RecordDict

    md = reply.metadata
    return Message(RecordDict(), metadata=Metadata(
        run_id=md.run_id, message_id=md.reply_to_message_id, src_node_id=md.dst_node_id,
        dst_node_id=md.src_node_id, reply_to_message_id="", group_id=md.group_id,
        created_at=md.created_at, ttl=md.ttl, message_type=md.message_type))


def _served_once(userapp, user_grid, tmp_path):
    """A 2-round service in ``tmp_path/state`` that honoured node 0's client-wise inbox
    request: ``(task, grid, arrays, state dir)``."""
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = tmp_path / "inbox-0"
    grid = user_grid(client_app.app, inboxes={0: inbox})
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(inbox)).file(scope="client")
    _service(task, tmp_path, rounds=2).run(grid, arrays)
    return task, grid, arrays, tmp_path / "state"


def test_a_state_dir_without_its_checkpoint_is_never_silently_started_over(
        userapp, user_grid, tmp_path):
    """A missing or unreadable checkpoint.pt over a state directory with published
    versions is refused, naming the files, and recorded as service.failed (issue:
    service mode that loses nothing, items 1 and 14): the version a receipt names is
    never overwritten and a forgotten node never trains again."""
    from fedunlearn import ServiceError, read_versions

    task, grid, arrays, state = _served_once(userapp, user_grid, tmp_path)
    before = read_versions(state)
    proof = (state / "versions" / "v0001.pt").read_bytes()
    (state / "checkpoint.pt").unlink()
    with pytest.raises(ServiceError, match=r"checkpoint.pt is missing, but .* holds a service's "
                                           r"past \(.*versions.json"):
        _service(task, tmp_path, rounds=4).run(grid, arrays)
    assert read_versions(state) == before
    assert (state / "versions" / "v0001.pt").read_bytes() == proof
    # Temporaries a kill -9 left mid-write are removed when a service starts on the dir.
    stale = [state / ".checkpoint.pt-abc123.tmp", state / "versions" / ".v0002.pt-def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a model")
    (state / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ServiceError, match=r"checkpoint .*checkpoint.pt cannot be read"):
        _service(task, tmp_path, rounds=4).run(grid, arrays)
    assert not any(path.exists() for path in stale)
    events = [e["event"] for e in audit_events(state / "audit.jsonl")]
    assert events.count("service.failed") == 2 and events.count("service.started") == 1


def test_rebuild_goes_on_from_the_last_good_version_and_names_what_is_lost(
        userapp, user_grid, tmp_path):
    """UnlearningService(rebuild=True) over a state directory whose checkpoint is gone or
    unreadable (issue: service mode that loses nothing, item 1): it goes on from the last
    version whose file matches its hashes (a later one that does not is skipped), the
    version a receipt names is never overwritten, the forgotten node never trains again,
    its request is not served twice, and service.rebuilt names what was lost."""
    from fedunlearn import ServiceError, read_versions
    from fedunlearn.audit import read_audit
    from fedunlearn.inbox import Inbox

    task, grid, arrays, state = _served_once(userapp, user_grid, tmp_path)
    before = read_versions(state)
    (unlearned,) = [v for v in before if v["kind"] == "unlearned"]
    last = before[-1]
    assert last["version"] > unlearned["version"] and not last["honours"]
    proof = Path(unlearned["path"]).read_bytes()
    Path(last["path"]).write_bytes(b"not the model")  # a proof gone bad, honouring nothing
    (state / "checkpoint.pt").write_bytes(b"\x00garbage")
    grid.sent.clear()
    outcome = _service(task, tmp_path, rounds=5, rebuild=True).run(grid, arrays)
    assert outcome.resumed_from == unlearned["round"] and outcome.round == 5
    (rebuilt,) = [e for e in audit_events(state / "audit.jsonl")
                  if e["event"] == "service.rebuilt"]
    assert rebuilt["from_version"] == unlearned["version"]
    assert rebuilt["versions_skipped"] == [last["version"]]
    assert rebuilt["rounds_lost"] == 2 - unlearned["round"] and rebuilt["lost_requests"] == []
    assert "unreadable" in rebuilt["reason"]
    assert list(state.glob("checkpoint.pt.unreadable-*"))  # kept aside, not overwritten
    assert Path(unlearned["path"]).read_bytes() == proof
    after = read_versions(state)
    assert after[:unlearned["version"] + 1] == before[:unlearned["version"] + 1]
    assert any(v["version"] == last["version"] and v.get("abandoned") for v in after)
    forgotten = grid.node_id(0)
    assert all(n != forgotten for n, _ in trained_nodes(grid.sent))
    assert [e["event"] for e in audit_events(state / "audit.jsonl")].count(
        "request.honoured") == 1
    (entry,) = Inbox(str(tmp_path / "inbox-0")).entries()[0]
    assert [e["status"] for e in entry.events].count("honoured") == 1
    assert read_audit(state / "audit.jsonl").intact
    # A version that honours a request cannot be given up: refused, naming it.
    (state / "checkpoint.pt").unlink()
    Path(unlearned["path"]).write_bytes(b"gone")
    with pytest.raises(ServiceError, match=rf"cannot be rebuilt past version "
                                           rf"{after[-1]['version']}|version "
                                           rf"{unlearned['version']}'s file"):
        _service(task, tmp_path, rounds=6, rebuild=True).run(grid, arrays)


def test_a_resume_finds_a_missing_or_changed_proof_and_unreadable_versions(
        userapp, user_grid, tmp_path):
    """At resume every published version is still listed and its file still holds the
    model its receipts name (issue: service mode that loses nothing, item 14): a
    changed or removed version file, or a truncated versions.json, stops the service
    naming the file (service.failed), instead of a raw JSONDecodeError or nothing."""
    import shutil

    from fedunlearn import ServiceError

    task, grid, arrays, state = _served_once(userapp, user_grid, tmp_path)
    saved = tmp_path / "saved"
    shutil.copytree(state, saved)
    v1 = state / "versions" / "v0001.pt"
    v1.write_bytes((state / "versions" / "v0000.pt").read_bytes())  # another model
    with pytest.raises(ServiceError, match=r"version 1's file .*v0001.pt no longer holds"):
        _service(task, tmp_path, rounds=3).run(grid, arrays)
    v1.unlink()
    with pytest.raises(ServiceError, match=r"version 1's file .*v0001.pt cannot be read"):
        _service(task, tmp_path, rounds=3).run(grid, arrays)
    shutil.copy(saved / "versions" / "v0001.pt", v1)
    (state / "versions.json").write_text('{"versions": [{"ver')
    with pytest.raises(ServiceError, match=r"versions.json cannot be read"):
        _service(task, tmp_path, rounds=3).run(grid, arrays)
    shutil.copy(saved / "versions.json", state / "versions.json")
    outcome = _service(task, tmp_path, rounds=3).run(grid, arrays)  # all restored: resumes
    assert outcome.resumed_from == 2 and outcome.round == 3
    events = [e["event"] for e in audit_events(state / "audit.jsonl")]
    assert events.count("service.failed") == 3


def test_a_withdrawal_reaches_the_service_before_the_step_that_would_serve_it(
        userapp, user_grid, tmp_path):
    """A request accepted by the service and withdrawn by its data owner while it waits
    (here: for a retry) is dropped at the next query, never served (issue: service mode
    that loses nothing, item 5): no unlearned version, `request.withdrawn` in the audit
    log, the node trains on, and the data owner's receipt stays `withdrawn`."""
    from fedunlearn import FineTune, Recovery, UnlearningFailed, read_versions
    from fedunlearn.inbox import Inbox

    class FailsOnce(FineTune):
        name = "fails_once"
        calls = 0

        def unlearning_step(self, grid, arrays):
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise UnlearningFailed("not this time")
            return arrays

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-0"))
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    arrays = fedavg(grid, task, rounds=1)
    filed = inbox.file(scope="client")
    service = _service(task, tmp_path, method=FailsOnce(Recovery(rounds=1)), rounds=5,
                       query_every=1, method_retries=2, retry_after=2)

    def on_round(rnd, info):
        if rnd == 1:  # the first attempt failed at round 0; a retry is due at round 2
            inbox.withdraw(filed.id)

    service.on_round = on_round
    outcome = service.run(grid, arrays)
    assert outcome.steps == [] and outcome.pending == []
    assert [v["kind"] for v in read_versions(tmp_path / "state")] == ["start", "final"]
    events = audit_events(tmp_path / "state" / "audit.jsonl")
    withdrawn = [e for e in events if e["event"] == "request.withdrawn"]
    assert [e["inbox_ids"] for e in withdrawn] == [[filed.id]]
    assert not any(e["event"] == "request.honoured" for e in events)
    assert inbox.entry(filed.id).status == "withdrawn"
    last_round = [m for m in grid.sent if m.metadata.message_type.startswith("train")][-4:]
    assert USER_NODE[0] in {int(m.metadata.dst_node_id) for m in last_round}


class _LosesFirstHonouredReceipt:
    """The user's grid, but the first ``status`` receipt never reaches its node (a
    transient error answers for it)."""

    def __init__(self, inner, status="honoured"):
        self.inner, self.lost, self.status = inner, 0, status

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        from fedunlearn.requests import RECEIPT_RECORD

        keep, lost = [], []
        for m in messages:
            receipt = m.content.config_records.get(RECEIPT_RECORD)
            if not self.lost and receipt is not None and receipt.get("status") == self.status:
                self.lost += 1
                lost.append(m)
            else:
                keep.append(m)
        replies = list(self.inner.send_and_receive(keep, timeout=timeout)) if keep else []
        return replies + [Message(Error(code=0, reason="transient: connection reset"),
                                  reply_to=_as_sent(m)) for m in lost]


def _as_sent(msg):
    from flwr.app import Message, Metadata

    import time as _time
    return Message(msg.content, metadata=Metadata(
        run_id=7, message_id=f"lost-{id(msg)}", src_node_id=0,
        dst_node_id=int(msg.metadata.dst_node_id), reply_to_message_id="", group_id="",
        created_at=_time.time(), ttl=3600, message_type=msg.metadata.message_type))


def test_a_verdict_that_missed_its_node_is_sent_again_when_the_node_asks_again(
        userapp, user_grid, tmp_path):
    """A final verdict that fails to reach its node once is not lost (issue: service mode
    that loses nothing, item 4): the node, still waiting, sends the request again at the
    next query and gets the honoured receipt then; exactly one honoured event."""
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-0"))
    inner = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    arrays = fedavg(inner, task, rounds=1)
    filed = inbox.file(scope="client")
    grid = _LosesFirstHonouredReceipt(inner)
    outcome = _service(task, tmp_path, rounds=4, query_every=1).run(grid, arrays)
    assert grid.lost == 1 and len(outcome.steps) == 1
    statuses = [e["status"] for e in inbox.entry(filed.id).events]
    assert statuses.count("honoured") == 1 and inbox.entry(filed.id).status == "honoured"
    events = audit_events(tmp_path / "state" / "audit.jsonl")
    assert any(e["event"] == "receipt.undelivered" for e in events)
    sent = [e for e in events if e["event"] == "receipt.sent" and e.get("status") == "honoured"]
    assert len(sent) == 1 and sent[0]["written"] == 1


def test_a_rejection_that_missed_its_node_is_sent_again_when_the_node_asks_again(
        userapp, user_grid, tmp_path):
    """Item 4 for rejections: the node never got its `rejected` receipt, so it sends the
    request again at the next query; the service answers with the same rejection
    (exactly one rejected event on the data owner's receipt), never silence."""
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "inbox-0"))
    inner = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    arrays = fedavg(inner, task, rounds=1)
    filed = inbox.file(scope="class", classes=[9])  # the user's task has fewer classes
    grid = _LosesFirstHonouredReceipt(inner, status="rejected")
    outcome = _service(task, tmp_path, rounds=3, query_every=1).run(grid, arrays)
    assert grid.lost == 1 and not outcome.steps
    entry = inbox.entry(filed.id)
    assert entry.status == "rejected"
    assert [e["status"] for e in entry.events].count("rejected") == 1


def test_a_rejected_node_config_request_is_rejected_once_not_at_every_query(
        userapp, local_grid, tmp_path):
    """Item 16: a node-config request (no inbox, so no receipt) that the service rejects
    is not re-received and re-rejected at every query while the node's config stays."""
    from tests.test_plugin import USER_RUN_ID

    client_app, task = userapp
    grid = local_grid(client_app.app, 4, {}, {1: {"forget-scope": "class",
                                                   "forget-classes": "9"}},
                      run_id=USER_RUN_ID, arrival="sent")
    arrays = fedavg(grid, task, rounds=1)
    outcome = _service(task, tmp_path, rounds=4, query_every=1).run(grid, arrays)
    assert not outcome.steps
    events = audit_events(tmp_path / "state" / "audit.jsonl")
    rejected = [e for e in events if e["event"] == "request.rejected"]
    assert len(rejected) == 1 and rejected[0]["node"] == USER_NODE[1]

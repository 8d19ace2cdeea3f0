"""The in-process engine (:mod:`fedunlearn.engine`): a Flower Grid that delivers every
message to the real ClientApp handlers in this process, as Flower's simulation would
(its identical results to ``flwr run`` are checked in test_simulation.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

import fedunlearn.launch as launch
from fedunlearn.engine import LocalGrid, _server_identity


def _echo_app():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        calls = int(context.state.config_records.get("seen", ConfigRecord({"n": 0}))["n"]) + 1
        context.state.config_records["seen"] = ConfigRecord({"n": calls})
        arrays = msg.content["arrays"]
        arrays["w"] = Array(arrays["w"].numpy() + 1)  # a handler that mutates its input
        if msg.content["config"].get("boom", False):
            raise RuntimeError("the handler failed")
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({
            "calls": calls, "partition": int(context.node_config["partition-id"]),
            "src": int(msg.metadata.src_node_id)})}), reply_to=msg)

    return app


def test_messages_reach_each_nodes_handler_with_its_own_context():
    grid = LocalGrid(_echo_app(), 3, {"seed": 0}, node_configs={1: {"inbox": "/x"}},
                     run_id=42)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and all(n > 1 for n in nodes)
    assert list(LocalGrid(_echo_app(), 3, {}, run_id=42).get_node_ids()) == nodes
    weights = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    with _server_identity(42):
        for _ in range(2):
            messages = [Message(RecordDict({"arrays": weights, "config": ConfigRecord()}),
                                dst_node_id=n, message_type="train") for n in nodes]
            replies = list(grid.send_and_receive(messages))
    assert [int(r.metadata.src_node_id) for r in replies] == nodes
    metrics = [r.content["metrics"] for r in replies]
    assert [m["partition"] for m in metrics] == [0, 1, 2]
    assert {m["calls"] for m in metrics} == {2}  # node state kept across messages
    assert {m["src"] for m in metrics} == {1}  # from the SuperLink, as in Flower
    assert all(r.metadata.reply_to_message_id == m.metadata.message_id
               for r, m in zip(replies, messages))
    # No node touched the server's model (each got its own copy).
    assert weights["w"].numpy().tolist() == [0.0, 0.0]
    assert grid.contexts[nodes[1]].node_config == {"partition-id": 1, "num-partitions": 3,
                                                   "inbox": "/x"}
    assert grid.messages_delivered == 6


def test_a_raising_handler_and_an_unknown_node_get_error_replies():
    grid = LocalGrid(_echo_app(), 2, {}, run_id=7)
    node = list(grid.get_node_ids())[0]
    weights = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    with _server_identity(7):
        boom = Message(RecordDict({"arrays": weights, "config": ConfigRecord({"boom": True})}),
                       dst_node_id=node, message_type="train")
        gone = Message(RecordDict({"arrays": weights, "config": ConfigRecord()}),
                       dst_node_id=123, message_type="train")
        raised, missing = grid.send_and_receive([boom, gone])
    assert raised.has_error() and raised.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "RuntimeError: the handler failed" in raised.error.reason
    assert missing.has_error() and missing.error.code == ErrorCode.NODE_UNAVAILABLE


def test_bad_engine_arguments_are_refused():
    with pytest.raises(ValueError, match="num_nodes=0"):
        LocalGrid(_echo_app(), 0, {})
    with pytest.raises(ValueError, match=r"partitions \[5\] outside 0..1"):
        LocalGrid(_echo_app(), 2, {}, node_configs={5: {}})


def test_fedunlearn_run_on_the_local_engine(tmp_path, monkeypatch, capsys):
    """``fedunlearn-run --engine local``: the harness job in this process, no Flower
    process started; its results and its closing table as under ``flwr run``."""
    monkeypatch.setattr(launch, "flwr_run", lambda *a, **k: pytest.fail("started flwr run"))
    out = tmp_path / "out"
    rc = launch.main(["--engine", "local", "method=ft", "dataset.name=synthetic",
                      "federation.num-clients=4", "pretrain.rounds=2", "unlearn.rounds=1",
                      f"output-dir={out}", f"checkpoint-dir={tmp_path / 'ck'}",
                      "eval.mia-max-members=40"])
    assert rc == 0
    res = json.loads((out / "ft" / "results.json").read_text())
    assert res["method"] == "ft" and res["cost"]["rounds"] == 1
    assert res["request"][0]["partition_id"] == 0
    shown = capsys.readouterr().out
    assert "fedunlearn results" in shown and "Results written to" in shown
    # One screen: no per-round lines (the progress display has them), everything in the
    # job's log file, without colour codes.
    assert len(shown.splitlines()) < 40, shown
    assert "aggregate_train" not in shown and "fedunlearn-progress" not in shown
    log = (out / "job.log").read_text()
    assert "aggregate_train: Received" in log and "[pretrain] round 2/2" in log
    assert "\x1b[" not in log


def test_a_failing_job_on_the_local_engine_exits_1(tmp_path, capsys):
    """A ServerApp that raises: exit code 1, the traceback in the log (as flwr run)."""
    rc = launch.main(["--engine", "local", "method=puf", "dataset.name=synthetic",
                      "federation.num-clients=2", "pretrain.rounds=1", "unlearn.rounds=1",
                      "forget.clients=0,1", f"output-dir={tmp_path / 'out'}",
                      f"checkpoint-dir={tmp_path / 'ck'}", "eval.mia-max-members=40"])
    assert rc == 1
    shown = capsys.readouterr().out
    assert "The ServerApp raised" in shown and "method(s) failed: puf" in shown

"""Failures say so (issue 29, item 5): serve() on a Flower user's own app raises
ServeError when no node could answer its query or no method honoured the requests, says
what a target could not measure, and reports a recovery that diverged as degraded, never
as a silent ``honoured``. The user's apps (tests/test_plugin.py's package and
examples/quickstart-pytorch-unlearning) are imported from outside fedunlearn."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from .test_plugin import USER_NODE, fedavg, user_grid, userapp  # noqa: F401  (fixtures)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart-pytorch-unlearning"

UNMOUNTED_CLIENT = '''
from flwr.clientapp import ClientApp

from fedunlearn.client import attach
from userapp.client_app import train_fn
from userapp.task import Net, train

app = ClientApp()
app.train()(train_fn)  # the user's own training reads its data itself


def unmounted(context):
    """The data folder fedunlearn is given is not mounted on this node."""
    raise FileNotFoundError(f"/mnt/node-{context.node_id}/data is not mounted")


attach(app, model_fn=Net, data=unmounted, train_fn=train)
'''

USER_SERVER = '''
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedunlearn import NoT, Recovery, serve
from userapp.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    arrays = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid, ArrayRecord(Net().state_dict()), num_rounds=1,
        train_config=ConfigRecord({"lr": 0.05})).arrays
    outcome = serve(grid, arrays, NoT(Recovery(rounds=1), model_fn=Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=context.run_config["output-dir"])
    print(outcome.table())
'''


def audit_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def unmounted_app(tmp_path):
    import importlib

    (tmp_path / "userapp" / "unmounted.py").write_text(UNMOUNTED_CLIENT)
    return importlib.import_module("userapp.unmounted").app


def test_every_node_failing_the_query_raises_naming_each_node(userapp, user_grid, tmp_path):
    from fedunlearn import NoT, Recovery, ServeError, serve

    _, task = userapp
    grid = user_grid(unmounted_app(tmp_path), num_nodes=3)
    arrays = fedavg(grid, task, rounds=1)  # the user's own training still works
    out = tmp_path / "out"
    with pytest.raises(ServeError, match="none of the 3 node") as raised:
        serve(grid, arrays, NoT(Recovery(rounds=1), model_fn=task.Net,
                                example_input=torch.zeros(1, 1, 8, 8)), output_dir=out)
    message = str(raised.value)
    for node in USER_NODE[:3]:
        assert f"node {node}: FileNotFoundError: /mnt/node-{node}/data is not mounted" in message
    outcome = raised.value.outcome
    assert sorted(outcome.report["unanswered"]) == sorted(USER_NODE[:3])
    assert outcome.methods == {} and outcome.arrays is arrays
    (failed,) = [e for e in audit_events(out) if e["event"] == "serve.failed"]
    assert "ServeError" in failed["error"] and str(USER_NODE[0]) in failed["error"]


def test_a_user_server_app_that_lets_it_propagate_fails_the_run(userapp, tmp_path):
    """Under the in-process engine as under `flwr run`, the exception ends the
    ServerApp with an error (Flower: exit code 201, run finished:failed)."""
    from fedunlearn.engine import local_run

    unmounted_app(tmp_path)
    (tmp_path / "userapp" / "server_app.py").write_text(USER_SERVER)
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent('''
        [tool.flwr.app.components]
        serverapp = "userapp.server_app:app"
        clientapp = "userapp.unmounted:app"
        [tool.flwr.app.config]
        output-dir = ""
    '''))
    log = tmp_path / "run.log"
    rc = local_run({"output-dir": str(tmp_path / "out")}, num_supernodes=2, app=tmp_path,
                   log_file=log, echo=False)
    text = log.read_text()
    assert rc == 1, text[-2000:]
    assert "ServeError: serve(): none of the 2 node(s) could answer" in text
    assert "is not mounted" in text


def test_nodes_that_answer_without_a_request_are_a_normal_outcome(userapp, user_grid,
                                                                  tmp_path, caplog):
    from fedunlearn import FineTune, Recovery, serve

    client_app, task = userapp
    grid = user_grid(client_app.app)
    arrays = fedavg(grid, task, rounds=1)
    with caplog.at_level(logging.INFO, logger="flwr"):
        outcome = serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "o")
    assert outcome.methods == {} and outcome.arrays is arrays
    assert outcome.report["unanswered"] == {} and len(outcome.report["nodes"]) == 4
    assert "4 node(s) answered, none filed a request" in caplog.text


def test_every_method_failing_raises_naming_each_method(userapp, user_grid, tmp_path):
    from fedunlearn import FineTune, PGD, Recovery, ServeError, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "i1"))
    filed = inbox.file(scope="client").id
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=1)
    real = client_app.app._registered_funcs["train.default"]

    def out_of_memory(msg, context):  # every retained node's training breaks
        raise RuntimeError("CUDA out of memory")

    client_app.app._registered_funcs["train.default"] = out_of_memory
    out = tmp_path / "out"
    with pytest.raises(ServeError, match="no method honoured") as raised:
        serve(grid, arrays, [FineTune(Recovery(rounds=1)),
                             PGD(Recovery(rounds=1), model_fn=task.Net)],
              output_dir=out)
    client_app.app._registered_funcs["train.default"] = real
    message = str(raised.value)
    assert "ft failed: " in message and "CUDA out of memory" in message
    assert "pgd refused: " in message and "HistoryKeeper" in message
    outcome = raised.value.outcome
    assert outcome.arrays is arrays  # the input model, said to be unchanged
    assert {m: o.status for m, o in outcome.methods.items()} == {"ft": "failed",
                                                                 "pgd": "refused"}
    # Everything was written before it was raised.
    for method in ("ft", "pgd"):
        assert json.loads((out / method / "failed.json").read_text())["status"] in (
            "failed", "refused")
    events = [e["event"] for e in audit_events(out)]
    assert "request.failed" in events and events[-1] == "serve.failed"
    assert inbox.entry(filed).status == "failed"  # pending: the next job asks again


def test_a_target_that_cannot_measure_is_said_on_the_outcome_and_receipt(userapp, user_grid,
                                                                         tmp_path):
    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "i1"))
    filed = inbox.file(scope="class", classes=[2]).id
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=1)
    real = client_app.app._registered_funcs["evaluate.unlearn"]

    def crashes(msg, context):
        raise RuntimeError("the node's evaluation crashed")

    client_app.app._registered_funcs["evaluate.unlearn"] = crashes
    out = tmp_path / "out"
    outcome = serve(grid, arrays, FineTune(Recovery(rounds=1, lr=0.05)), output_dir=out)
    client_app.app._registered_funcs["evaluate.unlearn"] = real
    m = outcome.methods["ft"]
    why = f"node {USER_NODE[1]}: RuntimeError: the node's evaluation crashed"
    assert m.status == "honoured" and m.unmeasured == {"forget": why, "retain": why}
    assert "ft: forget accuracy not measured (" + why in outcome.table()
    saved = json.loads((out / "ft" / "results.json").read_text())
    assert saved["unmeasured"]["forget"] == why
    honoured = [e for e in audit_events(out) if e["event"] == "request.honoured"]
    assert honoured[0]["unmeasured"]["forget"] == why
    receipt = inbox.events(filed)[-1]
    assert receipt["status"] == "honoured" and why in receipt["unmeasured"]


def test_a_diverging_recovery_is_degraded_and_never_handed_on(local_grid, server_identity,
                                                              single_thread, tmp_path,
                                                              monkeypatch):
    """The example's digits app: Recovery(lr=1.0) drives NoT to chance (about 7 %
    test) from a model at about 70 %, while FT at lr 0.05 recovers. NoT is degraded on
    the table, the outcome, results.json, the audit log and the receipt; the outcome's
    model is FT's."""
    from fedunlearn import FineTune, NoT, Recovery, ServeError, load_model, serve
    from fedunlearn.audit import model_digest
    from fedunlearn.inbox import Inbox

    monkeypatch.syspath_prepend(str(EXAMPLE))
    from unlearningexample.client_app import app
    from unlearningexample.server_app import evaluate
    from unlearningexample.task import Net

    rc = {"local-epochs": 1, "inbox-root": str(tmp_path / "inboxes"), "forget-partition": 0,
          "forget-scope": "class", "forget-classes": "3"}
    grid = local_grid(app, 3, rc, arrival="sent")
    torch.manual_seed(0)
    arrays = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid, ArrayRecord(Net().state_dict()), num_rounds=5,
        train_config=ConfigRecord({"lr": 0.05})).arrays
    before = evaluate(arrays)["test"]
    out = tmp_path / "out"
    not_ = NoT(Recovery(rounds=3, lr=1.0), model_fn=Net, example_input=torch.zeros(1, 1, 8, 8))
    outcome = serve(grid, arrays, [not_, FineTune(Recovery(rounds=3, lr=0.05))],
                    output_dir=out, evaluate_fn=evaluate)
    print(outcome.table())
    m, ft = outcome.methods["not"], outcome.methods["ft"]
    assert outcome.report["input_metrics"]["test"] == pytest.approx(before)
    assert m.status == "degraded" and m.metrics["test"] < before - 20
    assert f"input model's {before:.2f}%" in m.reason and "lower Recovery(lr=...)" in m.reason
    assert ft.status == "honoured"
    assert model_digest(outcome.arrays) == ft.model_arrays_sha256  # never NoT's model
    assert model_digest(load_model(m.model_path)) == m.model_arrays_sha256  # kept for inspection
    table = outcome.table()
    assert "not        degraded" in table and "not degraded: test accuracy" in table
    assert json.loads((out / "not" / "results.json").read_text())["status"] == "degraded"
    events = audit_events(out)
    (degraded,) = [e for e in events if e["event"] == "unlearning.degraded"]
    assert degraded["method"] == "not" and degraded["model_sha256"] == m.model_sha256
    assert any(e["event"] == "request.failed" and e["reason"].startswith("degraded: ")
               for e in events)
    inbox = Inbox(str(tmp_path / "inboxes" / f"inbox-{grid.run.run_id}-0"))
    (entry,) = inbox.entries()[0]
    statuses = [(e["status"], e.get("method")) for e in entry.events]
    assert ("failed", "not") in statuses and statuses[-1] == ("honoured", "ft")
    failed = next(e for e in entry.events if e["status"] == "failed")
    assert "degraded" in failed["reason"] and failed["model_sha256"] == m.model_sha256
    # NoT alone (a new request on the same nodes): nothing honoured it, so serve()
    # raises, naming why.
    grid = local_grid(app, 3, dict(rc, **{"inbox-root": str(tmp_path / "again")}),
                      arrival="sent")
    with pytest.raises(ServeError, match="not degraded: test accuracy") as raised:
        serve(grid, arrays, not_, output_dir=tmp_path / "alone", evaluate_fn=evaluate)
    assert model_digest(raised.value.outcome.arrays) == model_digest(arrays)


def test_a_model_gone_non_finite_is_degraded_and_a_bad_threshold_is_refused(
        userapp, user_grid, tmp_path):
    import numpy as np
    from flwr.app import Message, MetricRecord, RecordDict

    from fedunlearn import FineTune, Recovery, ServeError, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    Inbox(str(tmp_path / "i0")).file(scope="client")
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "i0"})
    arrays = fedavg(grid, task, rounds=1)
    with pytest.raises(ValueError, match=r"max_accuracy_drop=-5: expected accuracy points "
                                         r"in \[0, 100\], or None"):
        serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "x",
              max_accuracy_drop=-5)
    assert not (tmp_path / "x").exists()  # refused before anything was asked
    real = client_app.app._registered_funcs["train.default"]

    def blows_up(msg, context):  # a finite loss, but the weights overflowed
        reply = real(msg, context)
        state = reply.content["arrays"].to_torch_state_dict()
        state = {k: v * float("inf") for k, v in state.items()}
        return Message(RecordDict({"arrays": ArrayRecord(state),
                                   "metrics": MetricRecord({"train_loss": 0.5,
                                                            "num-examples": 48})}),
                       reply_to=msg)

    client_app.app._registered_funcs["train.default"] = blows_up
    # Non-finite train replies are never aggregated: with none left, the method fails.
    with pytest.raises(ServeError, match=r"ft failed: .*expected finite values"):
        serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "o")
    client_app.app._registered_funcs["train.default"] = real

    class Overflows(FineTune):  # a method of the user's own whose model overflowed
        name = "overflows"

        def unlearning_step(self, grid, arrays):
            state = arrays.to_torch_state_dict()
            return ArrayRecord({k: v * float("inf") for k, v in state.items()})

    with pytest.raises(ServeError, match=r"overflows degraded: the unlearned model holds "
                                         r"non-finite values \(NaN/inf\)") as raised:
        serve(grid, arrays, Overflows(Recovery(rounds=0)), output_dir=tmp_path / "o2",
              max_accuracy_drop=None)
    m = raised.value.outcome.methods["overflows"]
    assert m.status == "degraded"
    assert not all(np.isfinite(a.numpy()).all() for a in m.arrays.values())

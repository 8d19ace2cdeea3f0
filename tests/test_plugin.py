"""fedunlearn as a plugin: a Flower user's own app (their Net, data, train loop, ClientApp
handlers and FedAvg) adds unlearning through the public API only. The user's package is
written to a temp dir outside fedunlearn and imported from there."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import textwrap

import pytest
from flwr.app import Message, RecordDict

from .helpers import node_ids

USER_TASK = '''
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


class Blobs(Dataset):
    """Four classes of 8x8 images, each a bright quadrant plus noise."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 4, size=n)
        x = rng.normal(0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
        for i, c in enumerate(self.y):
            r, q = divmod(int(c), 2)
            x[i, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 1.5
        self.x = torch.from_numpy(x)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load_data(partition_id):
    return Blobs(48, seed=100 + partition_id), Blobs(16, seed=200 + partition_id)


def train(net, trainloader, epochs, lr, device):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach())
    return total / max(1, len(trainloader) * epochs)


def test(net, dataset):
    net.eval()
    with torch.no_grad():
        pred = net(dataset.x).argmax(1).numpy()
    return 100.0 * float((pred == dataset.y).mean())
'''

USER_CLIENT = '''
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from fedunlearn.client import attach
from userapp.task import Net, load_data, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    """Flower quickstart's handler, unchanged: its own metric names."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainset, _ = load_data(context.node_config["partition-id"])
    loss = train(model, DataLoader(trainset, batch_size=16, shuffle=True), 1,
                 msg.content["config"]["lr"], "cpu")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss,
                                                   "num-examples": len(trainset)})})
    return Message(content=content, reply_to=msg)


attach(app, model_fn=Net, data=lambda ctx: load_data(ctx.node_config["partition-id"]),
       train_fn=train)
'''


@pytest.fixture()
def userapp(tmp_path, monkeypatch, server_identity, single_thread):
    pkg = tmp_path / "userapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(USER_TASK)
    (pkg / "client_app.py").write_text(USER_CLIENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("userapp")]:
        del sys.modules[name]
    return importlib.import_module("userapp.client_app"), importlib.import_module("userapp.task")


USER_RUN_ID = 7
USER_NODE = node_ids(4, USER_RUN_ID)
"""``USER_NODE[p]``: the node holding partition ``p`` on the user's grid."""


@pytest.fixture()
def user_grid(local_grid):
    """The user's federation in one process: ``user_grid(app, num_nodes=4, inboxes=None)``
    is the in-process grid (``local_grid``) on which every message reaches the user's
    ClientApp with that node's Context (node-config ``partition-id``, ``inbox`` where
    ``inboxes`` names one; state kept across messages); replies in send order."""

    def make(app, num_nodes=4, inboxes=None):
        node_configs = {p: {"inbox": str(path)} for p, path in (inboxes or {}).items()}
        return local_grid(app, num_nodes, {}, node_configs, run_id=USER_RUN_ID,
                          arrival="sent")

    return make


def fedavg(grid, task, rounds=3):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    import torch
    torch.manual_seed(0)
    result = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid, ArrayRecord(task.Net().state_dict()), num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.05}))
    return result.arrays


def file_request(tmp_path, node, **fields):
    from fedunlearn.inbox import Inbox

    inbox = Inbox(str(tmp_path / f"inbox-{node}"))
    return inbox, inbox.file(**fields)


def test_user_app_serves_client_and_class_wise_requests(userapp, tmp_path, user_grid):
    from fedunlearn import FineTune, NoT, PUF, Recovery, load_model, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox0 = Inbox(str(tmp_path / "inbox-0"))
    request_id = inbox0.file(scope="client").id
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "inbox-0"})
    arrays = fedavg(grid, task)
    testset = task.Blobs(64, seed=999)

    def evaluate(a):
        net = task.Net()
        net.load_state_dict(a.to_torch_state_dict())
        return {"test": task.test(net, testset)}

    recovery = Recovery(rounds=2, server_momentum=0.0, lr=0.05)
    out = tmp_path / "out"
    before = len(grid.sent)
    outcome = serve(grid, arrays, [NoT(recovery, model_fn=task.Net,
                                       example_input=__import__("torch").zeros(1, 1, 8, 8)),
                                   FineTune(recovery), PUF(recovery)],
                    output_dir=out, evaluate_fn=evaluate)
    print(outcome.table())
    assert outcome.report["accepted"][0]["node_id"] == USER_NODE[0]
    for name in ("not", "ft", "puf"):
        m = outcome.methods[name]
        assert m.status == "honoured", m.reason
        assert m.metrics["test"] > 50.0 and 0.0 <= m.metrics["forget"] <= 100.0
        saved = load_model(m.model_path)
        from fedunlearn.audit import model_digest
        assert model_digest(saved) == m.model_arrays_sha256
        assert hashlib.sha256(open(m.model_path, "rb").read()).hexdigest() == m.model_sha256
        assert json.loads((out / name / "results.json").read_text())["model_sha256"] == m.model_sha256
    # Client-wise: the target never trained in recovery; retained nodes ran the user's
    # own train handler (plain "train", quickstart metric names).
    train_msgs = [m for m in grid.sent[before:] if m.metadata.message_type == "train"]
    assert train_msgs and all(int(m.metadata.dst_node_id) != USER_NODE[0] for m in train_msgs)
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert "request.accepted" in events and events.count("unlearning.finished") == 3
    history = Inbox(str(tmp_path / "inbox-0")).events(request_id)
    assert [e["status"] for e in history][-1] == "honoured"


def test_class_wise_request_trains_on_retained_data_and_bad_ids_are_rejected(userapp, tmp_path,
                                                                             user_grid):
    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.inbox import Inbox
    import torch

    client_app, task = userapp
    Inbox(str(tmp_path / "i1")).file(scope="class", classes=[2])
    bad = Inbox(str(tmp_path / "i2")).file(scope="instance", sample_ids=[5, 4000]).id
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1", 2: tmp_path / "i2"})
    arrays = fedavg(grid, task, rounds=2)
    before = len(grid.sent)
    outcome = serve(grid, arrays, NoT(Recovery(rounds=2, lr=0.05), model_fn=task.Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=tmp_path / "out")
    assert [a["node_id"] for a in outcome.report["accepted"]] == [USER_NODE[1]]
    assert outcome.report["accepted"][0]["classes"] == [2]
    (rej,) = outcome.report["rejected"]
    assert rej["node_id"] == USER_NODE[2] and "4000" in rej["reason"]
    status = Inbox(str(tmp_path / "i2")).events(bad)[-1]
    assert status["status"] == "rejected" and "4000" in status["reason"]
    m = outcome.methods["not"]
    # Measured by node 1 on its own class-2 samples (other nodes still hold class 2, so
    # a model that forgot node 1's data alone still recognises the class).
    assert m.status == "honoured" and 0.0 <= m.metrics["forget"] <= 100.0
    assert 0.0 <= m.metrics["retain"] <= 100.0
    # The class-wise target trained with fedunlearn's retained-data handler.
    kinds = {(int(x.metadata.dst_node_id), x.metadata.message_type) for x in grid.sent[before:]}
    assert (USER_NODE[1], "train.retained") in kinds and (USER_NODE[0], "train") in kinds


def test_a_node_without_num_examples_fails_the_method_by_name(userapp, tmp_path, user_grid):
    from fedunlearn import FineTune, Recovery, ServeError, serve
    from fedunlearn.inbox import Inbox
    from flwr.app import ArrayRecord, MetricRecord

    client_app, task = userapp
    Inbox(str(tmp_path / "i0")).file(scope="client")
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "i0"})
    arrays = fedavg(grid, task, rounds=1)
    real = client_app.app._registered_funcs["train.default"]

    def no_weight(msg, context):
        reply = real(msg, context)
        return Message(RecordDict({"arrays": reply.content["arrays"],
                                   "metrics": MetricRecord({"train_loss": 0.1})}), reply_to=msg)

    client_app.app._registered_funcs["train.default"] = no_weight
    with pytest.raises(ServeError, match="no method honoured .*ft failed: .*num-examples") as raised:
        serve(grid, arrays, FineTune(Recovery(rounds=1)), output_dir=tmp_path / "o")
    m = raised.value.outcome.methods["ft"]
    assert m.status == "failed" and m.arrays is None
    assert f"node {USER_NODE[1]}" in m.reason and "num-examples" in m.reason
    assert (tmp_path / "o" / "ft" / "failed.json").exists()
    assert not (tmp_path / "o" / "ft" / "model.pt").exists()


def test_start_on_an_unbound_unlearning_strategy_raises(userapp):
    from fedunlearn import NoT

    import torch
    from flwr.app import ArrayRecord

    _, task = userapp
    not_ = NoT(model_fn=task.Net, example_input=torch.zeros(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="serve"):
        not_.start(None, ArrayRecord(task.Net().state_dict()), num_rounds=3)


def test_server_side_import_does_not_load_the_client_side():
    code = ("import sys, fedunlearn, fedunlearn.serving, fedunlearn.harness.run, "
            "fedunlearn.strategies as s; s.list_methods(); from fedunlearn import NoT, serve; "
            "print('fedunlearn.client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_strategy_and_an_action_from_outside_the_package(tmp_path, monkeypatch,
                                                           server_identity, local_grid):
    pkg = tmp_path / "myplugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from fedunlearn.strategies import register_method
        from fedunlearn.strategies.finetune import FineTune
        from fedunlearn.client import register_action, ActionResult

        @register_action("halve")
        def halve(job):
            for p in job.model.parameters():
                p.data.mul_(0.5)
            return ActionResult(job.model, num_examples=len(job.retained))

        @register_method("halving_ft")
        class HalvingFT(FineTune):
            """FT whose recovery runs the outside action."""
            def recovery_phase(self):
                import dataclasses
                return dataclasses.replace(super().recovery_phase(), action="halve")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    # Test isolation only: the outside method and action leave the registries (and the
    # harness's ClientApp) as they were once this test ends.
    import fedunlearn.client.actions as actions_pkg
    import fedunlearn.strategies as strategies_pkg
    from flower_apps.client_app import app as harness_app

    monkeypatch.setattr(strategies_pkg, "_METHODS", strategies_pkg._METHODS.copy())
    monkeypatch.setattr(actions_pkg, "_ACTIONS", actions_pkg._ACTIONS.copy())
    monkeypatch.setattr(harness_app, "_registered_funcs", dict(harness_app._registered_funcs))
    monkeypatch.delitem(sys.modules, "myplugin", raising=False)
    importlib.import_module("myplugin")
    from fedunlearn.strategies import get_method, list_methods
    from fedunlearn.client import list_actions

    assert "halving_ft" in list_methods() and "halve" in list_actions()
    from .helpers import NUM, RC, make_context
    from flower_apps.client_app import app
    from fedunlearn.client import action_handler
    from fedunlearn.training import to_arrays
    import numpy as np

    if "train.halve" not in app._registered_funcs:
        from fedunlearn.harness.node import harness_view
        app.train("halve")(action_handler("halve", harness_view))
    ctx = make_context(RC, {})
    from fedunlearn.harness.methods import build
    strategy = build(get_method("halving_ft"), ctx.cfg, ctx)
    from fedunlearn.strategies import Recovery
    strategy.recovery = Recovery(rounds=1, server_momentum=0.0)
    start = to_arrays(ctx.model_factory())
    out = strategy.unlearn(local_grid(app, NUM, RC), start)
    key = next(iter(start))
    assert np.allclose(out[key].numpy(), 0.5 * start[key].numpy())


@pytest.mark.slow
def test_the_example_app_under_flwr_run(tmp_path):
    """examples/quickstart-pytorch-unlearning end to end on Flower's simulation engine:
    the user's FedAvg, then node 0's inbox request served by NoT and PUF."""
    from pathlib import Path

    from fedunlearn.audit import model_digest
    from fedunlearn.launch import flwr_run
    from fedunlearn.serving import load_model

    app = Path(__file__).resolve().parents[1] / "examples" / "quickstart-pytorch-unlearning"
    out, log = tmp_path / "out", tmp_path / "run.log"
    rc = flwr_run({"num-server-rounds": 3, "recovery-rounds": 5, "methods": "not,puf",
                   "output-dir": str(out), "inbox-root": str(tmp_path / "inboxes")},
                  num_supernodes=4, app=app, env={"FLWR_HOME": str(tmp_path / "home")},
                  log_file=log, echo=False)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    for method in ("not", "puf"):
        res = json.loads((out / method / "results.json").read_text())
        assert res["status"] == "honoured" and res["rounds"] >= 2
        assert model_digest(load_model(out / method / "model.pt")) == res["model_arrays_sha256"]
        assert hashlib.sha256((out / method / "model.pt").read_bytes()).hexdigest() == \
            res["model_sha256"]
    assert "Receipt (honoured)" in text and "not        honoured" in text


def test_start_on_a_bound_not_negates_before_recovery(server_identity):
    import numpy as np

    from fedunlearn import NoT
    from fedunlearn.requests import UnlearningRequest
    from fedunlearn.training import to_arrays

    from .helpers import RC, make_context

    ctx = make_context(RC, {10: UnlearningRequest("client", 0, node_id=10)})
    strategy = NoT(model_fn=ctx.model_factory, example_input=ctx.example_input).bind(ctx)
    start = to_arrays(ctx.model_factory())
    result = strategy.start(None, start, num_rounds=0)
    first = strategy.notes["negated"][0]
    assert np.allclose(result.arrays[first].numpy(), -start[first].numpy())
    assert strategy.recovery.rounds == 0


def test_strategy_arguments_are_checked_by_name():
    from fedunlearn import PUF, Recovery

    with pytest.raises(ValueError, match="Recovery.lr=-1"):
        Recovery(lr=-1)
    with pytest.raises(ValueError, match="Recovery.stop='sometimes'"):
        Recovery(stop="sometimes")
    with pytest.raises(ValueError, match="alpha"):
        PUF(params={"alpha": -2.0})
    with pytest.raises(ValueError, match="has no parameter 'beta'"):
        PUF(params={"beta": 1.0})
    assert PUF(params={"alpha": 3.0}).params.alpha == 3.0


def test_history_methods_serve_from_a_keeper_around_the_users_fedavg(userapp, tmp_path, user_grid):
    """FedEraser, FUKD and PGD on the plugin path: the user's FedAvg wrapped in a
    HistoryKeeper records what they need; serve() replays it."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import FUKD, PGD, FedEraser, HistoryKeeper, Recovery, load_model, serve
    from fedunlearn.audit import model_digest
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    Inbox(str(tmp_path / "i2")).file(scope="client")
    grid = user_grid(client_app.app, inboxes={2: tmp_path / "i2"})
    recovery = Recovery(rounds=1, server_momentum=0.0, lr=0.05)
    methods = [FedEraser(recovery, params={"delta_t": 2}, model_fn=task.Net),
               FUKD(recovery, params={"epochs": 1}, model_fn=task.Net,
                    server_data=task.Blobs(32, seed=5)),
               PGD(recovery, model_fn=task.Net)]
    keeper = HistoryKeeper(FedAvg(fraction_train=1.0, fraction_evaluate=0.0),
                           methods=methods, directory=tmp_path / "history", max_mb=5)
    torch.manual_seed(0)
    result = keeper.start(grid, ArrayRecord(task.Net().state_dict()), num_rounds=3,
                          train_config=ConfigRecord({"lr": 0.05}))
    manifest = keeper.history.manifest
    assert manifest["rounds"] == 3 and manifest["keyed_by"] == "node-id"
    assert manifest["model_arrays_sha256"] == model_digest(result.arrays)
    # Rounds 1 and 3 stored (delta_t=2), update sums and last local models per node.
    names = sorted(p.name for p in (tmp_path / "history").iterdir())
    assert names == ["last_local.pt", "manifest.json", "round-00001.pt", "round-00003.pt",
                     "update_sums.pt"]
    outcome = serve(grid, result.arrays, methods, output_dir=tmp_path / "out",
                    history=keeper, model_fn=task.Net,
                    example_input=torch.zeros(1, 1, 8, 8))
    print(outcome.table())
    for name in ("federaser", "fukd", "pgd"):
        m = outcome.methods[name]
        assert m.status == "honoured", m.reason
        assert m.flops > 0
        assert model_digest(load_model(m.model_path)) == m.model_arrays_sha256
    assert outcome.methods["fukd"].notes["subtracted_partitions"] == [USER_NODE[2]]
    # The user's train handler counts no samples: FLOPs estimated from num-examples x
    # the local epochs asked, and said so in the cost.
    cost = json.loads((tmp_path / "out" / "federaser" / "results.json").read_text())["cost"]
    assert cost["estimated_train_samples"] == cost["train_samples"] > 0
    # The target (partition 2's node) never trained in FedEraser's calibration or FUKD's recovery.
    assert all(int(x.metadata.dst_node_id) != USER_NODE[2] for x in grid.sent[-20:]
               if x.metadata.message_type == "train")


def test_history_methods_are_refused_without_a_matching_history(userapp, tmp_path, user_grid):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import FUKD, PGD, FedEraser, HistoryKeeper, Recovery, ServeError, serve
    from fedunlearn.inbox import Inbox

    def refused(*args, **kwargs):  # no method could serve: serve() raises, naming each
        with pytest.raises(ServeError, match="no method honoured") as raised:
            serve(*args, **kwargs)
        return raised.value.outcome

    client_app, task = userapp
    Inbox(str(tmp_path / "i0")).file(scope="client")
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "i0"})
    # Too large for the bound: refused before the first round, nothing written.
    with pytest.raises(ValueError, match="history.max-mb|over the bound"):
        HistoryKeeper(FedAvg(), methods=[FedEraser(model_fn=task.Net)],
                      directory=tmp_path / "big", max_mb=0.001).start(
            grid, ArrayRecord(task.Net().state_dict()), num_rounds=5)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="nothing to record"):
        HistoryKeeper(FedAvg(), methods=[], directory=tmp_path / "h")
    keeper = HistoryKeeper(FedAvg(fraction_evaluate=0.0),
                           methods=[PGD(model_fn=task.Net),
                                    FUKD(model_fn=task.Net, server_data=task.Blobs(8, seed=5))],
                           directory=tmp_path / "h")
    result = keeper.start(grid, ArrayRecord(task.Net().state_dict()), num_rounds=1,
                          train_config=ConfigRecord({"lr": 0.05}))
    recovery = Recovery(rounds=1)
    outcome = refused(grid, result.arrays, [FedEraser(recovery, model_fn=task.Net)],
                      output_dir=tmp_path / "o", history=keeper)
    assert outcome.methods["federaser"].status == "refused"
    assert "client updates every 1 round" in outcome.methods["federaser"].reason
    # A model other than the one the recorded training ended with: refused by hash.
    other = ArrayRecord(task.Net().state_dict())
    outcome = refused(grid, other, PGD(recovery, model_fn=task.Net), output_dir=tmp_path / "o2",
                      history=keeper)
    assert outcome.methods["pgd"].status == "refused"
    assert "different model" in outcome.methods["pgd"].reason
    outcome = refused(grid, result.arrays, PGD(recovery, model_fn=task.Net),
                      output_dir=tmp_path / "o3")
    assert "HistoryKeeper" in outcome.methods["pgd"].reason


def test_inbox_instance_requests_use_the_data_owners_own_sample_ids(userapp, tmp_path, user_grid):
    """attach(sample_ids=...): ids filed in the inbox are the data owner's, mapped to
    positions on the node; an id the node does not hold is rejected on its receipt."""
    import torch
    from flwr.clientapp import ClientApp

    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.client import attach
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    app = ClientApp()
    app._registered_funcs["train.default"] = client_app.app._registered_funcs["train.default"]
    attach(app, model_fn=task.Net,
           data=lambda ctx: task.load_data(ctx.node_config["partition-id"]),
           sample_ids=lambda ctx: [7000 + 10 * i for i in range(48)], train_fn=task.train)
    good = Inbox(str(tmp_path / "i1")).file(scope="instance", sample_ids=[7000, 7050]).id
    bad = Inbox(str(tmp_path / "i2")).file(scope="instance", sample_ids=[5]).id
    grid = user_grid(app, inboxes={1: tmp_path / "i1", 2: tmp_path / "i2"})
    arrays = fedavg(grid, task, rounds=1)
    outcome = serve(grid, arrays, NoT(Recovery(rounds=1, lr=0.05), model_fn=task.Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=tmp_path / "out")
    (accepted,) = outcome.report["accepted"]
    assert accepted["node_id"] == USER_NODE[1] and accepted["num_samples"] == 2
    from fedunlearn.protocol import FORGET_SAMPLE_IDS
    echoed = {tuple(m.content["config"][FORGET_SAMPLE_IDS]) for m in grid.sent
              if int(m.metadata.dst_node_id) == USER_NODE[1] and "config" in m.content
              and FORGET_SAMPLE_IDS in m.content["config"]}
    assert echoed == {(0, 5)}  # positions of the owner's ids 7000 and 7050
    assert outcome.methods["not"].status == "honoured"
    assert Inbox(str(tmp_path / "i1")).events(good)[-1]["status"] == "honoured"
    verdict = Inbox(str(tmp_path / "i2")).events(bad)[-1]
    assert verdict["status"] == "rejected" and "sample id(s) 5 are not" in verdict["reason"]


def test_one_bad_inbox_request_does_not_sink_the_good_ones(userapp, tmp_path, user_grid):
    """Node 2's inbox holds a valid instance-wise request and one naming an id it does
    not hold: the node rejects the bad one on its own receipt, the good one is served."""
    import torch

    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "i2"))
    good = inbox.file(scope="instance", sample_ids=[5, 8, 17]).id
    bad = inbox.file(scope="instance", sample_ids=[9, 2 ** 40]).id
    grid = user_grid(client_app.app, inboxes={2: tmp_path / "i2"})
    arrays = fedavg(grid, task, rounds=1)
    out = tmp_path / "out"
    outcome = serve(grid, arrays, NoT(Recovery(rounds=1, lr=0.05), model_fn=task.Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=out)
    (accepted,) = outcome.report["accepted"]
    assert accepted["node_id"] == USER_NODE[2] and accepted["num_samples"] == 3
    (rejected,) = outcome.report["rejected"]
    assert rejected["inbox_ids"] == [bad] and str(2 ** 40) in rejected["reason"]
    assert outcome.methods["not"].status == "honoured"
    assert [e["status"] for e in inbox.events(good)][-1] == "honoured"
    verdict = inbox.events(bad)[-1]
    assert verdict["status"] == "rejected" and str(2 ** 40) in verdict["reason"]
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert any(r["event"] == "request.rejected" and r.get("by") == "node" for r in audit)


def test_fifty_bad_filings_get_their_verdicts_in_one_receipt_message(userapp, tmp_path,
                                                                     user_grid):
    """Issue 'service mode that loses nothing', item 12: the verdicts of one node's
    rejected filings travel as one receipt (each id with its own reason), not one round
    trip per id."""
    import torch

    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.inbox import Inbox
    from fedunlearn.requests import RECEIPT_RECORD

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "i2"))
    good = inbox.file(scope="instance", sample_ids=[5, 8, 17]).id
    bad = [inbox.file(scope="instance", sample_ids=[10 ** 6 + k]).id for k in range(50)]
    grid = user_grid(client_app.app, inboxes={2: tmp_path / "i2"})
    arrays = fedavg(grid, task, rounds=1)
    before = len(grid.sent)
    outcome = serve(grid, arrays, NoT(Recovery(rounds=1, lr=0.05), model_fn=task.Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=tmp_path / "out")
    assert outcome.methods["not"].status == "honoured" and len(outcome.report["rejected"]) == 50
    receipts = [m.content[RECEIPT_RECORD] for m in grid.sent[before:]
                if RECEIPT_RECORD in m.content]
    statuses = sorted(r["status"] for r in receipts)
    assert statuses == ["accepted", "honoured", "rejected"]  # one message per verdict kind
    for k, inbox_id in enumerate(bad):
        verdict = inbox.events(inbox_id)[-1]
        assert verdict["status"] == "rejected" and str(10 ** 6 + k) in verdict["reason"]
    assert [e["status"] for e in inbox.events(good)][-1] == "honoured"


def test_two_hundred_pending_requests_all_get_a_verdict_in_one_job(userapp, tmp_path, user_grid):
    import torch

    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = Inbox(str(tmp_path / "i1"))
    ids = [inbox.file(scope="class", classes=[c % 2]).id for c in range(200)]
    grid = user_grid(client_app.app, inboxes={1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=1)
    outcome = serve(grid, arrays, NoT(Recovery(rounds=1, lr=0.05), model_fn=task.Net,
                                      example_input=torch.zeros(1, 1, 8, 8)),
                    output_dir=tmp_path / "out")
    assert outcome.methods["not"].status == "honoured"
    assert outcome.report["accepted"][0]["classes"] == [0, 1]
    assert {inbox.entry(i).status for i in ids} == {"honoured"}


def test_serve_checks_the_users_arrays_against_model_fn_first(userapp, user_grid, tmp_path):
    """serve() refuses arrays that are not model_fn's state (keys, shapes, a floating
    parameter given as integers) before any request is accepted (issue: service mode
    that loses nothing, item 9): nothing accepted, no receipt, no method run."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    from fedunlearn import NoT, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = tmp_path / "inbox-0"
    grid = user_grid(client_app.app, inboxes={0: inbox})
    filed = Inbox(str(inbox)).file(scope="client")
    good = ArrayRecord(task.Net().state_dict())
    truncated = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=np.int64))
                             for k, v in good.items()})
    smaller = ArrayRecord({k: v for k, v in list(good.items())[:-1]})
    method = NoT(Recovery(rounds=1), model_fn=task.Net, example_input=torch.zeros(1, 1, 8, 8))
    for arrays, reason in ((truncated, "not floating point"), (smaller, "missing")):
        with pytest.raises(ValueError, match=f"arrays are not the model model_fn builds: .*{reason}"):
            serve(grid, arrays, [method], output_dir=tmp_path / "out")
    assert grid.sent == [] and not (tmp_path / "out").exists()
    assert Inbox(str(inbox)).entry(filed.id).status == "filed"  # never sent, never judged


def test_a_node_claiming_anothers_partition_id_does_not_block_its_request(
        userapp, local_grid, tmp_path):
    """On the plugin path a partition id is a label a node gives itself: a second node
    with node 1's label does not get node 1's request rejected (issue: service mode
    that loses nothing, item 7); each request binds to the node that sent it."""
    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inbox = tmp_path / "inbox-1"
    grid = local_grid(client_app.app, 4, {}, {1: {"inbox": str(inbox)}, 2: {"partition-id": 1}},
                      run_id=USER_RUN_ID, arrival="sent")
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(inbox)).file(scope="class", classes=[1])
    outcome = serve(grid, arrays, [FineTune(Recovery(rounds=1, server_momentum=0.0))],
                    output_dir=tmp_path / "out")
    node1 = USER_NODE[1]  # the node started as partition 1 (node 2 took its label too)
    assert sorted(grid.partitions.values()) == [0, 1, 1, 3]
    assert [a["node_id"] for a in outcome.report["accepted"]] == [node1]
    assert outcome.report["rejected"] == []
    assert outcome.methods["ft"].status == "honoured"


def test_no_single_node_controls_the_weight_of_its_replies(userapp, local_grid, tmp_path):
    """Reply weights are bounded by what the server can know (issue: service mode that
    loses nothing, item 3): on the plugin path a node's first report of its training set
    is the most its replies may weigh (a later, larger report does not raise it), and a
    reply weighing more than 10x the median of the other nodes counts for that cap,
    recorded as reply.capped."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    import fedunlearn.federation as federation
    from fedunlearn.audit import AuditLog, read_audit
    from fedunlearn.federation.guarded_grid import WEIGHT_CAP_FACTOR
    from fedunlearn.protocol import CONFIG_KEY, MODEL_KEY

    client_app, task = userapp
    inner = local_grid(client_app.app, 4, {}, run_id=USER_RUN_ID, arrival="sent")
    grid = federation.GuardedGrid(inner, AuditLog(tmp_path / "audit.jsonl", USER_RUN_ID))
    honest, hostile = sorted(inner.contexts)[:3], sorted(inner.contexts)[3]
    grid.verify({n: p for p, n in enumerate(sorted(inner.contexts))})
    grid.reports = {**{n: {"num-train": 100} for n in honest}, hostile: {"num-train": 10**6}}
    grid.reports = {**grid.reports, hostile: {"num-train": 10**12}}  # a later, larger claim
    arrays = ArrayRecord(task.Net().state_dict())
    sent = Message(RecordDict({MODEL_KEY: arrays, CONFIG_KEY: ConfigRecord({"lr": 0.1})}),
                   dst_node_id=hostile, message_type="train")

    def reply(weight):
        return Message(RecordDict({MODEL_KEY: arrays,
                                   "metrics": MetricRecord({"num-examples": weight})}),
                       reply_to=_as_received(sent, hostile))

    assert grid.checked(reply(10**6 + 1), sent).has_error()  # above its first report
    checked = grid.checked(reply(10**6), sent)
    assert not checked.has_error()
    assert grid.weight_cap(hostile) == WEIGHT_CAP_FACTOR * 100
    assert checked.content["metrics"]["num-examples"] == WEIGHT_CAP_FACTOR * 100
    assert not grid.checked(reply(100), sent).has_error()  # an honest weight is untouched
    events = read_audit(tmp_path / "audit.jsonl").records
    capped = [r for r in events if r["event"] == "reply.capped"]
    assert [(r["num_examples"], r["counted"]) for r in capped] == [(10**6, 1000)]


def _as_received(msg, node):
    """``msg`` as a node receives it (metadata set), so a reply can answer it."""
    import time as _time

    from flwr.app import Message, Metadata

    md = Metadata(run_id=USER_RUN_ID, message_id="m1", src_node_id=0, dst_node_id=node,
                  reply_to_message_id="", group_id="", created_at=_time.time(), ttl=3600,
                  message_type=msg.metadata.message_type)
    return Message(msg.content, metadata=md)


def test_an_inflated_node_never_publishes_its_own_model(userapp, local_grid, tmp_path):
    """A node that reports num-train=10**12 and answers every train message with its own
    model and num-examples=10**12 (issue: service mode that loses nothing, item 3; before
    the cap the published model was exactly the node's): through serve() its replies are
    counted at the cap (reply.capped), the model FT recovers is not the node's, and with
    a robust recovery aggregator (FedMedian) it lies nearer the honest run's than the
    node's."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedMedian

    from fedunlearn import FineTune, Recovery, ServeError, load_model, serve
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    torch.manual_seed(123)
    own = task.Net().state_dict()
    hostile = USER_NODE[3]

    def tamper(node, reply):
        if node != hostile or reply.has_error():
            return reply
        kind, content = reply.metadata.message_type.split(".")[0], RecordDict(
            dict(reply.content.items()))
        if kind == "query" and "node" in content.config_records:
            content["node"] = ConfigRecord({**dict(content["node"]), "num-train": 10**12})
        elif kind == "train":
            content["arrays"] = ArrayRecord(own)
            content["metrics"] = MetricRecord({**dict(content["metrics"]),
                                               "num-examples": 10**12})
        reply.content = content
        return reply

    def run(name, aggregation=None, attack=True):
        inbox = tmp_path / name / "inbox-0"
        Inbox(str(inbox)).file(scope="client")
        grid = local_grid(client_app.app, 4, {}, {0: {"inbox": str(inbox)}},
                          run_id=USER_RUN_ID, arrival="sent", tamper=tamper if attack else None)
        torch.manual_seed(0)
        arrays = ArrayRecord(task.Net().state_dict())
        try:
            outcome = serve(grid, arrays, FineTune(Recovery(rounds=2, lr=0.05),
                                                   aggregation=aggregation),
                            output_dir=tmp_path / name / "out")
        except ServeError as err:
            outcome = err.outcome
        model = load_model(outcome.methods["ft"].model_path)
        events = [json.loads(line) for line in
                  (tmp_path / name / "out" / "audit.jsonl").read_text().splitlines()]
        return ({k: v.numpy() for k, v in model.items()},
                [e for e in events if e["event"] == "reply.capped"])

    def distance(a, b):
        return max(float(np.abs(a[k] - np.asarray(b[k])).max()) for k in a)

    capped_model, capped = run("capped")
    assert capped and {(e["node"], e["num_examples"]) for e in capped} == {(hostile, 10**12)}
    assert all(e["counted"] < 10**6 for e in capped)
    assert distance(capped_model, own) > 0
    honest_model, none = run("honest", attack=False)
    assert none == []
    median_model, _ = run("median", FedMedian(min_train_nodes=1, min_available_nodes=1))
    assert distance(median_model, honest_model) < distance(median_model, own)

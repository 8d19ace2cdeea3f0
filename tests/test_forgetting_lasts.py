"""Forgetting that lasts: after serve() honours a client-wise and a class-wise request,
the user's own later training (Flower's FedAvg, their own ``@app.train()`` handler and
``train`` function) never touches the forgotten data, with one documented line on the
server (``ExcludeForgotten``) and the mod that ``attach()`` installs on the client; the
same after the ServerApp and the SuperNodes restart. The user's package is written
outside fedunlearn, as in tests/test_plugin.py, with a training set that notes every
sample a train loop draws."""

from __future__ import annotations

import importlib
import sys

import pytest

from .test_plugin import USER_RUN_ID, USER_TASK

#: The user's data, noting each sample their train loop draws: (partition, label).
LOGGED_TASK = USER_TASK + '''

SEEN = []
_IN_TRAIN = [False]


class Logged(Blobs):
    def __init__(self, n, seed, partition):
        super().__init__(n, seed)
        self.partition = partition

    def __getitem__(self, i):
        if _IN_TRAIN[0]:
            SEEN.append((self.partition, int(self.y[i])))
        return super().__getitem__(i)


def load_data(partition_id):
    return Logged(48, 100 + partition_id, partition_id), Blobs(16, seed=200 + partition_id)


_plain_train = train


def train(net, trainloader, epochs, lr, device):
    _IN_TRAIN[0] = True
    try:
        return _plain_train(net, trainloader, epochs, lr, device)
    finally:
        _IN_TRAIN[0] = False
'''

USER_HANDLER = '''
@app.train()
def train_handler(msg: Message, context: Context):
    """Flower quickstart's handler: the node's whole training set, its own metric names."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainset, _ = load_data(context.node_config["partition-id"])
    loss = train(model, DataLoader(trainset, batch_size=16, shuffle=True), 1,
                 msg.content["config"]["lr"], "cpu")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss,
                                                   "num-examples": len(trainset)})})
    return Message(content=content, reply_to=msg)
'''
ATTACH = '''
attach(app, model_fn=Net, data=lambda ctx: load_data(ctx.node_config["partition-id"]),
       train_fn=train)
'''
CLIENT_HEAD = '''
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from fedunlearn.client import attach
from userapp.task import Net, load_data, train

app = ClientApp()
'''


def _import_user_app(root, order: str, loss_name: str = "train_loss"):
    """The user's package; ``order``: attach() ``after`` or ``before`` their
    ``@app.train()``. Imported afresh (a new ClientApp, as a restarted SuperNode has)."""
    pkg = root / "userapp"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(LOGGED_TASK)
    handler = USER_HANDLER.replace('"train_loss"', repr(loss_name))
    body = handler + ATTACH if order == "after" else ATTACH + handler
    (pkg / "client_app.py").write_text(CLIENT_HEAD + body)
    for name in [m for m in sys.modules if m.startswith("userapp")]:
        del sys.modules[name]
    return importlib.import_module("userapp.client_app"), importlib.import_module("userapp.task")


@pytest.fixture()
def user_root(tmp_path, monkeypatch, server_identity, single_thread):
    root = tmp_path / "user"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.startswith("userapp")]:
        del sys.modules[name]


def _fedavg(strategy, grid, arrays, rounds):
    from flwr.app import ConfigRecord

    return strategy.start(grid, arrays, num_rounds=rounds,
                          train_config=ConfigRecord({"lr": 0.05}))


def _served(user_root, local_grid, tmp_path, order, scopes, loss_name="train_loss"):
    """The user's federation of 4 nodes (node p holds partition p), one FedAvg round,
    then serve() honouring the requests ``scopes`` ({partition: request fields})."""
    import torch
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox

    app, task = _import_user_app(user_root, order, loss_name)
    node_configs = {p: {"inbox": str(tmp_path / f"inbox-{p}")} for p in scopes}
    ids = {p: Inbox(node_configs[p]["inbox"]).file(**fields).id for p, fields in scopes.items()}
    grid = local_grid(app.app, 4, {}, node_configs, run_id=USER_RUN_ID, arrival="sent")
    torch.manual_seed(0)
    arrays = _fedavg(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid,
                     ArrayRecord(task.Net().state_dict()), 1).arrays
    out = tmp_path / "unlearning"
    outcome = serve(grid, arrays, FineTune(Recovery(rounds=1, lr=0.05)), output_dir=out)
    assert outcome.methods["ft"].status == "honoured", outcome.methods["ft"].reason
    for p, request_id in ids.items():
        assert Inbox(node_configs[p]["inbox"]).entry(request_id).status == "honoured"
    return grid, task, outcome, out, node_configs


def _train_to(grid, start: int, node: int) -> list:
    return [m for m in grid.sent[start:] if int(m.metadata.dst_node_id) == node
            and m.metadata.message_type.split(".")[0] == "train"]


@pytest.mark.parametrize("order", ["after", "before"])
def test_forgotten_data_stays_out_of_the_users_later_fedavg(order, user_root, local_grid,
                                                            tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import ExcludeForgotten

    grid, task, outcome, out, node_configs = _served(
        user_root, local_grid, tmp_path, order,
        {0: {"scope": "client"}, 1: {"scope": "class", "classes": [2]}})
    # Before the request was honoured, node 1's own handler trained on its class-2
    # samples: the count below can see them.
    assert (1, 2) in task.SEEN
    assert outcome.report["go_on_with"] == f"ExcludeForgotten(your_strategy, output_dir={str(out)!r})"
    node0, node1 = grid.node_id(0), grid.node_id(1)

    def two_rounds(grid, task):
        task.SEEN.clear()
        start = len(grid.sent)
        strategy = ExcludeForgotten(FedAvg(fraction_train=1.0, fraction_evaluate=0.5),
                                    output_dir=out)  # the one line
        result = _fedavg(strategy, grid, outcome.arrays, 2)
        assert _train_to(grid, start, node0) == []
        assert all(int(m.metadata.dst_node_id) != node0 for m in grid.sent[start:])
        assert [m.metadata.message_type for m in _train_to(grid, start, node1)] == ["train"] * 2
        node1_seen = [label for p, label in task.SEEN if p == 1]
        assert node1_seen and 2 not in node1_seen  # zero forgotten samples
        assert {p for p, _ in task.SEEN} == {1, 2, 3}
        assert sorted(result.train_metrics_clientapp) == [1, 2]
        return result

    first = two_rounds(grid, task)
    assert first.arrays is not None
    # The ServerApp restarts (a new wrapper reading the same output_dir) and so do the
    # SuperNodes (a fresh ClientApp and Contexts, the same inboxes and node ids).
    app, task = _import_user_app(user_root, order)
    restarted = local_grid(app.app, 4, {}, node_configs, run_id=USER_RUN_ID, arrival="sent")
    assert restarted.node_id(0) == node0
    two_rounds(restarted, task)


def test_without_the_line_the_forgotten_node_is_sent_training(user_root, local_grid,
                                                              tmp_path):
    """The problem the line solves: the user's plain FedAvg samples the node whose
    client-wise request was honoured; its ClientApp refuses (an error reply saying why)
    and the round goes on without it."""
    from flwr.serverapp.strategy import FedAvg

    grid, task, outcome, out, _ = _served(user_root, local_grid, tmp_path, "after",
                                          {0: {"scope": "client"}})
    start = len(grid.sent)
    task.SEEN.clear()
    result = _fedavg(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid, outcome.arrays, 1)
    node0 = grid.node_id(0)
    assert len(_train_to(grid, start, node0)) == 1
    (refused,) = [r for r in grid.replies if int(r.metadata.src_node_id) == node0
                  and r.has_error()]
    assert "forgotten client-wise" in refused.error.reason
    assert "ExcludeForgotten" in refused.error.reason
    assert result.arrays is not None and {p for p, _ in task.SEEN} == {1, 2, 3}


def test_a_later_serve_into_the_same_output_dir_does_not_train_the_forgotten_node(
        user_root, local_grid, tmp_path):
    """A second serve() (node 2 files later) reads the same audit log: the node forgotten
    client-wise by the first one is sent no training in its recovery either."""
    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox

    grid, task, outcome, out, node_configs = _served(user_root, local_grid, tmp_path,
                                                     "after", {0: {"scope": "client"},
                                                               2: {"scope": "class",
                                                                   "classes": [1]}})
    later = Inbox(node_configs[2]["inbox"]).file(scope="class", classes=[3]).id
    start = len(grid.sent)
    second = serve(grid, outcome.arrays, FineTune(Recovery(rounds=2, lr=0.05)),
                   output_dir=out)
    assert second.methods["ft"].status == "honoured", second.methods["ft"].reason
    assert Inbox(node_configs[2]["inbox"]).entry(later).status == "honoured"
    assert _train_to(grid, start, grid.node_id(0)) == []
    assert len(_train_to(grid, start, grid.node_id(1))) == 2


def test_a_node_config_request_is_kept_out_from_the_nodes_start(user_root, local_grid):
    """A request in the node-config has no receipt the node could check: the node's
    standing instruction, applied to every later train message (here before any serve())."""
    import torch
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    app, task = _import_user_app(user_root, "after")
    grid = local_grid(app.app, 3, {}, {1: {"forget-scope": "class", "forget-classes": "2"}},
                      run_id=USER_RUN_ID, arrival="sent")
    torch.manual_seed(0)
    _fedavg(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid,
            ArrayRecord(task.Net().state_dict()), 1)
    node1_seen = [label for p, label in task.SEEN if p == 1]
    assert node1_seen and 2 not in node1_seen
    assert any(label == 2 for p, label in task.SEEN if p == 2)  # others keep class 2


def test_bad_input_is_named():
    from fedunlearn import ExcludeForgotten

    with pytest.raises(TypeError, match="strategy='FedAvg'.*Flower strategy"):
        ExcludeForgotten("FedAvg", output_dir="out")
    from flwr.serverapp.strategy import FedAvg

    with pytest.raises(TypeError, match="output_dir=None"):
        ExcludeForgotten(FedAvg(), output_dir=None)


def test_a_target_asked_to_train_without_lr_refuses_with_the_reason(user_root, local_grid,
                                                                    tmp_path):
    """fedunlearn trains a class-wise target with the user's train_fn and needs the
    learning rate: a train config without 'lr' gets an error reply naming it."""
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import ExcludeForgotten

    grid, task, outcome, out, _ = _served(user_root, local_grid, tmp_path, "after",
                                          {1: {"scope": "class", "classes": [2]}})
    strategy = ExcludeForgotten(FedAvg(fraction_train=1.0, fraction_evaluate=0.0),
                                output_dir=out)
    from flwr.app import ConfigRecord

    start = len(grid.replies)
    strategy.start(grid, outcome.arrays, num_rounds=1, train_config=ConfigRecord({"rate": 0.1}))
    (refused,) = [r for r in grid.replies[start:]
                  if int(r.metadata.src_node_id) == grid.node_id(1)]
    assert "needs 'lr' in the train config" in refused.error.reason and "rate" in refused.error.reason


def test_a_handler_with_its_own_metric_names_aggregates_through_the_wrapper(
        user_root, local_grid, tmp_path):
    """The guard's reply carries Flower quickstart's metric names; beside a handler that
    names its loss otherwise, Flower's FedAvg alone refuses the round, and the wrapper
    aggregates the metrics every reply shares."""
    import numpy as np
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn import ExcludeForgotten

    grid, task, outcome, out, _ = _served(user_root, local_grid, tmp_path, "after",
                                          {1: {"scope": "class", "classes": [2]}},
                                          loss_name="loss")
    with pytest.raises(InconsistentMessageReplies):
        _fedavg(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid, outcome.arrays, 1)
    result = _fedavg(ExcludeForgotten(FedAvg(fraction_train=1.0, fraction_evaluate=0.0),
                                      output_dir=out), grid, outcome.arrays, 1)
    key = next(iter(outcome.arrays))
    assert not np.allclose(result.arrays[key].numpy(), outcome.arrays[key].numpy())
    assert dict(result.train_metrics_clientapp[1]) == {}  # num-examples: the weight only


def test_train_handler_is_for_an_app_without_its_own_train():
    """attach(train_handler=True) registers fedunlearn's plain train for an app without
    one; beside the app's own @app.train() it is refused by name."""
    from flwr.clientapp import ClientApp

    from fedunlearn.client import attach

    data = [(0.0, 0)] * 4
    attach(ClientApp(), model_fn=lambda: None, data=data, train_handler=True)  # serves plain
    # train messages (tests/test_plugin_flower_data.py trains through it)
    own = ClientApp()

    @own.train()
    def train(msg, context):
        return msg

    with pytest.raises(ValueError, match="already has its own @app.train"):
        attach(own, model_fn=lambda: None, data=data, train_handler=True)

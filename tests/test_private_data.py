"""Nodes with private data: a deployment's SuperNodes start with only ``dataset-path`` and
``inbox`` in their node-config, no ``partition-id``. A user's own app (``attach()`` with
``node_dataset``, ``serve()``, ``UnlearningService``) binds every request to the node that
filed it; none of them counts as "partition 0".

The user's package is written outside fedunlearn (tests/test_plugin.py's model and
training loop); every message reaches its real ClientApp on the node's own Context."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from .test_plugin import USER_RUN_ID, USER_TASK

PRIVATE_CLIENT = '''
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from fedunlearn.client import attach, node_dataset
from userapp.task import Net, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    """The user's handler: the node's own folder (node-config dataset-path)."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainset, _ = node_dataset(context)
    loss = train(model, DataLoader(trainset, batch_size=16, shuffle=True), 1,
                 msg.content["config"]["lr"], "cpu")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss,
                                                   "num-examples": len(trainset)})})
    return Message(content=content, reply_to=msg)


attach(app, model_fn=Net, data=node_dataset, train_fn=train)
'''


@pytest.fixture()
def private_app(tmp_path, monkeypatch, server_identity, single_thread):
    """``(client_app module, task module)`` of the user's app that reads its data from
    node-config ``dataset-path``."""
    pkg = tmp_path / "userapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(USER_TASK)
    (pkg / "client_app.py").write_text(PRIVATE_CLIENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("userapp")]:
        del sys.modules[name]
    return importlib.import_module("userapp.client_app"), importlib.import_module("userapp.task")


def _write_folder(task, root, seed: int) -> None:
    """A node's private data: an on-disk Hugging Face DatasetDict (img, label)."""
    from datasets import Dataset, DatasetDict

    def table(blobs):
        return Dataset.from_dict({"img": blobs.x[:, 0].tolist(), "label": blobs.y.tolist()})

    DatasetDict({"train": table(task.Blobs(48, seed=seed)),
                 "test": table(task.Blobs(16, seed=seed + 1))}).save_to_disk(str(root))


@pytest.fixture()
def private_grid(local_grid, tmp_path):
    """``private_grid(app, task) -> (grid, inbox by node id)``: 3 nodes whose node-config
    holds only ``dataset-path`` (a folder of their own) and ``inbox``, as a deployment's
    SuperNodes started without ``partition-id``."""

    def make(app, task, num_nodes=3):
        configs = {}
        for i in range(num_nodes):
            _write_folder(task, tmp_path / f"data-{i}", seed=100 + i)
            configs[i] = {"dataset-path": str(tmp_path / f"data-{i}"),
                          "inbox": str(tmp_path / f"inbox-{i}")}
        grid = local_grid(app, num_nodes, {}, configs, run_id=USER_RUN_ID, arrival="sent")
        for context in grid.contexts.values():  # what the SuperNode was started with
            del context.node_config["partition-id"], context.node_config["num-partitions"]
            assert set(context.node_config) == {"dataset-path", "inbox"}
        return grid, {n: c.node_config["inbox"] for n, c in grid.contexts.items()}

    return make


def _fedavg(grid, task, rounds=1):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    torch.manual_seed(0)
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid, ArrayRecord(task.Net().state_dict()), num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.05})).arrays


def _audit(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_node_without_a_partition_id_has_its_own_request_honoured(
        private_app, private_grid, tmp_path):
    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = private_app
    grid, inboxes = private_grid(client_app.app, task)
    nodes = sorted(inboxes)
    filed = {}  # node -> (inbox id, the class its data owner asks to forget)
    for cls, node in enumerate(nodes):
        filed[node] = (Inbox(inboxes[node]).file(scope="class", classes=[cls]).id, cls)
    arrays = _fedavg(grid, task)
    outcome = serve(grid, arrays, FineTune(Recovery(rounds=1, server_momentum=0.0, lr=0.05)),
                    output_dir=tmp_path / "out")
    assert outcome.report["rejected"] == []
    accepted = {a["node_id"]: a for a in outcome.report["accepted"]}
    assert sorted(accepted) == nodes
    for node, (request_id, cls) in filed.items():
        assert accepted[node]["classes"] == [cls]  # bound to the node that filed it
        assert "partition_id" not in accepted[node]
        history = Inbox(inboxes[node]).events(request_id)
        assert [e["status"] for e in history] == ["sent", "accepted", "honoured"]
        assert all(e["node"] == node for e in history)
    assert outcome.methods["ft"].status == "honoured", outcome.methods["ft"].reason
    # The nodes reported no partition; the server's view labels each by its node id.
    reports = [r.content["node"] for r in grid.replies if "node" in r.content]
    assert len(reports) == 3 and all("partition-id" not in r for r in reports)
    events = _audit(tmp_path / "out" / "audit.jsonl")
    (verified,) = [e for e in events if e["event"] == "federation.verified"]
    assert {int(n): p for n, p in verified["nodes"].items()} == {n: n for n in nodes}
    assert sorted(e["node"] for e in events if e["event"] == "request.accepted") == nodes
    # Each class-wise target trained on its own retained data, with its own forget set.
    retained = {int(m.metadata.dst_node_id): list(m.content["config"]["forget.classes"])
                for m in grid.sent if m.metadata.message_type == "train.retained"}
    assert retained == {node: [cls] for node, (_, cls) in filed.items()}


def test_a_request_from_one_node_is_never_attributed_to_another(private_app, private_grid,
                                                               tmp_path):
    """Node B files; its request, its receipts and its forget set stay B's. A node that
    names a partition in its request (it holds none) is refused, never served as
    another's."""
    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.inbox import Inbox
    from fedunlearn.requests import REQUEST_RECORD

    client_app, task = private_app
    grid, inboxes = private_grid(client_app.app, task)
    a, b, c = sorted(inboxes)
    filed = Inbox(inboxes[b]).file(scope="class", classes=[2]).id
    Inbox(inboxes[c]).file(scope="client")

    def claims_partition_zero(node, reply):  # node C names "partition 0" in its request
        if node == c and not reply.has_error() and REQUEST_RECORD in reply.content:
            reply.content[REQUEST_RECORD]["partition-id"] = 0
        return reply

    grid.tamper = claims_partition_zero
    arrays = _fedavg(grid, task)
    before = len(grid.sent)
    outcome = serve(grid, arrays, FineTune(Recovery(rounds=1, server_momentum=0.0, lr=0.05)),
                    output_dir=tmp_path / "out")
    assert [(r["node_id"], r["classes"]) for r in outcome.report["accepted"]] == [(b, [2])]
    (rejected,) = outcome.report["rejected"]
    assert rejected["node_id"] == c
    assert "asked to forget partition 0" in rejected["reason"]
    assert "a node can only have its own data forgotten" in rejected["reason"]
    assert [e["status"] for e in Inbox(inboxes[b]).events(filed)][-1] == "honoured"
    assert Inbox(inboxes[a]).entries()[0] == []  # nothing was written to A's inbox
    sent = [(int(m.metadata.dst_node_id), m.metadata.message_type) for m in grid.sent[before:]
            if m.metadata.message_type.startswith("train")]
    assert (b, "train.retained") in sent and (a, "train") in sent and (c, "train") in sent
    assert (a, "train.retained") not in sent


def test_service_mode_serves_nodes_without_partition_ids(private_app, private_grid, tmp_path):
    """UnlearningService verifies the nodes once (labelled by node id) and serves
    requests filed later, each bound to its node (it used to reject every node but one:
    "the node now claims partition 0, but it was verified holding partition 1")."""
    from fedunlearn import NoT, Recovery, ServiceConfig, UnlearningService
    from fedunlearn.inbox import Inbox

    client_app, task = private_app
    grid, inboxes = private_grid(client_app.app, task)
    a, b, c = sorted(inboxes)
    filed = {}

    def on_round(rnd, info):
        if rnd == 1:
            filed[b] = Inbox(inboxes[b]).file(scope="class", classes=[1]).id
            filed[c] = Inbox(inboxes[c]).file(scope="class", classes=[3]).id

    method = NoT(Recovery(rounds=1, lr=0.05, server_momentum=0.0), model_fn=task.Net,
                 example_input=torch.zeros(1, 1, 8, 8))
    service = UnlearningService(method, state_dir=tmp_path / "state",
                                config=ServiceConfig(rounds=3, lr=0.05), on_round=on_round)
    outcome = service.run(grid, _fedavg(grid, task))
    served = sorted(t for step in outcome.steps for t in step["targets"])
    assert served == [b, c]
    for node, request_id in filed.items():
        assert [e["status"] for e in Inbox(inboxes[node]).events(request_id)][-1] == "honoured"
    events = _audit(tmp_path / "state" / "audit.jsonl")
    assert not [e for e in events if e["event"] == "request.rejected"]


def test_partition_id_stays_an_option_and_a_bad_one_is_named(private_app, tmp_path):
    """A simulation's node keeps its partition id (it seeds the node's draws, as
    before); a node without one draws from its dataset-path; a bad value is refused
    by name."""
    from flwr.app import Context, RecordDict

    from fedunlearn.client.plugin import build_view

    _, task = private_app
    _write_folder(task, tmp_path / "d", seed=5)
    _write_folder(task, tmp_path / "e", seed=6)

    def view(node_id, **node_config):
        from fedunlearn.client import node_dataset

        context = Context(run_id=1, node_id=node_id, node_config=node_config,
                          state=RecordDict(), run_config={})
        return build_view(context, task.Net, node_dataset, None, None, None, None, None,
                          16, 0.9, 0, "cpu")

    path = str(tmp_path / "d")
    assert view(11, **{"dataset-path": path, "partition-id": 3}).draw_id == 3
    private = view(11, **{"dataset-path": path})
    assert private.partition_id is None
    assert private.draw_id == view(12, **{"dataset-path": path}).draw_id  # not the node id
    assert private.draw_id != view(11, **{"dataset-path": str(tmp_path / "e")}).draw_id
    with pytest.raises(ValueError, match=r"partition-id='2'.*non-negative integer"):
        view(11, **{"dataset-path": path, "partition-id": "2"})


# -- scripts/deploy_local.sh --private-data: its settings, checked before anything starts --
def _deploy(tmp_path, *args, **env):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    full = {**os.environ, "FLWR_BIN_DIR": str(Path(sys.executable).parent),
            "WORKDIR": str(tmp_path / "work"), **env}
    done = subprocess.run(["bash", str(repo / "scripts" / "deploy_local.sh"), *args],
                          env=full, capture_output=True, text=True, timeout=300, cwd=repo)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="bash script, Linux")
def test_deploy_script_private_data_settings_are_checked_first(tmp_path):
    code, out = _deploy(tmp_path, "--private-data", APP=".")
    assert code == 2 and "needs partition-id on every node" in out
    code, out = _deploy(tmp_path, "--private-dat")
    assert code == 2 and "unknown option --private-dat" in out
    code, out = _deploy(tmp_path, "--private-data", "recovery-rounds=4",
                        DATASET_PATH_0=str(tmp_path / "missing"))
    assert code == 2 and f"DATASET_PATH_0={tmp_path / 'missing'} is not a folder" in out
    # The estimate comes first, from the example's defaults and the pairs given.
    assert "expected duration: about" in out and "(15 message waves to 3 SuperNodes)" in out
    assert not (tmp_path / "work" / "logs" / "superlink.log").exists()  # nothing started


def test_deploy_script_run_config_names_each_key_once_and_the_users_win():
    """flwr refuses a run-config that repeats a key: the script's own pairs, its
    defaults and the user's are merged, the later (the user's) winning."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "deploy_local.sh"
    body = script.read_text()
    function = body[body.index("merge_pairs() {"):]
    function = function[:function.index("\n}\n") + 3]
    merged = subprocess.run(
        ["bash", "-c", function + 'merge_pairs "$@"', "merge",
         'method="not"', 'output-dir="/o"', "pretrain.rounds=5", "unlearn.rounds=3",
         "pretrain.rounds=2", 'method="puf,not"'],
        capture_output=True, text=True, check=True).stdout
    assert merged == 'method="puf,not" output-dir="/o" pretrain.rounds=2 unlearn.rounds=3'

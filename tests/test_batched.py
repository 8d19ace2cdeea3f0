"""The in-process engine's batched mode (``LocalGrid(..., batch_clients=N)``): the plain
train messages of a round trained together with ``torch.func``, answered with the
replies the per-message handlers send: the same metrics, models equal within float32
rounding, bit-identical in chunks of one client; what cannot be batched goes through the
per-message path and the log says so once."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from torch import nn
from torch.utils.data import Dataset

import fedunlearn.batching
from fedunlearn.client import NodeView, action_handler
from fedunlearn.harness.models import create_model
from fedunlearn.engine import LocalGrid, load_components, project_root, server_identity
from fedunlearn.launch import default_run_config, main as fedunlearn_run
from fedunlearn.training import to_arrays

TOLERANCE = 1e-5
"""Largest |batched - per-message| accepted in a trained weight (measured: 1.2e-7)."""


class Blobs(Dataset):
    """Four classes of 8x8 images: a bright quadrant plus noise."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.targets = rng.integers(0, 4, size=n)
        x = rng.normal(0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
        for i, c in enumerate(self.targets):
            r, q = divmod(int(c), 2)
            x[i, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 1.5
        self.x = torch.from_numpy(x)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


class Net(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


SIZES = [5, 40, 17, 64, 33]  # training samples per node: 1 to 2 batches of 32


def user_app(norm: bool = False, train_fn=None, sizes=SIZES) -> ClientApp:
    """A user's ClientApp serving plain train messages with fedunlearn's local training
    over node ``partition-id``'s own data (``sizes[p]`` samples)."""
    data = {p: Blobs(n, seed=p) for p, n in enumerate(sizes)}

    def view_for(context) -> NodeView:
        p = int(context.node_config["partition-id"])
        return NodeView(dataset=data[p], train_ids=np.arange(sizes[p]),
                        val_ids=np.zeros(0, dtype=np.int64), label_array=data[p].targets,
                        model_fn=lambda: Net(norm), num_classes=4, partition_id=p,
                        device="cpu", train_fn=train_fn)

    app = ClientApp()
    app.train()(action_handler("default", view_for))
    return app


def round_of(app, batch_clients: int, config=None, norm: bool = False):
    """One round of plain train messages to every node; the grid and its replies."""
    grid = LocalGrid(app, len(SIZES), {}, run_id=5, batch_clients=batch_clients)
    torch.manual_seed(0)
    arrays = to_arrays(Net(norm))
    settings = {"lr": 0.05, "local-epochs": 2, "seed": 7, **(config or {})}
    with server_identity(5):
        sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(settings)}),
                        dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
        replies = list(grid.send_and_receive(sent))
    return grid, sent, replies


def weights(reply) -> dict:
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def assert_same_replies(a, b, exact: bool) -> None:
    assert [int(r.metadata.src_node_id) for r in a] == [int(r.metadata.src_node_id) for r in b]
    for x, y in zip(a, b):
        mx, my = dict(x.content["metrics"]), dict(y.content["metrics"])
        assert list(x.content) == list(y.content) and list(mx) == list(my)
        assert {k: mx[k] for k in mx if k != "train-loss"} == \
            {k: my[k] for k in my if k != "train-loss"}
        assert mx["train-loss"] == pytest.approx(my["train-loss"], abs=0 if exact else 1e-6)
        wx, wy = weights(x), weights(y)
        assert list(wx) == list(wy)
        for k in wx:
            if exact:
                assert np.array_equal(wx[k], wy[k]), k
            else:
                np.testing.assert_allclose(wx[k], wy[k], rtol=0, atol=TOLERANCE, err_msg=k)


@pytest.mark.parametrize("config", [{}, {"clip-norm": 0.5, "weight-decay": 1e-3}])
def test_batched_replies_equal_the_per_message_replies(config, single_thread):
    _, _, one_by_one = round_of(user_app(), 0, config)
    grid, sent, batched = round_of(user_app(), 8, config)
    assert grid.batched.trained == len(SIZES)  # every node in the batched pass
    assert_same_replies(one_by_one, batched, exact=False)
    assert [r.metadata.reply_to_message_id for r in batched] == \
        [m.metadata.message_id for m in sent]
    metrics = [r.content["metrics"] for r in batched]
    assert [m["num-examples"] for m in metrics] == SIZES
    assert [m["samples-processed"] for m in metrics] == [2 * n for n in SIZES]
    # Different data, different steps: the clients really trained apart.
    assert not np.array_equal(weights(batched[0])["fc.weight"], weights(batched[1])["fc.weight"])


def test_each_client_keeps_its_own_settings(single_thread):
    """Messages of one round with different lr, epochs, clipping and weight decay per
    node (a server may configure each node on its own) train batched as they would one
    by one."""
    def run(batch_clients):
        grid = LocalGrid(user_app(), len(SIZES), {}, run_id=5, batch_clients=batch_clients)
        torch.manual_seed(0)
        arrays = to_arrays(Net())
        with server_identity(5):
            sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({
                "lr": 0.02 * (i + 1), "local-epochs": 1 + i % 2, "seed": 7,
                "clip-norm": 0.5 * (i % 3), "weight-decay": 1e-3 * (i % 2)})}),
                dst_node_id=n, message_type="train")
                for i, n in enumerate(grid.get_node_ids())]
            return grid, list(grid.send_and_receive(sent))

    _, one_by_one = run(0)
    grid, batched = run(8)
    assert grid.batched.trained == len(SIZES)
    assert_same_replies(one_by_one, batched, exact=False)


def test_each_client_trains_from_the_model_its_message_carries(single_thread):
    """Messages of one delivery that carry different models (a server may send each node
    its own) train from their own model, batched as one by one (the batched mode decodes
    a model once for all the messages that carry its bytes)."""
    def run(batch_clients):
        grid = LocalGrid(user_app(), len(SIZES), {}, run_id=5, batch_clients=batch_clients)
        torch.manual_seed(0)
        models = [to_arrays(Net()), to_arrays(Net())]
        with server_identity(5):
            sent = [Message(RecordDict({"arrays": models[i % 2], "config": ConfigRecord(
                {"lr": 0.05, "local-epochs": 1, "seed": 7})}), dst_node_id=n,
                message_type="train") for i, n in enumerate(grid.get_node_ids())]
            return grid, list(grid.send_and_receive(sent))

    _, one_by_one = run(0)
    grid, batched = run(8)
    assert grid.batched.trained == len(SIZES)
    assert_same_replies(one_by_one, batched, exact=False)


def test_a_chunk_of_one_client_is_bit_identical(single_thread):
    config = {"clip-norm": 0.5, "weight-decay": 1e-3, "local-epochs": 3}
    _, _, one_by_one = round_of(user_app(), 0, config)
    grid, _, batched = round_of(user_app(), 1, config)
    assert grid.batched.trained == len(SIZES)
    assert_same_replies(one_by_one, batched, exact=True)


def test_chunks_hold_at_most_batch_clients(monkeypatch, single_thread):
    chunks = []
    train = fedunlearn.batching.train_batched

    def spy(model, jobs, device):
        chunks.append(len(jobs))
        return train(model, jobs, device)

    monkeypatch.setattr(fedunlearn.batching, "train_batched", spy)
    _, _, one_by_one = round_of(user_app(), 0)
    _, _, batched = round_of(user_app(), 2)
    assert sorted(chunks) == [1, 2, 2]
    assert_same_replies(one_by_one, batched, exact=False)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def job_log():
    handler = _Lines()
    FLOWER_LOGGER.addHandler(handler)
    try:
        yield handler.lines
    finally:
        FLOWER_LOGGER.removeHandler(handler)


def _user_train(model, loader, epochs, lr, device):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return 0.5


@pytest.mark.parametrize("norm, train_fn, why", [
    (True, None, "has buffers"),  # BatchNorm's running statistics
    (False, _user_train, "train_fn"),
])
def test_what_cannot_be_batched_goes_per_message_and_is_logged_once(norm, train_fn, why,
                                                                    job_log, single_thread):
    _, _, one_by_one = round_of(user_app(norm, train_fn), 0, norm=norm)
    grid = LocalGrid(user_app(norm, train_fn), len(SIZES), {}, run_id=5, batch_clients=8)
    for _ in range(2):  # two rounds on one grid: said once
        torch.manual_seed(0)
        arrays = to_arrays(Net(norm))
        with server_identity(5):
            sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                {"lr": 0.05, "local-epochs": 2, "seed": 7})}), dst_node_id=n,
                message_type="train") for n in grid.get_node_ids()]
            batched = list(grid.send_and_receive(sent))
    assert grid.batched.trained == 0
    assert_same_replies(one_by_one, batched, exact=True)
    said = [line for line in job_log if "per-message path" in line]
    assert len(said) == 1 and why in said[0], said


def test_other_actions_and_failures_get_the_per_message_replies(job_log, single_thread):
    grid = LocalGrid(user_app(), len(SIZES), {}, run_id=5, batch_clients=4)
    node = list(grid.get_node_ids())[0]
    with server_identity(5):
        arrays = to_arrays(Net())
        no_lr = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"local-epochs": 1})}), dst_node_id=node, message_type="train")
        other = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"lr": 0.1, "local-epochs": 1})}), dst_node_id=node, message_type="train.ga")
        failed, unknown = grid.send_and_receive([no_lr, other])
    assert failed.has_error() and "KeyError" in failed.error.reason and "lr" in \
        failed.error.reason
    assert unknown.has_error()  # no train.ga handler on this app: the handler path says so
    assert any("'ga' is not local training" in line for line in job_log)


def test_the_default_jobs_round_matches_per_message(single_thread):
    """The harness's ClientApp (the paper's CNN, LayerNorm) on synthetic non-IID data."""
    _, app, defaults = load_components(project_root())
    rc = {**default_run_config(), "federation.num-clients": 6, "dataset.name": "synthetic",
          "dataset.size": 600, "federation.partitioning": "dirichlet"}

    def run(batch_clients):
        grid = LocalGrid(app, 6, rc, run_id=3, batch_clients=batch_clients)
        with server_identity(3):
            sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                {"lr": 0.05, "local-epochs": 2, "seed": 2})}), dst_node_id=n,
                message_type="train") for n in grid.get_node_ids()]
            return grid, list(grid.send_and_receive(sent))

    torch.manual_seed(0)
    arrays = to_arrays(create_model("cnn", num_classes=10, in_channels=1, image_size=8))

    _, one_by_one = run(0)
    grid, batched = run(6)
    assert grid.batched.trained == 6
    assert len({r.content["metrics"]["num-examples"] for r in batched}) > 1  # non-IID sizes
    assert_same_replies(one_by_one, batched, exact=False)


def test_bad_batch_clients_are_refused(capsys):
    with pytest.raises(ValueError, match=r"batch_clients=-1: expected an integer >= 0"):
        LocalGrid(user_app(), 2, {}, batch_clients=-1)
    with pytest.raises(SystemExit):
        fedunlearn_run(["--batch-clients", "8", "method=ft"])
    assert "--batch-clients=8 is a mode of the in-process engine" in capsys.readouterr().err


def test_fedunlearn_run_batched_job_costs_and_metrics_as_per_message(tmp_path, capsys):
    """``fedunlearn-run --engine local --batch-clients 4``: the job's log says how much
    went batched; the metering sees the same messages, bytes and samples as the
    per-message job, and the accuracies agree. With one checkpoint cache for both, the
    batched job does not load the per-message job's pretrained model (its sums run in
    another float order): the cache key names the chunk."""
    results = {}
    for batch in (0, 4):
        out = tmp_path / f"out{batch}"
        assert fedunlearn_run([
            "--engine", "local", "--batch-clients", str(batch), "method=ft",
            "dataset.name=synthetic", "federation.num-clients=4", "pretrain.rounds=2",
            "unlearn.rounds=1", f"output-dir={out}", f"checkpoint-dir={tmp_path / 'ck'}",
            "eval.mia-max-members=40"]) == 0
        results[batch] = json.loads((out / "ft" / "results.json").read_text())
    log = (tmp_path / "out4" / "job.log").read_text()
    # 2 pretraining rounds x 4 clients + 1 FT round x 3 retained clients
    assert "batched engine: 11 of" in log
    assert "per-message path" not in log  # nothing else was a train message
    one_by_one, batched = results[0], results[4]
    assert not batched["pretrain"]["cached"]
    assert batched["pretrain"]["key"] != one_by_one["pretrain"]["key"]
    assert _without_wall(batched["cost"]) == _without_wall(one_by_one["cost"])
    for split in ("retain", "forget", "test"):
        assert batched["unlearned"][split] == pytest.approx(one_by_one["unlearned"][split],
                                                            abs=1.0)


def _without_wall(cost):
    """A cost record without its wall times (they depend on the machine)."""
    if isinstance(cost, dict):
        return {k: _without_wall(v) for k, v in cost.items() if k not in ("wall_s", "round_s")}
    return cost

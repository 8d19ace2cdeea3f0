"""fedunlearn on Flower's data as Flower apps hold it: quickstart-pytorch's ``load_data``
(DataLoaders over ``flwr-datasets`` partitions whose samples are dicts ``{"img",
"label"}`` after ``with_transform``), its ``train`` / ``test`` reading ``batch["img"]``,
attached unchanged. The user's package is written outside fedunlearn and imported from
there; the data is built locally (sklearn's digits as PIL images in a ``datasets.Dataset``
with an ``Image`` and a ``ClassLabel`` column), so nothing downloads."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from .helpers import node_ids

QUICK_TASK = '''
import numpy as np
import torch
import torch.nn as nn
from datasets import ClassLabel, Dataset, Features, Image, Value
from flwr_datasets.partitioner import IidPartitioner
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

SEEN = []  # every batch train() read: the test counts its samples


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2).flatten(1))


def digits(start, count):
    """sklearn's digits as a Hugging Face dataset: a stand-in for the hub's, built the
    same way (an Image column, a ClassLabel, and an id per sample for the test)."""
    d = load_digits()
    rows = range(start, start + count)
    return Dataset.from_dict(
        {"img": [PILImage.fromarray((d.images[i] * 15).astype(np.uint8)) for i in rows],
         "label": [int(d.target[i]) for i in rows], "uid": list(rows)},
        features=Features({"img": Image(), "label": ClassLabel(num_classes=10),
                           "uid": Value("int64")}))


partitioner = None
pytorch_transforms = Compose([ToTensor(), Normalize((0.5,), (0.5,))])


def apply_transforms(batch):
    batch["img"] = [pytorch_transforms(img) for img in batch["img"]]
    return batch


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    global partitioner
    if partitioner is None:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = digits(0, 80 * num_partitions)
    partition = partitioner.load_partition(partition_id)
    partition_train_test = partition.train_test_split(test_size=0.2, seed=42)
    partition_train_test = partition_train_test.with_transform(apply_transforms)
    trainloader = DataLoader(partition_train_test["train"], batch_size=batch_size,
                             shuffle=True)
    testloader = DataLoader(partition_train_test["test"], batch_size=batch_size)
    return trainloader, testloader


def load_centralized_dataset():
    return DataLoader(digits(1000, 300).with_transform(apply_transforms), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            SEEN.append({"type": type(batch).__name__, "keys": sorted(batch),
                         "uids": batch["uid"].tolist()})
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
'''

QUICK_CLIENT = '''
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn.client import attach
from quickapp.task import Net, load_data
from quickapp.task import test as test_fn
from quickapp.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(context.node_config["partition-id"],
                               context.node_config["num-partitions"],
                               context.run_config["batch-size"])
    train_loss = train_fn(model, trainloader, context.run_config["local-epochs"],
                          msg.content["config"]["lr"], "cpu")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": train_loss,
                                                   "num-examples": len(trainloader.dataset)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valloader = load_data(context.node_config["partition-id"],
                             context.node_config["num-partitions"],
                             context.run_config["batch-size"])
    eval_loss, eval_acc = test_fn(model, valloader, "cpu")
    return Message(content=RecordDict({"metrics": MetricRecord(
        {"eval_loss": eval_loss, "eval_acc": eval_acc,
         "num-examples": len(valloader.dataset)})}), reply_to=msg)


attach(app, model_fn=Net, train_fn=train_fn,
       data=lambda ctx: load_data(ctx.node_config["partition-id"],
                                  ctx.node_config["num-partitions"], 16))
'''

RUN_ID = 11
NODES = 3
NODE = node_ids(NODES, RUN_ID)
RUN_CONFIG = {"batch-size": 16, "local-epochs": 1}


@pytest.fixture()
def quickapp(tmp_path, monkeypatch, server_identity, single_thread):
    pkg = tmp_path / "quickapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(QUICK_TASK)
    (pkg / "client_app.py").write_text(QUICK_CLIENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("quickapp")]:
        del sys.modules[name]
    return importlib.import_module("quickapp.client_app"), importlib.import_module("quickapp.task")


def _pretrained(grid, task):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    torch.manual_seed(0)
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
        grid, ArrayRecord(task.Net().state_dict()), num_rounds=3,
        train_config=ConfigRecord({"lr": 0.1})).arrays


@pytest.mark.parametrize("scope", ["class", "instance"])
def test_flower_quickstart_data_is_served_and_train_never_sees_forgotten_samples(
        quickapp, tmp_path, local_grid, scope):
    import torch

    from fedunlearn import FineTune, NoT, Recovery, serve
    from fedunlearn.inbox import Inbox

    client_app, task = quickapp
    target = 1
    trainloader, testloader = task.load_data(target, NODES, 16)
    uids = np.asarray(trainloader.dataset["uid"])
    labels = np.asarray(trainloader.dataset["label"])
    inbox = Inbox(str(tmp_path / "inbox"))
    if scope == "class":
        request = inbox.file(scope="class", classes=[3])
        forgotten = uids[labels == 3]
    else:
        positions = [0, 5, 11, 20]  # positions in the node's training set
        request = inbox.file(scope="instance", sample_ids=positions)
        forgotten = uids[positions]
    assert forgotten.size
    grid = local_grid(client_app.app, NODES, RUN_CONFIG, {target: {"inbox": str(inbox.root)}},
                      run_id=RUN_ID, arrival="sent")
    arrays = _pretrained(grid, task)

    def evaluate(a):  # the user's own test() on the central test set
        net = task.Net()
        net.load_state_dict(a.to_torch_state_dict())
        return {"test": 100.0 * task.test(net, task.load_centralized_dataset(), "cpu")[1]}

    task.SEEN.clear()
    before = len(grid.sent)
    recovery = Recovery(rounds=2, lr=0.1, local_epochs=1, server_momentum=0.0,
                        stop="validation", patience=5)
    outcome = serve(grid, arrays, [NoT(recovery, model_fn=task.Net, example_input=torch.zeros(1, 1, 8, 8)),
                                    FineTune(recovery)],
                    output_dir=tmp_path / "out", evaluate_fn=evaluate)
    (accepted,) = outcome.report["accepted"]
    assert accepted["node_id"] == NODE[target] and accepted["scope"] == scope
    for name in ("not", "ft"):
        m = outcome.methods[name]
        assert m.status == "honoured", m.reason
        assert m.metrics["test"] > 30.0 and 0.0 <= m.metrics["forget"] <= 100.0
    assert inbox.events(request.id)[-1]["status"] == "honoured"
    # The user's train() got its own dict batches, and none held a forgotten sample.
    assert task.SEEN and all(b["type"] == "dict" and b["keys"] == ["img", "label", "uid"]
                             for b in task.SEEN)
    seen = np.concatenate([b["uids"] for b in task.SEEN])
    assert int(np.isin(seen, forgotten).sum()) == 0
    # Every retained sample of the target, once per train.retained message (one epoch).
    retained_msgs = [m for m in grid.sent[before:] if m.metadata.message_type ==
                     "train.retained" and int(m.metadata.dst_node_id) == NODE[target]]
    assert len(retained_msgs) >= 2  # at least one round per method (validation may stop)
    target_seen = seen[np.isin(seen, uids)]
    assert target_seen.size == (uids.size - forgotten.size) * len(retained_msgs)
    # Flower's (trainloader, testloader): the second is the node's validation set.
    val_replies = [r.content["metrics"] for r in grid.replies
                   if r.metadata.message_type == "evaluate.unlearn" and r.has_content()
                   and "val-total" in r.content["metrics"]
                   and int(r.metadata.src_node_id) == NODE[0]]
    assert val_replies and val_replies[0]["val-total"] == len(task.load_data(0, NODES, 16)[1]
                                                              .dataset)


def _table(n=12, extra=None, with_transform=True):
    """A small Hugging Face dataset: random 8x8 images (``Image``) and a ``ClassLabel``."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    columns = {"img": [PILImage.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
                       for _ in range(n)], "label": [i % 4 for i in range(n)]}
    features = {"img": Image(), "label": ClassLabel(num_classes=4)}
    for name, (feature, values) in (extra or {}).items():
        columns[name], features[name] = values, feature
    table = Dataset.from_dict(columns, features=Features(features))
    if not with_transform:
        return table
    from torchvision.transforms import ToTensor

    def to_tensors(batch):
        batch["img"] = [ToTensor()(img) for img in batch["img"]]
        return batch

    return table.with_transform(to_tensors)


class _Pairs:
    """A map-style dataset yielding ``(x, y)`` pairs."""

    def __init__(self, n=10, item=None):
        import torch

        self.x, self.y = torch.randn(n, 1, 8, 8), [i % 4 for i in range(n)]
        self.item = item

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.item(i) if self.item else (self.x[i], self.y[i])


def _attach(**kwargs):
    from flwr.clientapp import ClientApp

    from fedunlearn.client import attach

    return attach(ClientApp(), model_fn=lambda: None, **kwargs)


def _bad_inputs():
    import torch
    from datasets import ClassLabel
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 8, 8), 0

    two_labels = {"coarse": (ClassLabel(num_classes=2), [i % 2 for i in range(12)])}
    return [
        # (attach's arguments, error type, what the message must say)
        ({"data": DataLoader(Stream())}, TypeError,
         r"data: expected a map-style dataset .* got a DataLoader over Stream"),
        ({"data": [3, 4, 5]}, TypeError, r"data: expected samples \(x, y\) or dicts, got int"),
        ({"data": _Pairs(item=lambda i: (0, 1, 2))}, TypeError,
         r"data: expected samples .* got tuple of length 3"),
        ({"data": _Pairs(), "val_data": "val.csv"}, TypeError,
         r"val_data: expected a map-style dataset .* got str"),
        ({"data": _table(), "image_key": "image"}, KeyError,
         r"image_key='image': data's samples have no such key \(keys: \['img', 'label'\]\)"),
        ({"data": _table(), "label_key": 1}, TypeError, r"label_key: expected a column name"),
        ({"data": _table(extra=two_labels)}, ValueError,
         r"data: dict samples with several label columns \(label, coarse\) .*"
         r"img: Image, label: ClassLabel, coarse: ClassLabel.*label_key="),
        ({"data": [{"a": torch.zeros(1, 8, 8), "b": torch.zeros(1, 8, 8), "y": 1}]},
         ValueError, r"several image columns \(a, b\) by the dataset's first sample .*"
         r"image_key="),
        ({"data": _Pairs(), "image_key": "img"}, TypeError,
         r"image_key / label_key name the columns of dict samples, and data .* yields tuple"),
        ({"data": (_Pairs(), _Pairs(), _Pairs())}, ValueError,
         r"data: data\(context\) returned a tuple of 3"),
        ({"data": (_Pairs(), _Pairs(4)), "val_data": _Pairs()}, ValueError,
         r"val_data: given to attach\(\) while data\(context\) also returns"),
        ({"data": _Pairs(10), "labels": [0, 1, 2]}, ValueError,
         r"labels: expected one non-negative integer class index per sample, 10 in all "
         r"\(10 training then 0 validation\).* got shape \(3,\)"),
        ({"data": _Pairs(2), "labels": [[0, 1], [1]]}, TypeError,
         r"labels: expected .* got a list that is not a flat array"),
        ({"data": _Pairs(2), "labels": ["cat", "dog"]}, TypeError,
         r"labels: expected .* got values of type <U3 \(first: np.str_\('cat'\)\)"),
        ({"data": _Pairs(2), "labels": np.zeros((2, 1), dtype=int)}, ValueError,
         r"labels: expected .* got shape \(2, 1\)"),
        ({"data": _Pairs(2), "labels": 7}, TypeError, r"labels: expected .* got int"),
        ({"data": _Pairs(2), "labels": [0, -1]}, ValueError,
         r"labels: expected .* got -1 at position 1"),
    ]


@pytest.mark.parametrize("kwargs, error, message", _bad_inputs())
def test_bad_data_is_refused_by_argument_with_what_arrived(kwargs, error, message):
    with pytest.raises(error, match=message):
        _attach(**kwargs)


def test_every_shape_of_flower_data_is_accepted_at_attach():
    """What Flower apps hold: (x, y) datasets, DataLoaders (with or without a custom
    collate), HF datasets with or without a transform and named keys, (train, val) and a
    DatasetDict."""
    from torch.utils.data import DataLoader

    table = _table()
    split = table.train_test_split(test_size=0.25, seed=0)
    for data in (_Pairs(), DataLoader(_Pairs(), batch_size=3, collate_fn=lambda b: b),
                 table, _table(with_transform=False), DataLoader(table, batch_size=4),
                 (DataLoader(split["train"]), DataLoader(split["test"])), split):
        _attach(data=data)
    _attach(data=table, image_key="img", label_key="label", labels=[0] * 12)

    def renamed(batch):  # a transform that renames the image column
        from torchvision.transforms import ToTensor

        return {"pixel_values": [ToTensor()(img) for img in batch["img"]],
                "label": batch["label"]}

    _attach(data=_table(with_transform=False).with_transform(renamed))


def test_fedunlearns_own_loops_refuse_dict_samples_by_name():
    import torch

    from fedunlearn.metrics import predict

    with pytest.raises(TypeError, match=r"got a dict with keys \['img', 'label'\].*"
                                        r"attach\(\.\.\., image_key=\.\.\., label_key"):
        predict(torch.nn.Flatten(), _table(), [0, 1])


def test_a_dataloaders_batch_size_and_collate_reach_train_fn(tmp_path, local_grid,
                                                             server_identity, single_thread):
    """A DataLoader with the user's own collate_fn and batch size: their train_fn gets
    exactly those batches, over the retained samples only."""
    import torch
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp
    from torch.utils.data import DataLoader

    from fedunlearn import FineTune, Recovery, serve
    from fedunlearn.client import attach
    from fedunlearn.inbox import Inbox

    def net():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))

    def collate(samples):  # the user's own batch format
        return {"pixels": torch.stack([x for x, _ in samples]),
                "target": torch.tensor([y for _, y in samples])}

    got = []

    def train(model, loader, epochs, lr, device):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(epochs):
            for batch in loader:
                got.append(batch)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(batch["pixels"]),
                                                  batch["target"]).backward()
                optimizer.step()
        return 0.0

    app = attach(ClientApp(), model_fn=net, train_fn=train, train_handler=True,
                 data=lambda ctx: DataLoader(_Pairs(20), batch_size=6, collate_fn=collate))
    inbox = Inbox(str(tmp_path / "inbox"))
    inbox.file(scope="class", classes=[1])  # 5 of node 0's 20 samples
    grid = local_grid(app, 2, {}, {0: {"inbox": str(inbox.root)}}, run_id=RUN_ID,
                      arrival="sent")
    outcome = serve(grid, ArrayRecord(net().state_dict()),
                    FineTune(Recovery(rounds=1, server_momentum=0.0)),
                    output_dir=tmp_path / "out")
    assert outcome.methods["ft"].status == "honoured", outcome.methods["ft"].reason
    assert all(sorted(b) == ["pixels", "target"] for b in got)
    # node 0 trains its 15 retained samples (6, 6, 3), node 1 all 20 (6, 6, 6, 2)
    assert sorted(len(b["target"]) for b in got) == [2, 3, 6, 6, 6, 6, 6]
    assert sum(int((b["target"] == 1).sum()) for b in got) == 5  # node 1's class 1 only

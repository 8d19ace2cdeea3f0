"""unlearningexample: the user's ClientApp, plus fedunlearn (the lines marked +)."""

import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from fedunlearn.client import attach, node_dataset  # +
from fedunlearn.inbox import Inbox  # +
from unlearningexample.task import Net, load_data, test as test_fn, train as train_fn

app = ClientApp()


def my_data(context: Context):
    """The node's data: its own folder on a deployment (node-config dataset-path),
    its partition of digits in a simulation."""
    if "dataset-path" in context.node_config:
        return node_dataset(context)  # +
    return load_data(context.node_config["partition-id"], context.node_config["num-partitions"])


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainset, _ = my_data(context)
    loss = train_fn(model, DataLoader(trainset, batch_size=32, shuffle=True),
                    context.run_config["local-epochs"], msg.content["config"]["lr"], "cpu")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss,
                                                   "num-examples": len(trainset)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valset = my_data(context)
    loss, acc = test_fn(model, DataLoader(valset, batch_size=64), "cpu")
    content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc,
                                                   "num-examples": len(valset)})})
    return Message(content=content, reply_to=msg)


def my_inbox(context: Context) -> str:  # +
    """Simulation only: each node's request inbox in a temp folder, and the data owner
    of partition ``forget-partition`` files a request there (on a deployment the owner
    runs ``fedunlearn request file --inbox ...`` and the node-config names the inbox)."""
    rc, pid = context.run_config, context.node_config["partition-id"]  # +
    root = Path(rc["inbox-root"] or tempfile.gettempdir()) / f"inbox-{context.run_id}-{pid}"  # +
    inbox = Inbox(str(root))  # +
    if pid == rc["forget-partition"] and not inbox.entries()[0]:  # +
        classes = [int(c) for c in str(rc["forget-classes"]).split(",")]  # +
        inbox.file(scope=rc["forget-scope"], classes=classes if rc["forget-scope"] == "class" else ())  # +
    return str(root)  # +


attach(app, model_fn=Net, data=my_data, train_fn=train_fn, inbox=my_inbox)  # +

"""Plain Flower ClientApp: local SGD on the node's partition (fedunlearn's data split and
training loop, so only the orchestration differs from fedunlearn's)."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn.harness.data import build_federated_data
from fedunlearn.harness.models import create_model
from fedunlearn.training import load_arrays, resolve_device, to_arrays, train_local

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc, pid = context.run_config, int(context.node_config["partition-id"])
    data = build_federated_data("digits", int(rc["num-clients"]), seed=int(rc["seed"]))
    info = data.info
    model = create_model("cnn", num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size)
    load_arrays(model, msg.content["arrays"])
    config = msg.content["config"]
    stats = train_local(model, data.train, data.train_indices(pid), epochs=1, batch_size=32,
                        lr=float(config["lr"]), momentum=0.9, device=resolve_device("auto"),
                        seed=int(config["server-round"]) * 1000 + pid)
    return Message(RecordDict({"arrays": to_arrays(model),
                               "metrics": MetricRecord({"num-examples": stats.num_examples})}),
                   reply_to=msg)

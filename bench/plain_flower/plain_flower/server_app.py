"""Plain Flower ServerApp: Flower's FedAvg, one warm-up round (actor start-up), then
``rounds`` timed rounds; the end time of every round goes to the ``timings`` file."""

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedunlearn.harness.models import create_model
from fedunlearn.training import to_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n = int(rc["num-clients"])
    torch.manual_seed(int(rc["seed"]))
    arrays = to_arrays(create_model("cnn", num_classes=10, in_channels=1, image_size=8))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    config = ConfigRecord({"lr": float(rc["lr"])})
    warm = strategy.start(grid, arrays, num_rounds=1, train_config=config)
    stamps = [time.perf_counter()]

    def stamp(server_round: int, current: ArrayRecord):
        if server_round > 0:
            stamps.append(time.perf_counter())
        return None

    strategy.start(grid, warm.arrays, num_rounds=int(rc["rounds"]), train_config=config,
                   evaluate_fn=stamp)
    with open(str(rc["timings"]), "w") as f:
        json.dump(stamps, f)

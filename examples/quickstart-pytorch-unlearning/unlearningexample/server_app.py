"""unlearningexample: the user's ServerApp (Flower's FedAvg), then unlearning (+)."""

from pathlib import Path
import tempfile

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx
from torch.utils.data import DataLoader

from fedunlearn import FineTune, NoT, PUF, Recovery, ServiceConfig, UnlearningService, serve  # +
from unlearningexample.task import Net, load_test, test

app = ServerApp()

# The Flower strategy that aggregates the recovery rounds (run-config recovery-strategy);
# "fedavgm": fedunlearn's default, FedAvgM with the Recovery's server momentum.
RECOVERY_STRATEGIES = {  # +
    "fedavgm": lambda: None,
    "fedavg": lambda: FedAvg(min_train_nodes=1, min_available_nodes=1),
    "fedadam": lambda: FedAdam(min_train_nodes=1, min_available_nodes=1, eta=0.01),
    "fedmedian": lambda: FedMedian(min_train_nodes=1, min_available_nodes=1),
    "fedprox": lambda: FedProx(min_train_nodes=1, min_available_nodes=1, proximal_mu=0.01),
}


def evaluate(arrays: ArrayRecord) -> dict:
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    _, acc = test(net, DataLoader(load_test(), batch_size=128), "cpu")
    return {"test": 100.0 * acc}


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    torch.manual_seed(0)
    result = FedAvg(fraction_train=rc["fraction-train"]).start(
        grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": rc["lr"]}), num_rounds=rc["num-server-rounds"])
    print(f"after FedAvg: test accuracy {evaluate(result.arrays)['test']:.2f}%")

    recovery = Recovery(rounds=rc["recovery-rounds"], lr=rc["lr"], server_momentum=0.5)  # +
    if rc["recovery-strategy"] not in RECOVERY_STRATEGIES:  # +
        raise ValueError(f"recovery-strategy={rc['recovery-strategy']!r}; choose from "
                         f"{sorted(RECOVERY_STRATEGIES)}")
    aggregation = RECOVERY_STRATEGIES[rc["recovery-strategy"]]()  # +
    methods = {"not": NoT(recovery, model_fn=Net, example_input=torch.zeros(1, 1, 8, 8),  # +
                          aggregation=aggregation),  # +
               "ft": FineTune(recovery, aggregation=aggregation),  # +
               "puf": PUF(recovery, aggregation=aggregation)}  # +
    out = rc["output-dir"] or tempfile.mkdtemp(prefix="unlearning-")
    if rc["service-rounds"]:  # + service mode: train on, serve requests as they arrive
        service = UnlearningService(methods[rc["methods"].split(",")[0]], state_dir=out,  # +
                                    config=ServiceConfig(rounds=rc["service-rounds"], lr=rc["lr"],  # +
                                                         local_epochs=rc["local-epochs"]),  # +
                                    evaluate_fn=evaluate)  # +
        print(service.run(grid, result.arrays).steps)  # +
        return  # +
    outcome = serve(grid, result.arrays, [methods[m] for m in rc["methods"].split(",")],  # +
                    output_dir=out, evaluate_fn=evaluate)  # +
    print(outcome.table())  # +

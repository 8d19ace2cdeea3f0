"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedunlearn import ExcludeForgotten, FineTune, NoT, PUF, Recovery, serve  # fedunlearn

from pytorchexample.task import Net, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["learning-rate"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_evaluate=fraction_evaluate)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )

    out, recovery = context.run_config["output-dir"], Recovery(rounds=context.run_config["recovery-rounds"])  # fedunlearn
    methods = [NoT(recovery, model_fn=Net, example_input=torch.zeros(1, 3, 32, 32)), FineTune(recovery), PUF(recovery)]  # fedunlearn
    outcome = serve(grid, result.arrays, methods, output_dir=out, evaluate_fn=global_evaluate)  # fedunlearn
    print(outcome.table())  # fedunlearn
    result = ExcludeForgotten(strategy, output_dir=out).start(  # fedunlearn
        grid=grid, initial_arrays=outcome.arrays, train_config=ConfigRecord({"lr": lr}),  # fedunlearn
        num_rounds=context.run_config["rounds-after"], evaluate_fn=global_evaluate)  # fedunlearn

    # Save final model to disk
    print("\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate model on central data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load entire test set
    test_dataloader = load_centralized_dataset()

    # Evaluate the global model on the test set
    test_loss, test_acc = test(model, test_dataloader, device)

    # Return the evaluation metrics
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})

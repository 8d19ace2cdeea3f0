"""Flower ServerApp: wires the run-config to :func:`fedunlearn.harness.run.run_experiment`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedunlearn.harness.run import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, context.run_config)

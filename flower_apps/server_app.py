"""Flower ServerApp: wires the run-config to :func:`fedunlearn.server.run_experiment`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedunlearn.server import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, context.run_config)

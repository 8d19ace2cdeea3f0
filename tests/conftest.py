"""Shared fixtures."""

from collections.abc import Iterator

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def server_identity(monkeypatch):
    """Messages built by server-side code need a run id, as inside a running ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models run much faster on one intra-op thread, especially on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def local_grid():
    """The tests' federation: ``local_grid(client_app, num_nodes, run_config,
    node_configs=None, *, run_id=GRID_RUN_ID, arrival="reversed", tamper=None)`` returns a
    :class:`tests.helpers.RecordingGrid`, fedunlearn's in-process
    :class:`~fedunlearn.engine.LocalGrid` (every node answers with the real ``client_app``
    on its own Context: node-config ``partition-id``/``num-partitions`` plus
    ``node_configs[partition]``, state kept across messages) that keeps what crossed it
    (``sent``, ``replies``). Its node ids are LocalGrid's, drawn from the run id:
    ``grid.node_id(partition)``, ``grid.partitions``, or ``tests.helpers.NODE_ID`` /
    ``node_ids()`` before the grid exists."""

    from .helpers import RecordingGrid  # here: conftest loads for every test file

    def make(client_app, num_nodes: int, run_config, node_configs=None,
             **options) -> RecordingGrid:
        return RecordingGrid(client_app, num_nodes, run_config, node_configs, **options)

    return make

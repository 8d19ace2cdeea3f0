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

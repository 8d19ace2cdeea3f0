"""One request lifecycle: serve(), the experiment harness and service mode take the same
code path (fedunlearn.lifecycle.run_method) from accepted requests and a method to a
published outcome, and leave the same audit records for one honoured and one failed
request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedunlearn import FineTune, Recovery, ServeError, ServiceConfig, UnlearningFailed, serve
from fedunlearn.inbox import Inbox
from tests.test_plugin import fedavg, user_grid, userapp  # noqa: F401  (fixtures)

#: The records a method run leaves, in order (everything else is the job's own).
LIFECYCLE = ("method.refused", "unlearning.started", "unlearning.finished",
             "unlearning.failed", "request.honoured", "request.failed")
HONOURED = ["unlearning.started", "unlearning.finished", "request.honoured"]
FAILED = ["unlearning.started", "unlearning.failed", "request.failed"]


class Breaks(FineTune):
    """FT whose unlearning step cannot finish."""

    name = "breaks"

    def unlearning_step(self, grid, arrays):
        raise UnlearningFailed("the unlearning step broke (on purpose)")


def lifecycle_events(state_dir: Path) -> list[str]:
    lines = (state_dir / "audit.jsonl").read_text().splitlines()
    return [e["event"] for e in map(json.loads, lines) if e["event"] in LIFECYCLE]


@pytest.fixture
def calls(monkeypatch):
    """Every call of the one lifecycle function, by method and status."""
    import fedunlearn.lifecycle as lifecycle

    seen, real = [], lifecycle.run_method

    def spy(strategy, *args, **kwargs):
        run = real(strategy, *args, **kwargs)
        seen.append((run.method, run.status))
        return run

    for module in ("fedunlearn.serving", "fedunlearn.service.steps", "fedunlearn.harness.run"):
        monkeypatch.setattr(f"{module}.run_method", spy)
    return seen


def test_serve_takes_the_lifecycle(userapp, user_grid, tmp_path, calls):
    client_app, task = userapp
    recovery = Recovery(rounds=1, server_momentum=0.0, lr=0.05)
    grid = user_grid(client_app.app, inboxes={0: tmp_path / "i0", 1: tmp_path / "i1"})
    arrays = fedavg(grid, task, rounds=1)
    Inbox(str(tmp_path / "i0")).file(scope="client")
    serve(grid, arrays, [FineTune(recovery)], output_dir=tmp_path / "ok")
    Inbox(str(tmp_path / "i1")).file(scope="client")
    with pytest.raises(ServeError, match="breaks failed: UnlearningFailed"):
        serve(grid, arrays, [Breaks(recovery)], output_dir=tmp_path / "broken")
    assert calls == [("ft", "honoured"), ("breaks", "failed")]
    assert lifecycle_events(tmp_path / "ok") == HONOURED
    assert lifecycle_events(tmp_path / "broken") == FAILED


def test_service_mode_takes_the_lifecycle(userapp, user_grid, tmp_path, calls):
    from fedunlearn import UnlearningService

    client_app, task = userapp
    recovery = Recovery(rounds=1, server_momentum=0.0, lr=0.05)
    for name, method in (("ok", FineTune(recovery)), ("broken", Breaks(recovery))):
        inbox = tmp_path / f"inbox-{name}"
        grid = user_grid(client_app.app, inboxes={0: inbox})
        arrays = fedavg(grid, task, rounds=1)
        Inbox(str(inbox)).file(scope="client")
        UnlearningService(method, state_dir=tmp_path / name,
                          config=ServiceConfig(rounds=2, lr=0.05, method_retries=0)
                          ).run(grid, arrays)
    assert calls == [("ft", "honoured"), ("breaks", "failed")]
    assert lifecycle_events(tmp_path / "ok") == HONOURED
    assert lifecycle_events(tmp_path / "broken") == FAILED


def test_the_harness_takes_the_lifecycle(tmp_path, calls, monkeypatch):
    from fedunlearn import strategies as strategies_pkg
    from fedunlearn.engine import run_app
    from fedunlearn.strategies import register_method

    monkeypatch.setattr(strategies_pkg, "_METHODS", strategies_pkg._METHODS.copy())
    register_method("breaks")(Breaks)
    torch.set_num_threads(1)
    rc = {"dataset.name": "synthetic", "federation.num-clients": 3, "pretrain.rounds": 1,
          "unlearn.rounds": 1, "checkpoint-dir": str(tmp_path / "ckpt")}
    run_app({**rc, "method": "ft", "output-dir": str(tmp_path / "ok")}, 3)
    with pytest.raises(UnlearningFailed, match="breaks: UnlearningFailed: the unlearning step"):
        run_app({**rc, "method": "breaks", "output-dir": str(tmp_path / "broken")}, 3)
    assert calls == [("ft", "honoured"), ("breaks", "failed")]
    assert lifecycle_events(tmp_path / "ok") == HONOURED
    assert lifecycle_events(tmp_path / "broken") == FAILED

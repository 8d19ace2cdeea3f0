"""Service mode (fedunlearn.UnlearningService) from a user's own app: continuous
training, requests served as they arrive, versions, checkpoint/resume, dropouts, the
node's own check on the receipt. The user's package is the one tests/test_plugin.py
writes outside fedunlearn; every message reaches the user's ClientApp."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_plugin import UserGrid, fedavg, userapp  # noqa: F401  (fixture)


def _service(task, tmp_path, method=None, **config):
    from fedunlearn import NoT, Recovery, ServiceConfig, UnlearningService

    method = method or NoT(Recovery(rounds=2, lr=0.05, server_momentum=0.0),
                           model_fn=task.Net, example_input=torch.zeros(1, 1, 8, 8))
    testset = task.Blobs(64, seed=999)

    def evaluate(a):
        net = task.Net()
        net.load_state_dict(a.to_torch_state_dict())
        return {"test": task.test(net, testset)}

    return UnlearningService(method, state_dir=tmp_path / "state",
                             config=ServiceConfig(**{"rounds": 6, "lr": 0.05, **config}),
                             evaluate_fn=evaluate)


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_requests_arriving_while_training_are_served_and_training_goes_on(userapp, tmp_path):
    from fedunlearn import read_versions
    from fedunlearn.inbox import Inbox

    client_app, task = userapp
    inboxes = {i: tmp_path / f"inbox-{i}" for i in range(4)}
    grid = UserGrid(client_app.app, inboxes=inboxes)
    arrays = fedavg(grid, task, rounds=2)
    filed = {}

    def on_round(rnd, info):
        if rnd == 2:
            filed["client"] = Inbox(str(inboxes[0])).file(scope="client").id
        if rnd == 4:
            filed["class"] = Inbox(str(inboxes[2])).file(scope="class", classes=[1]).id

    service = _service(task, tmp_path, rounds=6)
    service.on_round = on_round
    before = len(grid.sent)
    outcome = service.run(grid, arrays)
    assert outcome.round == 6 and len(outcome.steps) == 2
    assert [s["round"] for s in outcome.steps] == [2, 4]
    versions = read_versions(tmp_path / "state")
    assert [v["kind"] for v in versions] == ["start", "unlearned", "unlearned", "final"]
    assert versions[1]["honours"][0]["inbox_ids"] == [filed["client"]]
    # client-wise target never trains after round 2; class-wise target on retained data
    sent = grid.sent[before:]
    log = events(tmp_path / "state" / "audit.jsonl")
    print([ (e["event"], e.get("round")) for e in log])
    history = Inbox(str(inboxes[0])).events(filed["client"])
    print(history)
    assert history[-1]["status"] == "honoured" and history[-1]["check"]["model-sha256-ok"]

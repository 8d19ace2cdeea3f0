"""Service mode, measured: what a served request costs, and how close the served model
comes to one that never saw the forgotten node.

A 10-node federation (digits, CNN, IID, the in-process engine, fedunlearn's own
ClientApp) trains continuously from scratch (FedAvg, lr 0.05, 1 local epoch) for
``--rounds`` rounds. Node 3's data owner files a client-wise request in its inbox after
round 5, node 6's a class-wise one (class 3) after round 12; both are served by NoT
(3 recovery rounds, server momentum 0.5) as soon as the next query sees them.

The *reference* run is the same federation with node 3's request filed before the first
round: node 3 is forgotten at round 0, so the final model never saw its data. The
difference between the two runs' final forget accuracy on node 3's data (measured by
node 3 on its own data) is what "within tolerance of a model that never saw the node"
means in ``tests/test_service_mode.py``; this script measures it over seeds.

For each served request: the unlearning step's rounds, bytes (both directions) and wall
time, the time from the data owner's filing to the published version (the node's own
receipt: ``filed_to_honoured_s``), against one training round of the federation::

    python bench/service.py                    # seeds 0-4, 40 rounds
    python bench/service.py --seeds 0 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedunlearn import NoT, Recovery, ServiceConfig, UnlearningService
from fedunlearn.engine import LocalGrid, server_identity
from fedunlearn.inbox import Inbox
from fedunlearn.harness.models import create_model
from fedunlearn.requests import UnlearningRequest
from fedunlearn.serving import target_metrics
from flwr.app import ArrayRecord

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES = 10
CLIENT_TARGET, CLASS_TARGET, FORGOTTEN_CLASS = 3, 6, 3


def run_config(seed: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from fedunlearn.launch import default_run_config

    rc = default_run_config()
    rc.update({"seed": seed, "dataset.name": "digits", "model.name": "cnn",
               "federation.num-clients": NUM_NODES})
    return rc


def model_fn():
    return create_model("cnn", num_classes=10, in_channels=1, image_size=8)


def scenario(seed: int, workdir: Path, rounds: int = 20, at=(5, 12), reference=False,
             recovery_rounds: int = 3) -> dict:
    """One service run; returns node 3's final forget accuracy, the steps, the receipts."""
    sys.path.insert(0, str(ROOT))
    from flower_apps.client_app import app

    inboxes = {p: workdir / f"inbox-{p}" for p in (CLIENT_TARGET, CLASS_TARGET)}
    grid = LocalGrid(app, NUM_NODES, run_config(seed),
                     node_configs={p: {"inbox": str(d)} for p, d in inboxes.items()},
                     run_id=1000 + seed)
    filed: dict[str, str] = {}

    def file(kind: str) -> None:
        if kind == "client":
            filed["client"] = Inbox(str(inboxes[CLIENT_TARGET])).file(scope="client").id
        else:
            filed["class"] = Inbox(str(inboxes[CLASS_TARGET])).file(
                scope="class", classes=[FORGOTTEN_CLASS]).id

    if reference:
        file("client")
    round_s: list[float] = []
    last = [time.perf_counter()]

    def on_round(rnd: int, info: dict) -> None:
        now = time.perf_counter()
        round_s.append(now - last[0])
        if rnd == at[0] and not reference:
            file("client")
        if rnd == at[1]:
            file("class")
        last[0] = time.perf_counter()

    torch.manual_seed(seed)
    method = NoT(Recovery(rounds=recovery_rounds, lr=0.05, server_momentum=0.5),
                 model_fn=model_fn, example_input=torch.zeros(1, 1, 8, 8), seed=seed)
    service = UnlearningService(method, state_dir=workdir / "state",
                                config=ServiceConfig(rounds=rounds, lr=0.05, seed=seed),
                                on_round=on_round)
    start = ArrayRecord(model_fn().state_dict())
    with server_identity(grid.run.run_id):
        outcome = service.run(grid, start)
        node = next(n for n, c in grid.contexts.items()
                    if c.node_config["partition-id"] == CLIENT_TARGET)
        final = target_metrics(grid, outcome.arrays,
                               {node: UnlearningRequest("client", CLIENT_TARGET)})
    receipts = {}
    for kind, part in (("client", CLIENT_TARGET), ("class", CLASS_TARGET)):
        events = Inbox(str(inboxes[part])).events(filed[kind])
        receipts[kind] = next(e for e in events if e["status"] == "honoured")
    return {"forget": final["forget"], "steps": outcome.steps, "receipts": receipts,
            "round_s": statistics.median(round_s), "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    diffs, rows, costs = [], [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            served = scenario(seed, Path(a), rounds=args.rounds)
            never = scenario(seed, Path(b), rounds=args.rounds, reference=True)
        diff = served["forget"] - never["forget"]
        diffs.append(diff)
        rows.append(f"| {seed} | {served['forget']:.2f} | {never['forget']:.2f} | {diff:+.2f} |")
        for step, kind in zip(served["steps"], ("client", "class")):
            receipt = served["receipts"][kind]
            costs.append((kind, step["rounds"], step["comm_bytes"], step["wall_s"],
                          receipt.get("filed_to_honoured_s", float("nan")),
                          served["round_s"], receipt["check"]))
    print(f"Node {CLIENT_TARGET}'s final forget accuracy (%), measured by the node, after "
          f"{args.rounds} rounds:\n")
    print("| seed | served at round 5 | never seen (forgotten at round 0) | difference |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmean difference {statistics.mean(diffs):+.2f}, largest |difference| "
          f"{max(abs(d) for d in diffs):.2f} over {len(seeds)} seed(s)\n")
    print("| request | step rounds | step bytes | step wall (s) | filing -> published "
          "(s, node's receipt) | one training round (s) | node's check: forget / retained "
          "accuracy |")
    print("|---|---|---|---|---|---|---|")
    for kind, r, nbytes, wall, waited, round_s, check in costs:
        retained = check.get("retain-accuracy")
        print(f"| {kind}-wise | {r} | {nbytes:.3g} | {wall:.2f} | {waited:.2f} | "
              f"{round_s:.2f} | {check.get('forget-accuracy', float('nan')):.2f} / "
              f"{'-' if retained is None else f'{retained:.2f}'} |")


if __name__ == "__main__":
    main()

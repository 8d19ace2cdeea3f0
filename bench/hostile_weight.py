"""One node inflates its weight: what the published model looks like (issue 30, item 3).

The example's digits app (``examples/quickstart-pytorch-unlearning``: its ClientApp with
``fedunlearn.client.attach``, its ``Net`` and its server test set) on the in-process engine
(:class:`fedunlearn.engine.LocalGrid`, every message answered by the real ClientApp).
Per seed: honest FedAvg pretraining (the user's own, before ``serve``), then
``fedunlearn.serve`` with NoT (client-wise request of partition 0) on

* ``honest``: every node honest;
* ``hostile``: the last partition's node reports ``num-train=10**12`` in its query reply and
  answers every train message with its own fixed weights (a freshly initialised ``Net``)
  and ``num-examples=10**12``; the server's weight cap (``WEIGHT_CAP_FACTOR`` x the median
  of the other nodes' first reports, ``reply.capped`` in the audit log) is all that
  bounds it;
* the same attack with a Flower robust aggregator on the recovery
  (``NoT(recovery, ..., aggregation=FedMedian(...))``, ``FedTrimmedAvg``, ``Krum``,
  ``MultiKrum``; ``--aggregators``), and each of them on the honest federation.

``--cap-factors 10,2,1`` repeats the capped case with other cap factors (patched for the
measurement only). Prints one line per run and a table: the NoT model's test accuracy,
its status (a degraded model is not published), and the weight the hostile node's replies
counted for::

    python bench/hostile_weight.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedunlearn import NoT, Recovery, ServeError, serve
from fedunlearn.engine import LocalGrid, server_identity
from fedunlearn.federation import guarded_grid
from fedunlearn.protocol import NODE_RECORD, NUM_EXAMPLES, NUM_TRAIN

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart-pytorch-unlearning"
INFLATED = 10**12
AGGREGATORS = {
    "fedavgm": lambda n: None,  # fedunlearn's default recovery aggregation
    "fedmedian": lambda n: FedMedian(min_train_nodes=1, min_available_nodes=1),
    "fedtrimmedavg": lambda n: FedTrimmedAvg(min_train_nodes=1, min_available_nodes=1,
                                             beta=0.25),
    "krum": lambda n: Krum(min_train_nodes=1, min_available_nodes=1, num_malicious_nodes=1),
    "multikrum": lambda n: MultiKrum(min_train_nodes=1, min_available_nodes=1,
                                     num_malicious_nodes=1, num_nodes_to_select=2),
}


class HostileGrid(LocalGrid):
    """LocalGrid on which node ``hostile``'s replies are replaced as described above."""

    def __init__(self, *args, hostile_partition: int | None = None, fixed=None, **kw):
        super().__init__(*args, **kw)
        self.hostile = None if hostile_partition is None else min(
            n for n, c in self.contexts.items()
            if c.node_config["partition-id"] == hostile_partition)
        self.fixed = fixed

    def pull_messages(self, message_ids):
        return [self._tamper(r) for r in super().pull_messages(message_ids)]

    def _tamper(self, reply):
        if self.hostile is None or int(reply.metadata.src_node_id) != self.hostile \
                or reply.has_error():
            return reply
        kind = reply.metadata.message_type.split(".")[0]
        content = RecordDict(dict(reply.content.items()))
        if kind == "query" and NODE_RECORD in content.config_records:
            content[NODE_RECORD] = ConfigRecord({**dict(content[NODE_RECORD]),
                                                 NUM_TRAIN: INFLATED})
        elif kind == "train":
            for key in content.array_records:
                content[key] = ArrayRecord(self.fixed)
            for key, record in content.metric_records.items():
                content[key] = MetricRecord({**dict(record), NUM_EXAMPLES: INFLATED})
        else:
            return reply
        reply.content = content
        return reply


def run_config(root: Path) -> dict:
    """The example's run-config keys its ClientApp reads (partition 0's owner files a
    client-wise request in its inbox under ``root``)."""
    return {"local-epochs": 1, "inbox-root": str(root / "inboxes"), "forget-partition": 0,
            "forget-scope": "client", "forget-classes": "3"}


def seed_all(seed: int) -> None:
    """Python's (Flower's node sampling), NumPy's and torch's (the nodes' shuffles)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(app, net_cls, nodes, seed, rounds):
    rc = run_config(Path(tempfile.mkdtemp(prefix="hostile-pretrain-")))
    grid = LocalGrid(app, nodes, rc, run_id=1000 + seed)
    seed_all(seed)
    with server_identity(grid.run.run_id):
        return FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
            grid, ArrayRecord(net_cls().state_dict()), num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.1})).arrays


def one_run(args, app, net_cls, evaluate, arrays, seed, case):
    hostile, aggregator, factor = case
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    rc = run_config(root)
    torch.manual_seed(10_000 + seed)
    fixed = net_cls().state_dict()
    grid = HostileGrid(app, args.nodes, rc, run_id=2000 + seed,
                       hostile_partition=args.nodes - 1 if hostile else None, fixed=fixed)
    guarded_grid.WEIGHT_CAP_FACTOR = factor
    seed_all(seed)
    method = NoT(Recovery(rounds=args.recovery_rounds, lr=0.1, server_momentum=0.5),
                 model_fn=net_cls, example_input=torch.zeros(1, 1, 8, 8),
                 aggregation=AGGREGATORS[aggregator](args.nodes))
    with server_identity(grid.run.run_id):
        try:
            outcome = serve(grid, arrays, method, output_dir=root / "out",
                            evaluate_fn=evaluate)
        except ServeError as err:
            outcome = err.outcome
    m = outcome.methods["not"]
    audit = [json.loads(x) for x in (root / "out" / "audit.jsonl").read_text().splitlines()]
    counted = sorted({r["counted"] for r in audit if r.get("event") == "reply.capped"})
    return {"seed": seed, "hostile": hostile, "aggregation": aggregator, "cap_factor": factor,
            "test": m.metrics.get("test"), "status": m.status, "counted": counted,
            "published_test": evaluate(outcome.arrays)["test"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--pretrain-rounds", type=int, default=10)
    p.add_argument("--recovery-rounds", type=int, default=8)
    p.add_argument("--cap-factors", default="10", help="cap factors for the capped case")
    p.add_argument("--aggregators", default="fedmedian,fedtrimmedavg")
    args = p.parse_args(argv)
    sys.path.insert(0, str(EXAMPLE))
    from unlearningexample.client_app import app  # noqa: PLC0415 (the example's package)
    from unlearningexample.server_app import evaluate  # noqa: PLC0415
    from unlearningexample.task import Net  # noqa: PLC0415

    torch.set_num_threads(1)
    default = guarded_grid.WEIGHT_CAP_FACTOR
    cases = [(False, "fedavgm", default)]
    cases += [(True, "fedavgm", int(f)) for f in args.cap_factors.split(",")]
    cases += [(True, a, default) for a in args.aggregators.split(",") if a]
    cases += [(False, a, default) for a in args.aggregators.split(",") if a]
    rows, start = [], time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        arrays = pretrain(app, Net, args.nodes, seed, args.pretrain_rounds)
        print(f"seed {seed}: pretrained, test {evaluate(arrays)['test']:.2f}%", flush=True)
        for case in cases:
            rows.append(one_run(args, app, Net, evaluate, arrays, seed, case))
            print(json.dumps(rows[-1]), flush=True)
    guarded_grid.WEIGHT_CAP_FACTOR = default
    print(table(rows))
    print(f"total {time.time() - start:.0f} s")


def table(rows) -> str:
    keys = sorted({(r["hostile"], r["aggregation"], r["cap_factor"]) for r in rows},
                  key=lambda k: (k[0], k[1] != "fedavgm", -k[2]))
    lines = ["| node | recovery aggregation | cap | hostile weight counted | NoT test % "
             "per seed | mean | published |", "|---|---|---|---|---|---|---|"]
    for key in keys:
        sel = [r for r in rows if (r["hostile"], r["aggregation"], r["cap_factor"]) == key]
        tests = [r["test"] for r in sel]
        counted = sorted({c for r in sel for c in r["counted"]})
        lines.append(
            f"| {'inflated' if key[0] else 'honest'} | {key[1]} | {key[2]}x | "
            f"{', '.join(map(str, counted)) or '-'} | "
            f"{' / '.join(f'{t:.1f}' for t in tests)} | {sum(tests) / len(tests):.1f} | "
            f"{', '.join(sorted({r['status'] for r in sel}))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

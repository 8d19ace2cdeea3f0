"""What does fedunlearn's orchestration cost? The same FedAvg training timed three ways.

In one run, on the same data (digits), model (the paper's CNN), 10 clients (IID),
local training (1 epoch, SGD lr 0.01, momentum 0.9, batch 32) and number of rounds:

1. a plain PyTorch loop over the clients in one process (no Flower);
2. a plain Flower ServerApp/ClientApp with Flower's own ``FedAvg``
   (``bench/plain_flower``), through ``flwr run`` on the simulation engine;
3. fedunlearn's pretraining (``fedunlearn-run`` with an empty checkpoint cache);
4. the same fedunlearn pretraining on the in-process engine (``--engine local``: the
   same strategies and ClientApp handlers in this process, no Ray, no SuperLink);
5. the in-process engine's batched mode (``--engine local --batch-clients N``: the
   clients of a round trained together with ``torch.func``, ``N`` per pass).

Flower start-up (Ray actors, SuperLink) is excluded: the plain app runs one warm-up round
before its timed rounds, fedunlearn's nodes are warm from the partition check. Prints the
per-round time of each and the ratios fedunlearn / Flower, Flower / PyTorch,
in-process engine / PyTorch and PyTorch / batched mode::

    python bench/overhead.py --rounds 10
    python bench/overhead.py --clients 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedunlearn.engine import local_run
from fedunlearn.harness.data import build_federated_data
from fedunlearn.harness.models import create_model
from fedunlearn.launch import flwr_run, project_root
from fedunlearn.training import train_local

BENCH = Path(__file__).resolve().parent


def pytorch_loop(rounds: int, clients: int, seed: int) -> float:
    """Seconds per FedAvg round of a plain in-process loop."""
    data = build_federated_data("digits", clients, seed=seed)
    info = data.info
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size)
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        total, acc = 0, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in start.items()}
        for c in range(clients):
            model.load_state_dict(start)
            ids = data.train_indices(c)
            train_local(model, data.train, ids, epochs=1, batch_size=32, lr=0.01,
                        momentum=0.9, device=torch.device("cpu"), seed=r * 1000 + c)
            total += len(ids)
            for k, v in model.state_dict().items():
                acc[k] += v.double() * len(ids)
        model.load_state_dict({k: (v / total).to(start[k].dtype) for k, v in acc.items()})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_flower(rounds: int, clients: int, seed: int, work: Path) -> float:
    timings = work / "plain_timings.json"
    rc = flwr_run({"num-clients": clients, "rounds": rounds, "seed": seed,
                   "timings": str(timings)}, num_supernodes=clients,
                  app=BENCH / "plain_flower", env={"FLWR_HOME": str(work / "home-plain")},
                  log_file=work / "plain.log", echo=False)
    if rc != 0 or not timings.exists():
        sys.exit(f"plain Flower run failed (exit {rc}); see {work / 'plain.log'}")
    stamps = json.loads(timings.read_text())
    return statistics.median(np.diff(stamps).tolist())


def fedunlearn_pretraining(rounds: int, clients: int, seed: int, work: Path,
                           engine: str = "flower", batch_clients: int = 0) -> float:
    tag = f"{engine}-batched{batch_clients}" if batch_clients else engine
    out = work / f"fedunlearn-{tag}"
    run_config = {"method": "ft", "unlearn.rounds": 1, "pretrain.rounds": rounds,
                  "federation.num-clients": clients, "seed": seed,
                  "eval.every": 10_000, "output-dir": str(out),
                  "checkpoint-dir": str(work / f"ck-{tag}")}
    log = work / f"fedunlearn-{tag}.log"
    if engine == "local":
        rc = local_run(run_config, num_supernodes=clients, log_file=log, echo=False,
                       batch_clients=batch_clients)
    else:
        rc = flwr_run(run_config, num_supernodes=clients, app=project_root(),
                      env={"FLWR_HOME": str(work / "home-fu")}, log_file=log, echo=False)
    if rc != 0:
        sys.exit(f"fedunlearn run ({tag}) failed (exit {rc}); see {log}")
    cost = json.loads((out / "ft" / "results.json").read_text())["pretrain"]["cost"]
    # Round 1 is the first training in each Ray actor; the plain app's warm-up round
    # absorbs the same one-time cost, so it is left out on both sides.
    return statistics.median(cost["round_s"][1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2,
                   help="alternate the ways this many times; the fastest of each counts")
    p.add_argument("--batch-clients", type=int, default=32,
                   help="the batched mode's clients per pass")
    args = p.parse_args()
    loops, flowers, ours_all, locals_, batched = [], [], [], [], []
    threads = torch.get_num_threads()
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fu-overhead-") as tmp:
            work = Path(tmp)
            torch.set_num_threads(1)  # as in a Ray actor given one CPU
            loops.append(pytorch_loop(args.rounds, args.clients, args.seed))
            torch.set_num_threads(threads)
            flowers.append(plain_flower(args.rounds, args.clients, args.seed, work))
            ours_all.append(fedunlearn_pretraining(args.rounds, args.clients, args.seed, work))
            torch.set_num_threads(1)  # the loop's setting: the same compute per client
            locals_.append(fedunlearn_pretraining(args.rounds, args.clients, args.seed, work,
                                                  engine="local"))
            batched.append(fedunlearn_pretraining(args.rounds, args.clients, args.seed, work,
                                                  "local", args.batch_clients))
            torch.set_num_threads(threads)
        print(f"repeat {i + 1}: loop {loops[-1]:.3f}, Flower {flowers[-1]:.3f}, "
              f"fedunlearn {ours_all[-1]:.3f}, in-process {locals_[-1]:.3f}, batched "
              f"{batched[-1]:.3f} s/round", flush=True)
    loop, flower, ours, local = min(loops), min(flowers), min(ours_all), min(locals_)
    fast = min(batched)
    print(f"{args.clients} clients, {args.rounds} rounds, digits CNN, 1 local epoch")
    print("| training | s / round |")
    print("|---|---|")
    print(f"| plain PyTorch loop (one process) | {loop:.3f} |")
    print(f"| plain Flower ServerApp/ClientApp, Flower FedAvg | {flower:.3f} |")
    print(f"| fedunlearn pretraining | {ours:.3f} |")
    print(f"| fedunlearn pretraining, in-process engine (--engine local) | {local:.3f} |")
    print(f"| fedunlearn pretraining, batched in-process engine (--batch-clients "
          f"{args.batch_clients}) | {fast:.3f} |")
    print(f"\nfedunlearn / plain Flower: {ours / flower:.2f}x; "
          f"plain Flower / PyTorch loop: {flower / loop:.2f}x; "
          f"in-process engine / PyTorch loop: {local / loop:.2f}x; "
          f"PyTorch loop / batched: {loop / fast:.2f}x; "
          f"in-process engine / batched: {local / fast:.2f}x")


if __name__ == "__main__":
    main()

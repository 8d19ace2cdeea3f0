"""Why does NoT's recovery oscillate on label-skewed data, and what fixes it?

Runs on fedunlearn's real code, in one process: for each setting and seed a harness job
(:class:`fedunlearn.harness.run.Experiment`: the data, the verified federation, client 0's
client-wise request, the evaluator) on the in-process engine (:class:`fedunlearn.engine.
LocalGrid`, every message answered by the real ClientApp ``flower_apps.client_app:app``).
The default digits CNN is pretrained over 10 clients by the harness's pretraining (cached
in ``$FEDUNLEARN_CACHE`` like any job's), then the real strategies (NoT, FT, Retrain from
:mod:`fedunlearn.strategies`, each built with its :class:`~fedunlearn.strategies.base.
Recovery`) run recovery on the 9 retained clients: Flower's ``FedAvgM`` is the server
optimizer, the nodes' ``train`` action the local training. The study only measures: the
strategy's per-round progress hook (``context.progress``) hands it the model after each
round, and it takes the retained clients' federated validation accuracy (the strategy's
own ``validate``) and the harness's measurement (``Experiment.evaluate``: test, retain,
forget accuracy, MIA)::

    python bench/recovery_study.py --partitioning dirichlet --alpha 0.3
    python bench/recovery_study.py --partitioning iid
    python bench/recovery_study.py --stop                    # runs with unlearn.stop=validation
    python bench/recovery_study.py --sweep --seeds 3         # stopping rules x server momentum
    python bench/recovery_study.py --defaults --seeds 10     # how the defaults were chosen

The fixed-variant mode prints test accuracy every ``--every`` rounds next to Retrain
from scratch, for: NoT with plain FedAvg, FedAvgM beta 0.9 / 0.5 (server learning rate
1), local learning rates 0.005 / 0.02 and gradient clipping 1 (all through
``Recovery``), and FT. ``--stop`` runs NoT with the validation stopping rule
(``Recovery(stop="validation")``) for server momentum x target gap and reports where it
stopped and why.

``--defaults`` scores recovery settings (server momentum x local epochs, fixed budgets and
the validation stopping rule) on IID and Dirichlet 0.3 over seeds 0..N-1 against the real
Retrain (30 rounds): the table behind the recovery defaults (docs/recovery.md). The
stopping rule is scored on the recorded validation trajectories by the project's own
:class:`~fedunlearn.strategies.stopping.StoppingRule`, fed on the schedule of
``run_phase`` (every ``validate_every`` rounds and at the last one), with the target the
strategy's own ``stopping_rule`` computes; for the first seed of each setting a real run
with ``stop="validation"`` checks that it stops at the scored round.

Dropped when the study moved from its own FedAvg loop to the real strategies (the project
has no setting for them): a local learning-rate warm-up, and no local momentum during
recovery only (``federation.momentum`` is the nodes' setting for pretraining and recovery
alike); the ``--stop`` and ``--sweep`` rules' "hold" (the target reached in k validations
in a row) and negative target gaps (``Recovery.target_gap`` is >= 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import FLOWER_LOGGER

from fedunlearn.harness.config import ExperimentConfig
from fedunlearn.engine import LocalGrid, load_components, server_identity
from fedunlearn.launch import project_root
from fedunlearn.harness.methods import build
from fedunlearn.harness.run import Experiment
from fedunlearn.strategies import get_method
from fedunlearn.strategies.base import Recovery, Training
from fedunlearn.strategies.stopping import StoppingRule

NUM_CLIENTS = 10
FORGOTTEN = 0  # client 0 asks to be forgotten (client-wise): clients 1..9 are retained


def server_side(run_id: int):
    """The ServerApp's task identity (messages built by the server carry it), as
    Flower's own ServerApp runtimes and ``fedunlearn.engine.run_app`` set it."""
    return server_identity(run_id)


class Job:
    """One harness job on the in-process engine, up to its requests: the federation
    verified, the model pretrained (or the cached one), client 0's request accepted.
    Strategies then run from :attr:`pretrained` on :attr:`grid` (the harness's guarded
    grid); use it inside ``with job:`` (the server's task identity)."""

    def __init__(self, partitioning: str, alpha: float, seed: int, workdir: Path,
                 **run_config) -> None:
        _server_app, client_app, defaults = load_components(project_root())
        rc = {**defaults, "seed": seed, "federation.partitioning": partitioning,
              "federation.alpha": alpha, "federation.num-clients": NUM_CLIENTS,
              "forget.scope": "client", "forget.clients": str(FORGOTTEN),
              "method": "retrain,ft,not", "device": "cpu",
              "output-dir": str(workdir / f"{partitioning}-{alpha}-{seed}"), **run_config}
        self.local = LocalGrid(client_app, NUM_CLIENTS, rc, run_id=1_000 + seed)
        self._identity = None
        with self:
            self.exp = exp = Experiment(self.local, ExperimentConfig.from_run_config(rc))
            exp.started()
            exp.preflight()
            nodes = exp.wait_for_nodes()
            exp.discover_partitions(nodes)
            self.pretrained, _ = exp.pretrain()
            exp.context.original_arrays = self.pretrained
            accepted = exp.collect_requests(nodes)
        if sorted(exp.context.node_partitions[n] for n in accepted) != [FORGOTTEN]:
            raise RuntimeError(f"expected client {FORGOTTEN}'s request, got {accepted}")
        self.grid, self.cfg, self.context = exp.grid, exp.cfg, exp.context
        self._probe = self.strategy("not")  # validation as the stopping rule takes it

    def __enter__(self) -> Job:
        self._identity = server_side(self.local.run.run_id)
        self._identity.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._identity.__exit__(*exc)

    def strategy(self, method: str, recovery: Recovery | None = None, **kwargs):
        """The harness's strategy for ``method`` (``from_config``), with ``recovery``
        instead of the config's when given."""
        if recovery is not None:
            kwargs["recovery"] = recovery
        return build(get_method(method), self.cfg, self.context, **kwargs)

    def measure(self, arrays) -> tuple[float, float, float, float, float]:
        """(validation, test, retain, forget accuracy, MIA): the retained clients'
        federated validation accuracy and the harness's measurement of ``arrays``."""
        m = self.exp.evaluate(arrays)
        return (self._probe.validate(self.grid, arrays), m["test"], m["retain"],
                m["forget"], m["mia"])

    def run(self, strategy, measure=None):
        """``strategy.unlearn`` from the pretrained model; ``measure(arrays)`` after every
        round the strategy reports progress for (its ``eval_every``). Returns the final
        model and the measurements, in round order."""
        out = []

        def progress(phase, server_round, arrays, num_rounds):
            out.append(measure(arrays))

        self.context.progress = progress if measure is not None else None
        try:
            arrays = strategy.unlearn(self.grid, self.pretrained)
        finally:
            self.context.progress = None
        return arrays, out

    def trajectory(self, recovery: Recovery, method: str = "not") -> list[tuple]:
        """NoT's recovery (``method``'s) measured after every round."""
        return self.run(self.strategy(method, recovery, eval_every=1), self.measure)[1]

    def retrain(self, every_round: bool = False):
        """The real Retrain (``pretrain.rounds`` rounds from a fresh model seeded with
        seed + 1), measured at the end, or (``every_round``) after every round: the list
        of measurements."""
        if every_round:
            return self.run(self.strategy("retrain", eval_every=1), self.measure)[1]
        arrays, _ = self.run(self.strategy("retrain"))
        return self.measure(arrays)

    def validation_target(self) -> float:
        """The stopping rule's target with target-gap 0: the original model's validation
        accuracy on the retained clients, as ``stopping_rule`` computes it."""
        return self.strategy("not", Recovery(stop="validation", target_gap=0.0)
                             ).stopping_rule(self.grid).target


def rule_stop(traj, target: float, *, every: int = 1, max_rounds: int | None = None,
              patience: int = 3, min_delta: float = 0.1) -> tuple[int, str]:
    """Where fedunlearn's :class:`StoppingRule` (``target``, ``patience``,
    ``min_delta``) stops recovery, fed the recorded validation accuracies (``traj[r-1][0]``)
    as ``run_phase`` feeds it: every ``every`` rounds and at the last round. Returns the
    (1-based) round and the reason (``maximum`` when it never fires)."""
    last = min(max_rounds or len(traj), len(traj))
    rule = StoppingRule(target=target, patience=patience, min_delta=min_delta)
    for r in range(1, last + 1):
        if r % every == 0 or r == last:
            verdict = rule.update(r, traj[r - 1][0])
            if verdict:
                return r, verdict
    return last, "maximum"


def quiet() -> None:
    """Flower's and fedunlearn's per-round log lines off (errors still show)."""
    FLOWER_LOGGER.setLevel(logging.ERROR)


# ---- fixed-budget variants -----------------------------------------------------------

def fixed_variants(args, workdir: Path) -> None:
    t0 = time.perf_counter()
    job = Job(args.partitioning, args.alpha, args.seed, workdir)
    every, rounds = args.every, args.rounds
    with job:
        test = lambda arrays: job.exp.evaluator.progress("study", 0, arrays, 0)[  # noqa: E731
            "test-accuracy"]
        print(f"pretrained test {test(job.pretrained):.2f} ({time.perf_counter() - t0:.0f}s)")
        fedavg = dict(rounds=rounds, server_momentum=0.0)
        variants = {
            "retrain": ("retrain", None),
            "not FedAvg (lr .01, mom .9)": ("not", Recovery(**fedavg)),
            "not FedAvgM beta .9": ("not", Recovery(rounds=rounds, server_momentum=0.9)),
            "not FedAvgM beta .5 (default)": ("not", Recovery(rounds=rounds,
                                                              server_momentum=0.5)),
            "not lr .005": ("not", Recovery(**fedavg, lr=0.005)),
            "not lr .02": ("not", Recovery(**fedavg, lr=0.02)),
            "not clip 1": ("not", Recovery(**fedavg, clip_norm=1.0)),
            "ft FedAvg": ("ft", Recovery(**fedavg)),
            "ft FedAvgM beta .5 (default)": ("ft", Recovery(rounds=rounds,
                                                            server_momentum=0.5)),
        }
        chosen = [v.strip() for v in args.variants.split(";") if v.strip()] or list(variants)
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(variants)}")
        print(f"rounds: {list(range(every, rounds + 1, every))}")
        for name in chosen:
            method, recovery = variants[name]
            t1 = time.perf_counter()
            if method == "retrain":
                strategy = job.strategy("retrain", eval_every=every, training=Training(
                    rounds=rounds, lr=job.cfg.pretrain_lr, local_epochs=job.cfg.local_epochs))
            else:
                strategy = job.strategy(method, recovery, eval_every=every)
            _, accs = job.run(strategy, test)
            accs = accs[:rounds // every]  # run_phase also reports the last round
            print(f"{name:32s} " + " ".join(f"{a:6.2f}" for a in accs)
                  + f"   ({time.perf_counter() - t1:.0f}s)", flush=True)


def stop_study(args, workdir: Path) -> None:
    """NoT run with the validation stopping rule: rounds, why, test and retain accuracy."""
    job = Job(args.partitioning, args.alpha, args.seed, workdir)
    with job:
        print(f"original validation accuracy on the retained clients: "
              f"{job.validation_target():.2f}")
        for beta in (0.0, 0.5, 0.9):
            for gap in (1.0, 0.0):
                strategy = job.strategy("not", Recovery(
                    rounds=args.rounds, server_momentum=beta, stop="validation",
                    target_gap=gap))
                arrays, _ = job.run(strategy)
                note = strategy.notes["recovery"]
                _val, test, retain, _forget, _mia = job.measure(arrays)
                print(f"beta {beta:.1f} gap {gap:.0f}: stop r{note['rounds']:2d} "
                      f"({note['stopped']:14s}) test {test:6.2f} retain {retain:6.2f}",
                      flush=True)


def rule_sweep(args, workdir: Path) -> None:
    """Trajectories once per (setting, seed, beta); every rule scored on them."""
    settings = [("iid", 0.5), ("dirichlet", 0.3)]
    betas = (0.0, 0.5, 0.7, 0.9)
    rules = list(itertools.product((1.0, 0.5, 0.0), (3, 5)))
    table: dict = {}
    for (part, alpha), seed in itertools.product(settings, range(args.seeds)):
        job = Job(part, alpha, seed, workdir)
        with job:
            target = job.validation_target()
            ref = job.retrain()
            for beta in betas:
                traj = job.trajectory(Recovery(rounds=args.rounds, server_momentum=beta))
                table.setdefault((part, beta, "fixed 15"), []).append(
                    (15, traj[min(15, len(traj)) - 1], ref))
                for gap, patience in rules:
                    r, _why = rule_stop(traj, target - gap, patience=patience)
                    key = (part, beta, f"gap {gap:+.1f} patience {patience}")
                    table.setdefault(key, []).append((r, traj[r - 1], ref))
        print(f"done {part} seed {seed}", flush=True)
    print("setting    beta rule                              rounds  gap3(ret,fgt,test)  "
          "test-ref")
    for (part, beta, rule), rows in sorted(table.items()):
        rounds = np.mean([r for r, _, _ in rows])
        gap3 = np.mean([np.mean([abs(a - b) for a, b in zip(m[1:4], ref[1:4])])
                        for _, m, ref in rows])
        dtest = np.mean([m[1] - ref[1] for _, m, ref in rows])
        print(f"{part:10s} {beta:.1f}  {rule:34s} {rounds:6.1f}  {gap3:8.2f}           "
              f"{dtest:+6.2f}")


# ---- --defaults: which recovery setting serves IID and label-skewed data alike ----------

#: name -> (server momentum, local epochs, rounds recorded)
DEFAULT_VARIANTS = {
    "FedAvg": (0.0, 1, 30), "FedAvgM 0.3": (0.3, 1, 30), "FedAvgM 0.5": (0.5, 1, 30),
    "FedAvgM 0.7": (0.7, 1, 30), "FedAvgM 0.5, 3 local epochs": (0.5, 3, 15),
}
#: The real run that checks the scored stopping rule: (variant, target-gap, every).
STOP_CHECK = ("FedAvgM 0.5, 3 local epochs", 0.5, 1)


def defaults_study(args, workdir: Path) -> None:
    """Trajectories once per (setting, seed, variant), every rule scored on them."""
    seeds = list(range(args.seeds))
    traj: dict = {}
    for (part, alpha), seed in [(s, k) for s in (("iid", 0.5), ("dirichlet", 0.3))
                                for k in seeds]:
        t0 = time.perf_counter()
        job = Job(part, alpha, seed, workdir)
        with job:
            d = traj.setdefault((part, seed), {"orig": job.measure(job.pretrained),
                                               "target": job.validation_target()})
            d["retrain_rounds"] = job.retrain(every_round=True)
            d["retrain"] = d["retrain_rounds"][-1]
            for name, (beta, epochs, rounds) in DEFAULT_VARIANTS.items():
                d[name] = job.trajectory(Recovery(rounds=rounds, server_momentum=beta,
                                                  local_epochs=epochs))
            if seed == seeds[0]:
                check_stop(job, d)
        print(f"{part} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(
            {f"{part}/{seed}": d for (part, seed), d in traj.items()}, indent=1))
    defaults_table(traj, seeds)


def check_stop(job: Job, d: dict) -> None:
    """Run NoT with ``stop="validation"`` (STOP_CHECK's rule) and check that it stops
    where the rule scored on the recorded trajectory does."""
    name, gap, every = STOP_CHECK
    beta, epochs, _ = DEFAULT_VARIANTS[name]
    strategy = job.strategy("not", Recovery(rounds=15, server_momentum=beta,
                                            local_epochs=epochs, stop="validation",
                                            target_gap=gap, validate_every=every))
    job.run(strategy)
    real = strategy.notes["recovery"]["rounds"]
    scored, why = rule_stop(d[name], d["target"] - gap, every=every, max_rounds=15)
    print(f"  stop check ({name}, target-gap {gap}, every {every}): the real run stopped "
          f"at round {real} ({strategy.notes['recovery']['stopped']}), scored {scored} "
          f"({why})", flush=True)
    if real != scored:
        raise SystemExit("the scored stopping rule disagrees with the real run")


def defaults_table(traj: dict, seeds: list[int]) -> None:
    """Print the Markdown table of ``--defaults`` from the recorded trajectories."""

    def gap4(m, ref):  # mean |difference| over Test, Retain, Forget, MIA
        return float(np.mean([abs(a - b) for a, b in zip(m[1:], ref[1:])]))

    def score(name, rule):
        out = {}
        for part in ("iid", "dirichlet"):
            rows = []
            for seed in seeds:
                d = traj[(part, seed)]
                t = d[name]
                if rule[0] == "fixed":
                    r = min(rule[1], len(t))
                else:
                    r, _ = rule_stop(t, d["target"] - rule[1], every=rule[2], max_rounds=15)
                rows.append((r, gap4(t[r - 1], d["retrain"]), t[r - 1][1] - d["retrain"][1],
                             (t[r - 1], d["retrain"])))
            out[part] = rows
        return out

    def gap_of_means(rows):
        return gap4(np.mean([m for *_, (m, _) in rows], axis=0),
                    np.mean([ref for *_, (_, ref) in rows], axis=0))

    base = score("FedAvg", ("fixed", 15))["iid"]
    print(f"\nseeds 0..{len(seeds) - 1}; gap = mean |d| over Test, Retain, Forget, MIA to a "
          "30-round Retrain, per seed then averaged; gap of means = the same on the metrics "
          "averaged over seeds (the fidelity tables' Avg. Gap); paired = per-seed IID gap minus "
          "FedAvg-15's, mean ± standard error")
    print("| recovery | rule | IID rounds | IID gap | IID gap of means | paired | "
          "Dirichlet rounds | Dirichlet \\|Test - Retrain's\\| | within 2 | "
          "Dirichlet gap of means |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rules = [("fixed", n) for n in (4, 6, 10, 11, 12, 13, 15)] + [
        ("validation", tg, every) for tg in (0.0, 0.5) for every in (1, 2)]
    for name, (_beta, _epochs, rounds) in DEFAULT_VARIANTS.items():
        for rule in rules:
            if rule[0] == "fixed" and rule[1] > rounds:
                continue
            s = score(name, rule)
            diff = np.array([g for _, g, _, _ in s["iid"]]) - np.array([g for _, g, _, _ in base])
            dt = np.array([x for _, _, x, _ in s["dirichlet"]])
            label = (f"fixed {rule[1]}" if rule[0] == "fixed"
                     else f"validation, target-gap {rule[1]}, every {rule[2]}")
            se = (f" ± {diff.std(ddof=1) / np.sqrt(len(diff)):.2f}" if len(diff) > 1 else "")
            print(f"| {name} | {label} | {np.mean([r for r, *_ in s['iid']]):.1f} | "
                  f"{np.mean([g for _, g, _, _ in s['iid']]):.2f} | {gap_of_means(s['iid']):.2f} | "
                  f"{diff.mean():+.2f}{se} | "
                  f"{np.mean([r for r, *_ in s['dirichlet']]):.1f} | "
                  f"{np.abs(dt).mean():.2f} | {int((np.abs(dt) <= 2).sum())}/{len(dt)} | "
                  f"{gap_of_means(s['dirichlet']):.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitioning", default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="", help="';'-separated variant names")
    p.add_argument("--stop", action="store_true",
                   help="run NoT with the validation stopping rule instead of fixed budgets")
    p.add_argument("--sweep", action="store_true",
                   help="score stopping rules x server momentum on IID and Dirichlet 0.3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--defaults", action="store_true",
                   help="score server momentum x local epochs x stopping rules over --seeds")
    p.add_argument("--save", default="",
                   help="--defaults: write the recorded measurements (JSON) here")
    p.add_argument("--verbose", action="store_true", help="keep Flower's per-round log")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.verbose:
        quiet()
    with tempfile.TemporaryDirectory(prefix="recovery-study-") as tmp:
        workdir = Path(tmp)  # the jobs' audit logs (the pretrained models are cached)
        if args.defaults:
            defaults_study(args, workdir)
        elif args.sweep:
            rule_sweep(args, workdir)
        elif args.stop:
            stop_study(args, workdir)
        else:
            fixed_variants(args, workdir)


if __name__ == "__main__":
    main()

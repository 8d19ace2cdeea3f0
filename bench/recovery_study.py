"""Why does NoT's recovery oscillate on label-skewed data, and what fixes it?

An in-process FedAvg loop (no Flower, same data, model, partitions, local training and
negation as fedunlearn) pretrains the default digits CNN on 10 clients, negates the first
layer, and runs recovery on the 9 retained clients under several recovery variants,
printing the test accuracy after every ``--every`` rounds next to Retrain from scratch::

    python bench/recovery_study.py --partitioning dirichlet --alpha 0.3
    python bench/recovery_study.py --partitioning iid
    python bench/recovery_study.py --defaults --seeds 10     # how the defaults were chosen

``--defaults`` scores recovery settings (server momentum x local epochs, fixed budgets and
the validation stopping rule) on IID and Dirichlet 0.3 over seeds 0..N-1 against a
30-round Retrain: the table behind the recovery defaults (README, Recovery).

Variants: the default (local SGD lr 0.01, momentum 0.9, FedAvg); server momentum
(FedAvgM, server lr 1, beta 0.9 / 0.5); lower local learning rates; a local
learning-rate warm-up; no local momentum; gradient clipping.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedunlearn.data import build_federated_data
from fedunlearn.metrics import (accuracy_from_logits, membership_features, mia_result, predict,
                                split_nonmembers)
from fedunlearn.models import create_model
from fedunlearn.negation import example_input_for, negate_layers
from fedunlearn.training import train_local


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fedavg_round(model, data, clients, *, lr, momentum, seed, clip=0.0, batch=32, epochs=1):
    start = state(model)
    total = 0
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in start.items()}
    for c in clients:
        model.load_state_dict(start)
        ids = data.train_indices(c)
        train_local(model, data.train, ids, epochs=epochs, batch_size=batch, lr=lr,
                    momentum=momentum, device=torch.device("cpu"), seed=seed * 1000 + c,
                    clip_norm=clip)
        n = len(ids)
        total += n
        for k, v in model.state_dict().items():
            acc[k] += v.double() * n
    return start, {k: (v / total).to(start[k].dtype) for k, v in acc.items()}


def server_momentum_step(start, avg, velocity, beta):
    """FedAvgM's server step (server lr 1): ``velocity <- beta * velocity + (avg - start)``,
    the new model ``start + velocity``; floating-point entries only. Returns both."""
    delta = {k: avg[k].double() - start[k].double() for k in avg if avg[k].is_floating_point()}
    velocity = delta if velocity is None else {k: beta * velocity[k] + delta[k] for k in delta}
    avg = dict(avg)
    avg.update({k: (start[k].double() + velocity[k]).to(start[k].dtype) for k in delta})
    return avg, velocity


def pretrained_digits(partitioning, alpha, seed):
    """The digits federation of 10 clients, a CNN factory, and the CNN after 30 FedAvg
    rounds over every client (the original model)."""
    data = build_federated_data("digits", 10, partitioning=partitioning, alpha=alpha, seed=seed)
    info = data.info
    new = lambda: create_model("cnn", num_classes=info.num_classes,  # noqa: E731
                               in_channels=info.in_channels, image_size=info.image_size)
    torch.manual_seed(seed)
    model = new()
    run(model, data, list(range(10)), 30, 30, seed=seed)
    return data, new, model


def test_acc(model, data):
    logits, labels = predict(model, data.test, np.arange(len(data.test)))
    return accuracy_from_logits(logits, labels)


def run(model, data, clients, rounds, every, *, lr=0.01, momentum=0.9, server_momentum=0.0,
        warmup=0, clip=0.0, seed=0):
    velocity = None
    out = []
    for r in range(1, rounds + 1):
        lr_r = lr * min(1.0, r / warmup) if warmup else lr
        start, avg = fedavg_round(model, data, clients, lr=lr_r, momentum=momentum,
                                  seed=seed * 100_000 + r, clip=clip)
        if server_momentum:
            avg, velocity = server_momentum_step(start, avg, velocity, server_momentum)
        model.load_state_dict(avg)
        if r % every == 0:
            out.append(test_acc(model, data))
    return out


def accuracy_on(model, data, ids):
    logits, labels = predict(model, data.train, ids)
    return accuracy_from_logits(logits, labels)


def stop_study(data, new, pretrained, retained, args) -> None:
    """Recovery under the validation stopping rule: rounds, test and retain accuracy."""
    info = data.info
    val = np.concatenate([data.val_indices(c) for c in retained])
    train = np.concatenate([data.train_indices(c) for c in retained])
    orig = new()
    orig.load_state_dict(pretrained)
    target0 = accuracy_on(orig, data, val)
    print(f"original validation accuracy on the retained clients: {target0:.2f}")
    for beta in (0.0, 0.5, 0.9):
        for gap in (1.0, 0.0):
            for hold in (1, 2):
                m = new()
                m.load_state_dict(pretrained)
                negate_layers(m, example_input_for(info.in_channels, info.image_size))
                velocity, streak, best, since = None, 0, -1.0, 0
                for r in range(1, args.rounds + 1):
                    start, avg = fedavg_round(m, data, retained, lr=0.01, momentum=0.9,
                                              seed=args.seed * 100_000 + r)
                    if beta:
                        avg, velocity = server_momentum_step(start, avg, velocity, beta)
                    m.load_state_dict(avg)
                    acc = accuracy_on(m, data, val)
                    streak = streak + 1 if acc >= target0 - gap else 0
                    if acc > best + 0.1:
                        best, since = acc, 0
                    else:
                        since += 1
                    if streak >= hold:
                        why = "target"
                        break
                    if since >= 3:
                        why = "plateau"
                        break
                else:
                    why = "max"
                print(f"beta {beta:.1f} gap {gap:.0f} hold {hold}: stop r{r:2d} ({why:7s}) "
                      f"test {test_acc(m, data):6.2f} retain {accuracy_on(m, data, train):6.2f}",
                      flush=True)


def trajectory(data, new, start_state, retained, rounds, beta, seed, negate=True):
    """Per round: (validation, test, retain, forget) accuracy of recovery with server
    momentum ``beta`` (validation on the retained clients' validation splits)."""
    val = np.concatenate([data.val_indices(c) for c in retained])
    train = np.concatenate([data.train_indices(c) for c in retained])
    forget = np.concatenate([data.train_indices(c) for c in range(10) if c not in retained])

    def ev(m):
        return (accuracy_on(m, data, val), test_acc(m, data), accuracy_on(m, data, train),
                accuracy_on(m, data, forget))

    return recovery_trajectory(data, new, start_state, retained, ev, beta=beta, epochs=1,
                               rounds=rounds, seed=seed, negate=negate)


def apply_rule(traj, target, hold, patience, min_delta=0.1):
    """The round a rule stops at (1-based) on a trajectory of validation accuracies."""
    streak, best, since = 0, -1.0, 0
    for r, (val, *_rest) in enumerate(traj, start=1):
        streak = streak + 1 if val >= target else 0
        if streak >= hold:
            return r, "target"
        if val > best + min_delta:
            best, since = val, 0
        else:
            since += 1
        if since >= patience:
            return r, "plateau"
    return len(traj), "max"


def rule_sweep(args) -> None:
    """Trajectories once per (setting, seed, beta); every rule evaluated on them."""
    import itertools

    settings = [("iid", 0.5), ("dirichlet", 0.3)]
    betas = (0.0, 0.5, 0.7, 0.9)
    rules = list(itertools.product((1.0, 0.0, -0.5), (1, 2), (3, 5)))
    table: dict = {}
    for (part, alpha), seed in itertools.product(settings, range(args.seeds)):
        data, new, model = pretrained_digits(part, alpha, seed)
        pretrained = state(model)
        retained = list(range(1, 10))
        val = np.concatenate([data.val_indices(c) for c in retained])
        original_val = accuracy_on(model, data, val)
        torch.manual_seed(seed + 1)
        scratch = state(new())
        ref = trajectory(data, new, scratch, retained, 30, 0.0, seed, negate=False)[-1]
        for beta in betas:
            traj = trajectory(data, new, pretrained, retained, args.rounds, beta, seed)
            fixed = traj[14]
            table.setdefault((part, beta, "fixed 15"), []).append((15, fixed, ref))
            for gap, hold, patience in rules:
                r, why = apply_rule(traj, original_val - gap, hold, patience)
                key = (part, beta, f"gap {gap:+.1f} hold {hold} patience {patience}")
                table.setdefault(key, []).append((r, traj[r - 1], ref))
        print(f"done {part} seed {seed}", flush=True)
    print("setting    beta rule                              rounds  gap3(ret,fgt,test)  "
          "test-ref")
    for (part, beta, rule), rows in sorted(table.items()):
        rounds = np.mean([r for r, _, _ in rows])
        gap3 = np.mean([np.mean([abs(a - b) for a, b in zip(m[1:], ref[1:])])
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


def five_metrics(model, data, val, train, forget, attack, heldout, seed):
    """(validation, test, retain, forget accuracy, MIA) as the launcher computes them."""
    acc = lambda logits, labels: 100.0 * float(  # noqa: E731
        (np.asarray(logits).argmax(1) == np.asarray(labels)).mean())
    lt, yt = predict(model, data.test, np.arange(len(data.test)))
    lr_, yr = predict(model, data.train, train)
    lf, yf = predict(model, data.train, forget)
    lv, yv = predict(model, data.train, val)
    test_feats, members = membership_features(lt, yt), membership_features(lr_, yr)
    if len(members) > 2000:
        members = members[np.random.default_rng(seed).choice(len(members), 2000, replace=False)]
    mia = mia_result(members, test_feats[attack], membership_features(lf, yf),
                     test_feats[heldout], seed=seed)["score"]
    return (acc(lv, yv), acc(lt, yt), acc(lr_, yr), acc(lf, yf), mia)


def recovery_trajectory(data, new, start_state, retained, ev, *, beta, epochs, rounds, seed,
                        negate=True):
    m = new()
    m.load_state_dict(start_state)
    if negate:
        info = data.info
        negate_layers(m, example_input_for(info.in_channels, info.image_size))
    velocity, out = None, []
    for r in range(1, rounds + 1):
        start, avg = fedavg_round(m, data, retained, lr=0.01, momentum=0.9, epochs=epochs,
                                  seed=seed * 100_000 + r)
        if beta:
            avg, velocity = server_momentum_step(start, avg, velocity, beta)
        m.load_state_dict(avg)
        out.append(ev(m))
    return out


def validation_stop(traj, target, every=1, patience=3, max_rounds=15, min_delta=0.1):
    """fedunlearn's StoppingRule (target, plateau, maximum) on recorded validation accuracies."""
    best, since = -float("inf"), 0
    max_rounds = min(max_rounds, len(traj))
    for r in range(1, max_rounds + 1):
        if r % every and r != max_rounds:
            continue
        acc = traj[r - 1][0]
        if acc >= target:
            return r
        if acc > best + min_delta:
            best, since = acc, 0
        else:
            since += 1
            best = max(best, acc)
        if since >= patience:
            return r
    return max_rounds


def defaults_study(args) -> None:
    """Trajectories once per (setting, seed, variant), every rule scored on them."""
    seeds = list(range(args.seeds))
    traj: dict = {}
    for (part, alpha), seed in [(s, k) for s in (("iid", 0.5), ("dirichlet", 0.3))
                                for k in seeds]:
        t0 = time.perf_counter()
        data, new, model = pretrained_digits(part, alpha, seed)
        retained = list(range(1, 10))
        val = np.concatenate([data.val_indices(c) for c in retained])
        train = np.concatenate([data.train_indices(c) for c in retained])
        attack, heldout = split_nonmembers(len(data.test), seed=seed)
        ev = lambda m: five_metrics(m, data, val, train, data.train_indices(0),  # noqa: E731
                                    attack, heldout, seed)
        d = traj.setdefault((part, seed), {"orig": ev(model)})
        torch.manual_seed(seed + 1)
        d["retrain"] = recovery_trajectory(data, new, state(new()), retained, ev, beta=0.0,
                                           epochs=1, rounds=30, seed=seed, negate=False)[-1]
        for name, (beta, epochs, rounds) in DEFAULT_VARIANTS.items():
            d[name] = recovery_trajectory(data, new, state(model), retained, ev, beta=beta,
                                          epochs=epochs, rounds=rounds, seed=seed)
        print(f"{part} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    defaults_table(traj, seeds)


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
                    r = validation_stop(t, d["orig"][0] - rule[1], every=rule[2])
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
    p.add_argument("--variants", default="")
    p.add_argument("--stop", action="store_true",
                   help="study the validation stopping rule instead of fixed budgets")
    p.add_argument("--sweep", action="store_true",
                   help="score stopping rules x server momentum on IID and Dirichlet 0.3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--defaults", action="store_true",
                   help="score server momentum x local epochs x stopping rules over --seeds")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.defaults:
        defaults_study(args)
        return
    if args.sweep:
        rule_sweep(args)
        return
    t0 = time.perf_counter()
    data, new, model = pretrained_digits(args.partitioning, args.alpha, args.seed)
    info = data.info
    pretrained = state(model)
    print(f"pretrained test {test_acc(model, data):.2f} ({time.perf_counter() - t0:.0f}s)")
    retained = list(range(1, 10))
    if args.stop:
        stop_study(data, new, pretrained, retained, args)
        return
    variants = {
        "retrain": dict(scratch=True),
        "not default (lr .01, mom .9)": {},
        "not FedAvgM beta .9": dict(server_momentum=0.9),
        "not FedAvgM beta .5": dict(server_momentum=0.5),
        "not lr .005": dict(lr=0.005),
        "not lr .02": dict(lr=0.02),
        "not warmup 5": dict(warmup=5),
        "not local mom 0": dict(momentum=0.0, lr=0.05),
        "not clip 1": dict(clip=1.0),
        "ft default": dict(no_negation=True),
    }
    chosen = [v.strip() for v in args.variants.split(";") if v.strip()] or list(variants)
    print(f"rounds: {list(range(args.every, args.rounds + 1, args.every))}")
    for name in chosen:
        kw = dict(variants[name])
        if kw.pop("scratch", False):
            torch.manual_seed(args.seed + 1)
            m = new()
        else:
            m = new()
            m.load_state_dict(pretrained)
            if not kw.pop("no_negation", False):
                negate_layers(m, example_input_for(info.in_channels, info.image_size))
        t0 = time.perf_counter()
        accs = run(m, data, retained, args.rounds, args.every, seed=args.seed, **kw)
        print(f"{name:32s} " + " ".join(f"{a:6.2f}" for a in accs)
              + f"   ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()

"""Why NoT works, measured: the NoT paper's Figures 3-5 and its layer-wise-optimality
check, on this project's own runs (in-process engine, 10 clients, client 0 forgotten).

1. Perturbations (Figure 5), digits / CNN: NoT with each perturbation of the first layer
   (``negate``, ``none`` = FT, ``reinit``, ``noise``, ``flip``, ``rotate``) and Retrain,
   every round measured (``eval.trajectory``), per seed, with client 0 forgotten (IID)
   and with every client forgetting class 3 (where forgetting shows).
2. Layers (Figure 4), ``synthetic`` / ``vit_tiny`` (the ViT barely learns 8x8 digits
   with FedAvg and SGD): NoT negating the patch projection, the positional embedding,
   head 0's or head 1's query rows of the first block, and Retrain.
3. Layer-wise optimality: ``lwo`` (the first layer negated and frozen, everything else
   re-initialised, Retrain's budget) and Retrain, per seed; and ``lwo`` with
   ``perturbation=none`` (the first layer kept as trained) for FT's side.
4. CKA (Figure 3), seed 0, digits / CNN: the original model as the reference against NoT
   after negation and after recovery, FT and Retrain at the end, and the starting models
   of both layer-wise checks.

Then ``fedunlearn-report`` on sections 1 and 2 (``gap_by_perturbation.png``,
``gap_by_layer.png``, ``summary.md``), ``fedunlearn cka``'s report for section 4, and
Markdown tables of the final Avg. Gap and test accuracy (mean ± std over seeds)::

    python bench/not_analysis.py                         # seeds 0,1,2, everything
    python bench/not_analysis.py --seeds 0 --sections perturbation,cka
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fedunlearn.engine import local_run

PERTURBATIONS = ("negate", "none", "reinit", "noise", "flip", "rotate")
VIT_LAYERS = {"patch projection": "patch_embed.proj", "positional embedding": "pos_embed",
              "head 0 query": "blocks.0.attn.qkv:q0", "head 1 query": "blocks.0.attn.qkv:q1"}
METRICS = ("retain", "forget", "test", "mia")


def job(out: Path, ck: Path, **run_config) -> dict:
    """One job on the in-process engine; its results by method."""
    out.mkdir(parents=True, exist_ok=True)
    rc = local_run({**run_config, "output-dir": str(out), "checkpoint-dir": str(ck),
                    "eval.trajectory": True}, num_supernodes=10,
                   log_file=out / "job.log", echo=False)
    if rc != 0:
        sys.exit(f"job failed: {out} (see {out / 'job.log'})")
    found = {}
    for path in sorted(out.rglob("results.json")):
        res = json.loads(path.read_text())
        found[res["method"]] = res
    return found


def gap(a: dict, b: dict) -> float:
    return statistics.fmean(abs(a[k] - b[k]) for k in METRICS)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(title: str, rows: dict[str, dict[int, tuple[float, float]]], retrain_test: dict) -> str:
    lines = [f"#### {title}", "",
             "| variant | Avg. Gap to Retrain | Test | Retrain's Test | seeds |",
             "|---|---|---|---|---|"]
    for name, per_seed in rows.items():
        seeds = sorted(per_seed)
        lines.append(f"| {name} | {mean_std([per_seed[s][0] for s in seeds])} | "
                     f"{mean_std([per_seed[s][1] for s in seeds])} | "
                     f"{mean_std([retrain_test[s] for s in seeds])} | {len(seeds)} |")
    return "\n".join(lines) + "\n"


SETTINGS = {"client": ("client 0 forgotten", {}),
            "class": ("every client forgets class 3", "class-forgetting")}


def perturbation_section(root: Path, seeds: list[int], settings: list[str]) -> str:
    from fedunlearn.launch import load_preset

    out = []
    for setting in settings:
        label, preset = SETTINGS[setting]
        extra = load_preset(preset) if isinstance(preset, str) else dict(preset)
        rows: dict[str, dict] = {p: {} for p in PERTURBATIONS}
        retrain_test = {}
        for seed in seeds:
            retrain = job(root / setting / f"retrain-seed{seed}", root.parent / "ck",
                          **{**extra, "method": "retrain", "seed": seed})["retrain"]
            retrain_test[seed] = retrain["unlearned"]["test"]
            for p in PERTURBATIONS:
                res = job(root / setting / f"not-{p}-seed{seed}", root.parent / "ck",
                          **{**extra, "method": "not", "seed": seed,
                             "method-params": f"not.perturbation={p}"})["not"]
                rows[p][seed] = (gap(res["unlearned"], retrain["unlearned"]),
                                 res["unlearned"]["test"])
            print(f"perturbations ({setting}), seed {seed} done", flush=True)
        out.append(table(f"digits / CNN, {label}: NoT's perturbation of the first layer "
                         "(11 recovery rounds)", rows, retrain_test))
    return "\n".join(out)


def layer_section(root: Path, seeds: list[int]) -> str:
    rows: dict[str, dict] = {name: {} for name in VIT_LAYERS}
    retrain_test = {}
    for seed in seeds:
        # vit_tiny barely learns 8x8 digits with FedAvg and SGD (14% test after 30
        # rounds at lr 0.01, 20% at 0.2); the synthetic data's class prototypes it learns.
        common = {"model.name": "vit_tiny", "dataset.name": "synthetic", "seed": seed}
        retrain = job(root / f"retrain-seed{seed}", root.parent / "ck", method="retrain",
                      **common)["retrain"]
        retrain_test[seed] = retrain["unlearned"]["test"]
        for name, layer in VIT_LAYERS.items():
            tag = layer.replace(":", "-").replace(".", "_")
            res = job(root / f"not-{tag}-seed{seed}", root.parent / "ck", method="not",
                      **common, **{"negation.layers": layer})["not"]
            rows[name][seed] = (gap(res["unlearned"], retrain["unlearned"]),
                                res["unlearned"]["test"])
        print(f"layers, seed {seed} done", flush=True)
    return table("synthetic / vit_tiny: which layer NoT negates (client 0 forgotten, 11 "
                 "recovery rounds)", rows, retrain_test)


def lwo_section(root: Path, seeds: list[int]) -> str:
    rows: dict[str, dict] = {"first layer negated (NoT's check)": {},
                             "first layer as trained (FT's)": {}}
    retrain_test = {}
    for seed in seeds:
        both = job(root / f"lwo-seed{seed}", root.parent / "ck", method="retrain,lwo",
                   seed=seed)
        retrain, negated = both["retrain"], both["lwo"]
        kept = job(root / f"lwo-none-seed{seed}", root.parent / "ck", method="lwo", seed=seed,
                   **{"method-params": "lwo.perturbation=none"})["lwo"]
        retrain_test[seed] = retrain["unlearned"]["test"]
        for name, res in zip(rows, (negated, kept)):
            rows[name][seed] = (gap(res["unlearned"], retrain["unlearned"]),
                                res["unlearned"]["test"])
        print(f"layer-wise optimality, seed {seed} done", flush=True)
    return table("digits / CNN: layer-wise optimality check (first layer frozen, every "
                 "other layer re-initialised, Retrain's 30 rounds)", rows, retrain_test)


def cka_section(root: Path, perturbation_root: Path, lwo_root: Path) -> str:
    from fedunlearn.harness.analysis import run_cka

    perturbation_root = perturbation_root / "client"
    negate, ft = perturbation_root / "not-negate-seed0", perturbation_root / "not-none-seed0"
    pretrained = json.loads((negate / "not" / "results.json").read_text())["pretrain"]["path"]
    original = root / "original.pt"
    root.mkdir(parents=True, exist_ok=True)
    torch.save(torch.load(pretrained, weights_only=True)["state"], original)
    others = [("NoT@0", negate / "not" / "model-round0.pt"),
              ("NoT@end", negate / "not" / "model.pt"), ("FT@end", ft / "not" / "model.pt"),
              ("Retrain@end", perturbation_root / "retrain-seed0" / "retrain" / "model.pt"),
              ("NoT check start", lwo_root / "lwo-seed0" / "lwo" / "model-round0.pt"),
              ("FT check start", lwo_root / "lwo-none-seed0" / "lwo" / "model-round0.pt")]
    result = run_cka("digits", "cnn", ("FT@0 (original)", str(original)),
                     [(n, str(p)) for n, p in others], root)
    return "#### CKA to the original model, per layer (digits / CNN, seed 0, 360 test " \
           "images)\n\n" + result["table"] + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sections", default="perturbation,layers,lwo,cka")
    p.add_argument("--settings", default="client,class",
                   help="perturbation settings: client (IID, client 0 forgotten), class "
                        "(every client forgets class 3)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sections = args.sections.split(",")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(args.out or Path(__file__).parent / "results" / f"not-analysis-{stamp}")
    torch.set_num_threads(1)
    from fedunlearn.experiment.report import write_report

    parts, times = [], {}
    for name, fn in (("perturbation", perturbation_section), ("layers", layer_section),
                     ("lwo", lwo_section)):
        if name in sections:
            started = time.perf_counter()
            if name == "perturbation":
                parts.append(fn(root / name, seeds, args.settings.split(",")))
            else:
                parts.append(fn(root / name, seeds))
            if name != "lwo":
                write_report(root / name)
            times[name] = time.perf_counter() - started
    if "cka" in sections:
        started = time.perf_counter()
        parts.append(cka_section(root / "cka", root / "perturbation", root / "lwo"))
        times["cka"] = time.perf_counter() - started
    text = "\n".join(parts) + "\nWall time: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in times.items()) + f" (seeds {args.seeds}).\n"
    (root / "analysis.md").write_text(text)
    print(text)
    print(f"Written to {root} (figures: */report/, cka/cka.png)")


if __name__ == "__main__":
    main()

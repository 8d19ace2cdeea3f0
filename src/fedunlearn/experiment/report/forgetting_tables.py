"""``forgetting-audit.md`` and ``forgetting-audit.json``: the tables of the forgetting audit,
each naming its reference, K and the floor (:mod:`.forgetting` computes them)."""

from __future__ import annotations

from collections.abc import Sequence

from .constants import LABELS
from .forgetting_relearn import relearn_table

DOCS = "docs/measuring-forgetting.md"
AUDIT_NOTE = (
    "KLOM: per point, KL(method ‖ reference) of binned margins over models, in nats "
    "(p50/p95/p99 over points and splits); **> floor p95**: share of the method's per-point "
    "KLOM values above the floor's 95th percentile (0.05 for the floor itself); AUC, TPR@1% "
    "and TPR@5% FPR: the per-example attack (U-LiRA style, offline) separating the method's "
    "models from held-out reference models. **floor**: the same numbers for reference "
    "models standing in for the method (KLOM: two disjoint halves of the reference seeds; "
    "attack: held-out reference models): what a method indistinguishable from the "
    f"reference reads. Definitions: {DOCS}.")
TRIGGER_NOTE = (
    "**trigger** points: the ASR's samples (test samples whose true label is not the "
    "backdoor's target, the trigger stamped as the ASR stamps it), margins taken to the "
    "target (the label the poisoned client trained them under): a model that kept the "
    "backdoor has high margins there, Retrain low ones.")
SCALAR_NOTE = ("mean ± 95% CI over seeds (Student t; mean alone for one seed), K = seeds; "
               "accuracies, MIA (population-level) and ASR in %.")


def _seed_text(seeds: Sequence[int]) -> str:
    if len(seeds) > 6:
        return f"{seeds[0]}, {seeds[1]}, …, {seeds[-1]}"
    return ", ".join(map(str, seeds))


def _cell(stat: dict | None) -> str:
    if not stat:
        return "—"
    if stat.get("n", 0) < 2:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['half_width']:.2f}"


def scalar_table(setting) -> str:
    keys = list(setting.group.keys)
    head = "| Models | K | " + " | ".join(LABELS.get(k, k) for k in keys) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(keys)]
    for m in setting.model_sets:
        stats = setting.scalars[m.label]
        lines.append(f"| {m.label} | {m.k} | "
                     + " | ".join(_cell(stats.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _numbers(klom: dict, share: float, attack: dict) -> str:
    return (f"{klom['p50']:.2f} | {klom['p95']:.2f} | {klom['p99']:.2f} | {share:.2f} | "
            f"{attack['auc']:.2f} | {attack['tpr_at_1pct_fpr']:.2f} | "
            f"{attack['tpr_at_5pct_fpr']:.2f}")


def audit_table(reference: str, audits: dict) -> str:
    """Per point set, the floor's row, then each method's; a floor row again wherever a
    method's floor differs (a method with fewer seeds is scored at its own size)."""
    lines = ["| Points | Models | K | KLOM p50 | p95 | p99 | > floor p95 | AUC | TPR@1% "
             "| TPR@5% |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sets = next(iter(audits.values())).point_sets if audits else {}
    for name in sets:
        last = None
        for label, audit in audits.items():
            a = audit[name]
            floor = (a.klom_floor, a.floor_share_above_floor, a.attack_floor)
            if floor != last:
                per_side = audit.settings["klom_models_per_side"]
                lines.append(f"| {name} ({a.n_points}) | floor: {reference} vs itself | "
                             f"{per_side} + {per_side} | {_numbers(*floor)} |")
                last = floor
            lines.append(f"| {name} ({a.n_points}) | {label} | {audit.k_method} | "
                         f"{_numbers(a.klom, a.share_above_floor, a.attack)} |")
    return "\n".join(lines)


def setting_markdown(setting, figures: Sequence[str], level: str = "##") -> str:
    g = setting.group
    seeds = setting.seeds
    sizes = ", ".join(f"{n} {name}" for name, n in setting.sizes.items())
    parts = [f"{level} Forgetting audit: {g.title}\n",
             f"K = {len(seeds)} seeds ({_seed_text(seeds)}), partition seed "
             f"{setting.partition_seed}; per-example outputs on {sizes} points.\n",
             f"{level}# Scalar metrics over seeds\n", scalar_table(setting),
             f"\n{SCALAR_NOTE}\n"]
    if setting.relearn:
        parts += [f"{level}# Relearn time over seeds\n", relearn_table(setting.relearn), ""]
    for ref in setting.references:
        audits = setting.audits[ref.label]
        parts += [f"{level}# Against {ref.label}, K = {ref.k}\n",
                  audit_table(ref.label, audits) if audits else "No model set to compare.",
                  ""]
    parts.append(AUDIT_NOTE + "\n")
    if "trigger" in setting.sizes:
        parts.append(TRIGGER_NOTE + "\n")
    parts += [f"- {note}" for note in setting.notes]
    for path in figures:
        name = path.rsplit("/", 1)[-1].removesuffix(".png")
        parts.append(f"![{name}]({path})\n")
    return "\n".join(parts)


def audit_markdown(settings, skipped, figures: dict, min_seeds: int,
                   level: str = "#") -> str:
    parts = [f"{level} Forgetting audit\n",
             ("Every method (the Original included) against every Retrain reference, on "
              "forget, retain and test points (and trigger points where a backdoor was "
              f"planted); a setting needs outputs.npz from at least {min_seeds} seeds.\n")]
    for setting in settings:
        parts.append(setting_markdown(setting, figures.get(setting.group.slug, []),
                                      level + "#"))
    for title, reason in skipped:
        parts.append(f"{level}# Forgetting audit: {title}\n\nNot computed: {reason}.\n")
    return "\n".join(parts)


def audit_json(settings, skipped, min_seeds: int) -> dict:
    out = {"min_seeds": min_seeds, "settings": [],
           "skipped": [{"title": t, "reason": r} for t, r in skipped]}
    for s in settings:
        audits = {}
        for ref, per_method in s.audits.items():
            audits[ref] = {}
            for label, audit in per_method.items():
                entry = audit.to_dict()
                for name, point_set in audit.point_sets.items():
                    entry["point_sets"][name]["roc"] = {
                        key: [float(v) for v in values] for key, values in point_set.roc.items()}
                audits[ref][label] = entry
        out["settings"].append({
            "title": s.group.title, "slug": s.group.slug, "setting": s.group.setting,
            "partition_seed": s.partition_seed, "seeds": s.seeds, "points": s.sizes,
            "models": {m.label: {"method": m.key, "seeds": m.seeds} for m in s.model_sets},
            "references": [m.label for m in s.references],
            "scalars": s.scalars, "audits": audits, "notes": s.notes,
            "relearn": {label: r.to_dict() for label, r in s.relearn.items()}})
    return out

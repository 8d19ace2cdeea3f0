"""``fedunlearn-report <dir>``: the NoT paper's tables and plots from results files.

Reads every ``results.json`` under a directory (recursively: a sweep dir, a job dir, or
several sweeps), groups them by setting and writes to ``<dir>/report`` (or ``--out``):

* ``summary.md`` / ``summary.csv``: all settings; and per setting
  ``<setting>/summary.md``, ``<setting>/summary.csv``: one row per method with Retain,
  Forget, Test, MIA (and ASR when every result of the setting has it) as mean ± std over
  seeds with ``(|Δ|)`` to Retrain, the Average Gap, communication bytes and FLOPs, the
  lowest Average Gap among non-Retrain methods marked with ★ (the layout of the paper's
  Table 1);
* ``<setting>/metrics.png``: the metrics and the two costs per method side by side, error
  bars = std (the paper's Figure 1);
* ``forget_ratio.png`` when settings differ only in the forget ratio (number of target
  clients): Average Gap and communication per method against the ratio (Figure 6);
* when NoT results carry per-round trajectories (``eval.trajectory=true``):
  ``<setting>/gap_by_perturbation.png`` (Figure 4: Avg. Gap to Retrain against rounds,
  one line per perturbation at the layer selection with the most perturbations) and
  ``<setting>/gap_by_layer.png`` (Figure 5: one line per perturbed layer selection at
  the perturbation with the most selections, negate on ties), mean ± std over seeds
  (shaded), their numbers (round 0, a few rounds, the end) in the summaries and per
  round in ``<setting>/gap_trajectory.csv``. A point without ``gap`` (Retrain ran in
  another job, as in a sweep) gets it here from the Retrain result of the same setting
  and seed; a trajectory with neither is skipped with a note.

Definitions (every number is recomputed from the results files):

* mean and std over the results files of a row (normally one per seed); std is the
  *sample* standard deviation (ddof=1), 0 for a single file; NaN values are skipped;
* Δ = |mean(method) − mean(Retrain)| per metric, Retrain of the same setting;
* Avg. Gap = :func:`fedunlearn.metrics.average_gap` of the method's means against
  Retrain's means: the mean of |Δ| over Retain, Forget, Test and MIA (not ASR);
* Comm. = total bytes sent to and from clients in the unlearning step, recovery and
  recovery's validation
  (``cost.comm_bytes``), Comp. = its FLOPs (``cost.flops``), both means over seeds.

A setting without Retrain results gets empty Δ and Avg. Gap columns and a note.

A setting is: dataset, model, forget scope, target clients (their number gives the forget
ratio), forgotten classes (class-wise), forgotten fraction (instance-wise),
partitioning, a planted backdoor, and the pretraining protocol (rounds, lr, batch size,
...), since all of these change the Retrain reference. Within a setting a row is a method; results of the
same method that differ in method settings (``unlearn_*``, ``negate_*``) get one row
each, labelled with the differing values.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import METRIC_KEYS, average_gap
from ..harness.results import RESULTS_FILE, metric_keys

REPORT_DIR = "report"
REFERENCE = "retrain"
BEST_MARK = "★"
DISPLAY = {"retrain": "Retrain", "ft": "FT", "not": "NoT", "federaser": "FedEraser",
           "fukd": "FUKD", "pgd": "PGD", "mode": "MoDE", "fcu": "FCU", "puf": "PUF",
           "randl": "RandL", "ga": "GA", "badt": "BadT", "l1_sparse": "ℓ1-sparse",
           "ssd": "SSD", "salun": "SalUn"}
LABELS = {"retain": "Retain", "forget": "Forget", "test": "Test", "mia": "MIA", "asr": "ASR"}
# Settings that change the Retrain reference: results differing in them are never averaged.
PROTOCOL_FIELDS = ("val_fraction", "batch_size", "local_epochs", "momentum",
                   "pretrain_rounds", "pretrain_lr", "mia_max_members", "server_data_fraction")
# Method settings: they split a method's row, never the setting (Retrain ignores them).
METHOD_FIELDS = ("unlearn_rounds", "unlearn_lr", "unlearn_local_epochs", "unlearn_clip_norm",
                 "unlearn_server_momentum", "recovery_stop", "recovery_validate_every",
                 "recovery_target_gap", "recovery_patience", "recovery_min_delta",
                 "negate_layers", "negate_bias", "params")
# "params" is the method's own typed parameters (results.json "params"), not a config field.
COST_KEYS = ("comm_bytes", "flops", "storage_bytes", "rounds", "wall_s")
STD_NOTE = ("mean ± std over seeds (sample std, ddof=1; 0 for one seed); (x) = |Δ| to "
            "Retrain; Avg. Gap = mean |Δ| over Retain, Forget, Test, MIA; "
            f"{BEST_MARK} = lowest Avg. Gap among non-Retrain methods. Accuracies and MIA "
            "in %, Comm. in bytes, Comp. in FLOPs (unlearning step + recovery), Storage in bytes "
            "kept between rounds (the training history a method reads, MoDE's degradation "
            "model; 0 for the others).")
NO_RETRAIN_NOTE = ("No Retrain results for this setting: Δ and Avg. Gap need the Retrain "
                   "reference (add method=retrain to the sweep).")


# ---------------------------------------------------------------------------------------
# loading and grouping
# ---------------------------------------------------------------------------------------
def load_results(root: str | Path) -> list[tuple[Path, dict]]:
    """Every readable ``results.json`` under ``root`` (sorted by path)."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
    out = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"report: skipping {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "method" not in data or "unlearned" not in data:
            print(f"report: skipping {path}: not a fedunlearn results file", file=sys.stderr)
            continue
        out.append((path, data))
    return out


def _ints(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, str):
        return tuple(int(p) for p in re.split(r"[,;\s]+", value.strip()) if p)
    return tuple(int(v) for v in value)


def setting_of(result: dict) -> dict[str, Any]:
    """The setting a result belongs to (what changes the Retrain reference)."""
    cfg = result.get("config", {}) or {}
    forget = cfg.get("forget", {}) or {}
    scope = str(forget.get("scope", "client"))
    clients = _ints(forget.get("clients", (0,)))
    num_clients = int(cfg.get("num_clients", 10))
    partitioning = str(cfg.get("partitioning", "iid"))
    setting: dict[str, Any] = {
        "dataset": str(cfg.get("dataset", "?")),
        "model": str(cfg.get("model", "?")),
        "scope": scope,
        "targets": len(clients),
        "num_clients": num_clients,
        "ratio": round(len(clients) / num_clients, 6) if num_clients else float("nan"),
        "clients": ",".join(str(c) for c in clients),
        "classes": ",".join(str(c) for c in _ints(forget.get("classes", ())))
        if scope == "class" else "",
        "fraction": float(forget.get("fraction", 0.1))
        if scope == "instance" and not forget.get("sample_ids") else None,
        "sample_ids": len(_ints(forget.get("sample_ids", ()))) if scope == "instance" else 0,
        "data_of": int(forget.get("data_of", -1)),
        "partitioning": partitioning,
        "alpha": cfg.get("alpha") if partitioning == "dirichlet" else None,
        "backdoor": _backdoor(cfg.get("backdoor")),
    }
    for name in PROTOCOL_FIELDS:
        setting[name] = cfg.get(name)
    return setting


def _backdoor(value: Any) -> str:
    """A planted backdoor, compactly (it changes pretraining, hence the setting); "" if none."""
    if not isinstance(value, dict) or not _ints(value.get("clients", ())):
        return ""
    clients = ",".join(str(c) for c in _ints(value["clients"]))
    extra = ", ".join(f"{k}={value[k]}" for k in ("fraction", "patch_size", "position", "value")
                      if k in value)
    return f"clients {clients} -> label {value.get('target', 0)}" + (f" ({extra})" if extra else "")


def _key(d: dict) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in sorted(d.items()))


@dataclass
class Row:
    """One method (and method-settings variant) in one setting."""

    method: str
    label: str
    files: list[Path]
    mean: dict[str, float]
    std: dict[str, float]
    cost_mean: dict[str, float]
    cost_std: dict[str, float]
    delta: dict[str, float] = field(default_factory=dict)
    avg_gap: float | None = None
    best: bool = False
    contributing: int | None = None

    @property
    def n(self) -> int:
        """Seeds that contributed: results whose every metric could be computed."""
        return len(self.files) if self.contributing is None else self.contributing

    @property
    def is_reference(self) -> bool:
        return self.method == REFERENCE


@dataclass
class Group:
    """All rows of one setting."""

    setting: dict[str, Any]
    title: str
    slug: str
    keys: tuple[str, ...]
    rows: list[Row]
    original: dict[str, float]
    seeds: list[int]

    @property
    def reference(self) -> Row | None:
        return next((r for r in self.rows if r.is_reference), None)

    @property
    def best_rows(self) -> list[Row]:
        return [r for r in self.rows if r.best]


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values; NaN if none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def method_order(method: str) -> tuple:
    """Retrain first, FT second, NoT last, the others alphabetically in between."""
    return ({REFERENCE: 0, "ft": 1}.get(method, 3 if method == "not" else 2), method)


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


def build_rows(entries: Sequence[tuple[Path, dict]], keys: Sequence[str]) -> list[Row]:
    """Aggregate the results of one setting into rows, with Δ, Avg. Gap and ★."""
    by_method: dict[str, list[tuple[Path, dict]]] = {}
    for path, r in entries:
        by_method.setdefault(str(r["method"]), []).append((path, r))
    rows: list[Row] = []
    for method in sorted(by_method, key=method_order):
        items = by_method[method]
        variants: dict[tuple, list[tuple[Path, dict]]] = {}
        for path, r in items:
            cfg = r.get("config", {}) or {}
            source = dict(cfg, params=r.get("params") or {})
            variant = () if method == REFERENCE else tuple(
                (f, json.dumps(source.get(f), sort_keys=True)) for f in METHOD_FIELDS)
            variants.setdefault(variant, []).append((path, r))
        varying = [f for i, f in enumerate(METHOD_FIELDS)
                   if len({v[i][1] for v in variants if v}) > 1]
        for variant in sorted(variants):
            group = variants[variant]
            label = display_name(method)
            if varying:
                values = dict(variant)
                label += " (" + ", ".join(f"{f}={json.loads(values[f])}" for f in varying) + ")"
            mean, std, cost_mean, cost_std = {}, {}, {}, {}
            # A result with a metric that could not be computed (a node failed its
            # evaluation) contributes nothing: its other metrics would bias the means.
            complete = [(p, r) for p, r in group
                        if all(_finite(r["unlearned"].get(k)) for k in keys)]
            for k in keys:
                mean[k], std[k] = mean_std(r["unlearned"].get(k) for _, r in complete)
            for k in COST_KEYS:
                cost_mean[k], cost_std[k] = mean_std((r.get("cost") or {}).get(k) for _, r in group)
            rows.append(Row(method=method, label=label, files=[p for p, _ in group],
                            mean=mean, std=std, cost_mean=cost_mean, cost_std=cost_std,
                            contributing=len(complete)))
    reference = next((r for r in rows if r.is_reference), None)
    if reference is not None:
        for row in rows:
            row.delta = {k: abs(row.mean[k] - reference.mean[k]) for k in keys}
            row.avg_gap = average_gap(row.mean, reference.mean)
        gaps = [r.avg_gap for r in rows
                if not r.is_reference and r.avg_gap is not None and math.isfinite(r.avg_gap)]
        if gaps:
            best = min(gaps)
            for row in rows:
                if (not row.is_reference and row.avg_gap is not None
                        and math.isfinite(row.avg_gap) and abs(row.avg_gap - best) <= 1e-9):
                    row.best = True
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")


def _fmt_num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _title(setting: dict, extras: Sequence[str]) -> tuple[str, str]:
    s = setting
    scope = s["scope"]
    if s["num_clients"] == 1:  # one client holding all training data: the paper's Table 2
        title = (f"{s['dataset']} / {s['model']} / centralized (one client holds all "
                 f"training data), {scope}-wise")
        slug = f"{s['dataset']}-{s['model']}-centralized-{scope}"
    else:
        title = (f"{s['dataset']} / {s['model']} / {scope}-wise, {s['targets']} of "
                 f"{s['num_clients']} clients (forget ratio {s['ratio']:.3g})")
        slug = f"{s['dataset']}-{s['model']}-{scope}-{s['targets']}of{s['num_clients']}"
    if scope == "class":
        title += f", classes {s['classes']}"
        slug += f"-classes{s['classes'].replace(',', '+')}"
    if scope == "instance":
        if s["fraction"] is not None:
            title += f", fraction {_fmt_num(s['fraction'])}"
            slug += f"-frac{_fmt_num(s['fraction'])}"
        else:
            title += f", {s['sample_ids']} sample ids"
            slug += f"-ids{s['sample_ids']}"
    if s["partitioning"] != "iid":
        title += f", {s['partitioning']}" + (f" α={s['alpha']}" if s["alpha"] is not None else "")
        slug += f"-{s['partitioning']}" + (f"{s['alpha']}" if s["alpha"] is not None else "")
    else:
        title += ", IID"
    if s.get("backdoor"):
        title += f", backdoor by {s['backdoor'].split(' (')[0]}"
        slug += "-backdoor" + s["backdoor"].split(" ")[1].replace(",", "+")
    for name in extras:
        title += f", {name}={_fmt_num(s[name])}"
        slug += f"-{name}{_fmt_num(s[name])}"
    return title, _slug(slug)


def _varying(settings: Sequence[dict], skip: Iterable[str]) -> list[str]:
    skip = set(skip)
    names = [k for k in settings[0] if k not in skip] if settings else []
    return [k for k in names if len({json.dumps(s.get(k)) for s in settings}) > 1]


_IN_TITLE = ("dataset", "model", "scope", "targets", "num_clients", "ratio", "classes",
             "fraction", "sample_ids", "partitioning", "alpha", "backdoor")


def group_results(results: Sequence[tuple[Path, dict]]) -> list[Group]:
    """Group results by setting and aggregate each group into rows."""
    buckets: dict[tuple, tuple[dict, list]] = {}
    for path, r in results:
        setting = setting_of(r)
        buckets.setdefault(_key(setting), (setting, []))[1].append((path, r))
    settings = [s for s, _ in buckets.values()]
    extras = _varying(settings, _IN_TITLE + ("clients",))
    # Which clients are targets matters only where the same number of targets differs.
    if len({(s["targets"], s["clients"]) for s in settings}) > len({s["targets"] for s in settings}):
        extras.append("clients")
    groups = []
    for setting, entries in buckets.values():
        title, slug = _title(setting, extras)
        keys = metric_keys([r for _, r in entries])
        seeds = sorted({int((r.get("config") or {}).get("seed", 0)) for _, r in entries})
        # The original (pretrained) model: once per seed (every method of a seed shares it).
        per_seed: dict[int, dict] = {}
        for _, r in entries:
            per_seed.setdefault(int((r.get("config") or {}).get("seed", 0)), r.get("original") or {})
        original = {k: mean_std(o.get(k) for o in per_seed.values())[0] for k in keys}
        groups.append(Group(setting=setting, title=title, slug=slug, keys=keys,
                            rows=build_rows(entries, keys), original=original, seeds=seeds))
    groups.sort(key=lambda g: (g.setting["dataset"], g.setting["model"], g.setting["scope"],
                               g.setting["partitioning"], g.setting["ratio"], g.slug))
    seen: dict[str, int] = {}
    for g in groups:  # unique directory names even if two titles collide
        if g.slug in seen:
            seen[g.slug] += 1
            g.slug = f"{g.slug}-{seen[g.slug]}"
        else:
            seen[g.slug] = 0
    return groups


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------
def _f2(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _e2(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2e}"


def _storage(value: float | None) -> str:
    """What a method keeps between rounds: 0 for most, bytes otherwise."""
    if value is None or not math.isfinite(value):
        return "—"
    return "0" if value == 0 else f"{value:.2e}"


def table_markdown(group: Group) -> str:
    """The setting's table in the layout of the paper's Table 1."""
    ref = group.reference is not None
    header = ["Method"] + [f"{LABELS.get(k, k)} (Δ↓)" for k in group.keys] + [
        "Avg. Gap ↓", "Comm. (B) ↓", "Comp. (FLOPs) ↓", "Storage (B) ↓", "Seeds"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in group.rows:
        cells = []
        for k in group.keys:
            cell = f"{_f2(row.mean[k])} ± {_f2(row.std[k])}"
            if ref:
                cell += f" ({_f2(row.delta.get(k))})"
            cells.append(cell)
        gap = _f2(row.avg_gap) if ref else ""
        name = row.label
        if row.best:
            name, gap = f"**{name}** {BEST_MARK}", f"**{gap}** {BEST_MARK}"
        cells += [gap, _e2(row.cost_mean["comm_bytes"]), _e2(row.cost_mean["flops"]),
                  _storage(row.cost_mean["storage_bytes"]), str(row.n)]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n"


def group_markdown(group: Group, heading: str = "##", images: Sequence[str] = ()) -> str:
    parts = [f"{heading} {group.title}\n", table_markdown(group)]
    notes = [STD_NOTE]
    if group.reference is None:
        notes.insert(0, f"**{NO_RETRAIN_NOTE}**")
    orig = ", ".join(f"{LABELS.get(k, k)} {_f2(v)}" for k, v in group.original.items())
    notes.append(f"Original (pretrained) model, mean over seeds {group.seeds}: {orig}.")
    parts.append("\n" + "\n\n".join(notes) + "\n")
    for image in images:
        parts.append(f"\n![{Path(image).stem}]({image})\n")
    return "\n".join(parts)


CSV_SETTING = ("dataset", "model", "scope", "targets", "num_clients", "ratio", "clients",
               "classes", "fraction", "partitioning", "alpha", "backdoor")


def csv_header(keys: Sequence[str]) -> list[str]:
    head = ["setting", *CSV_SETTING, "method", "label", "seeds"]
    for k in keys:
        head += [f"{k}_mean", f"{k}_std", f"{k}_delta"]
    return head + ["avg_gap", "best", "comm_bytes", "comm_bytes_std", "flops", "flops_std",
                   "storage_bytes", "rounds", "wall_s", "files"]


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.10g}"


def csv_rows(group: Group, keys: Sequence[str]) -> list[list[str]]:
    out = []
    for row in group.rows:
        setting = ["" if group.setting.get(c) is None else _fmt_num(group.setting.get(c))
                   for c in CSV_SETTING]
        cells = [group.title, *setting, row.method, row.label, str(row.n)]
        for k in keys:
            cells += [_num(row.mean.get(k)), _num(row.std.get(k)),
                      _num(row.delta.get(k)) if row.delta else ""]
        cells += [_num(row.avg_gap), BEST_MARK if row.best else "",
                  _num(row.cost_mean["comm_bytes"]), _num(row.cost_std["comm_bytes"]),
                  _num(row.cost_mean["flops"]), _num(row.cost_std["flops"]),
                  _num(row.cost_mean["storage_bytes"]),
                  _num(row.cost_mean["rounds"]), _num(row.cost_mean["wall_s"]),
                  ";".join(str(p) for p in row.files)]
        out.append(cells)
    return out


def write_csv(path: Path, groups: Sequence[Group]) -> None:
    keys = list(METRIC_KEYS)
    if groups and all("asr" in g.keys for g in groups):
        keys.append("asr")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(csv_header(keys))
    for g in groups:
        writer.writerows(csv_rows(g, keys))
    path.write_text(buf.getvalue())


# ---------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------
def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    fixed = {REFERENCE: cmap(7), "ft": cmap(0), "not": cmap(3)}  # grey, blue, red
    free = [cmap(i) for i in (1, 2, 4, 5, 6, 8, 9)]
    out, i = {}, 0
    for m in methods:
        if m in fixed:
            out[m] = fixed[m]
        else:
            out[m] = free[i % len(free)]
            i += 1
    return out


def plot_metrics(group: Group, path: Path) -> Path:
    """Figure 1 style: one panel per metric and per cost, one bar per method."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(k, f"{LABELS.get(k, k)} (%)", "mean") for k in group.keys] + [
        ("comm_bytes", "Communication (bytes)", "cost"), ("flops", "Computation (FLOPs)", "cost")]
    ncols = 3 if len(panels) <= 6 else 4
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows = group.rows
    colors = _colors([r.method for r in rows])
    x = list(range(len(rows)))
    ref = group.reference
    for ax, (key, label, kind) in zip(axes, panels):
        if kind == "mean":
            means = [r.mean[key] for r in rows]
            stds = [r.std[key] for r in rows]
        else:
            means = [r.cost_mean[key] for r in rows]
            stds = [r.cost_std[key] for r in rows]
        ax.bar(x, [0 if not math.isfinite(m) else m for m in means],
               yerr=[0 if not math.isfinite(s) else s for s in stds], capsize=4,
               color=[colors[r.method] for r in rows], edgecolor="black", linewidth=0.5)
        if ref is not None:
            value = ref.mean[key] if kind == "mean" else ref.cost_mean[key]
            if math.isfinite(value):
                ax.axhline(value, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(label.split(" (")[0] + (" ↓" if kind == "cost" else ""))
        ax.set_ylabel(label)
        ax.set_xticks(x, [r.label for r in rows], rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
        if kind == "mean":
            top = max([m + s for m, s in zip(means, stds) if math.isfinite(m + s)] or [100.0])
            ax.set_ylim(0, max(100.0, top * 1.05) if key != "asr" else max(1.0, top * 1.1))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Patch(facecolor=colors[r.method], edgecolor="black", label=r.label) for r in rows]
    if ref is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([0], [0], color="black", linestyle="--", label="Retrain (reference)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    n = sorted({r.n for r in rows})
    fig.suptitle(f"{group.title}\nmean ± std over {'/'.join(map(str, n))} seed(s)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def ratio_families(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    """Settings that differ only in the target clients, when there are ≥ 2 ratios."""
    fams: dict[tuple, list[Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.setting.items() if k not in ("targets", "ratio", "clients")}
        fams.setdefault(_key(rest), []).append(g)
    out = []
    for members in fams.values():
        if len({g.setting["ratio"] for g in members}) < 2:
            continue
        members = sorted(members, key=lambda g: g.setting["ratio"])
        s = members[0].setting
        name = _slug(f"{s['dataset']}-{s['model']}-{s['scope']}"
                     + (f"-classes{s['classes']}" if s["classes"] else "")
                     + ("" if s["partitioning"] == "iid" else f"-{s['partitioning']}"))
        out.append((name, members))
    return out


def plot_forget_ratio(name: str, members: Sequence[Group], path: Path) -> Path:
    """Figure 6 style: Avg. Gap and communication per method against the forget ratio."""
    from matplotlib.figure import Figure

    methods = sorted({r.method for g in members for r in g.rows}, key=method_order)
    colors = _colors(methods)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_gap, ax_comm = fig.subplots(1, 2)
    for method in methods:
        labels = sorted({r.label for g in members for r in g.rows if r.method == method})
        for label in labels:
            pts = [(g.setting["ratio"], r) for g in members for r in g.rows if r.label == label]
            ratios = [100 * p for p, _ in pts]
            style = dict(color=colors[method], marker="o", label=label, capsize=4)
            if method != REFERENCE:
                gap_pts = [(x, r.avg_gap) for x, (_, r) in zip(ratios, pts)
                           if r.avg_gap is not None and math.isfinite(r.avg_gap)]
                if gap_pts:
                    ax_gap.plot([p for p, _ in gap_pts], [v for _, v in gap_pts],
                                color=colors[method], marker="o", label=label)
            ax_comm.errorbar(ratios, [r.cost_mean["comm_bytes"] for _, r in pts],
                             yerr=[0 if not math.isfinite(r.cost_std["comm_bytes"])
                                   else r.cost_std["comm_bytes"] for _, r in pts], **style)
    ticks = sorted({100 * g.setting["ratio"] for g in members})
    for ax in (ax_gap, ax_comm):
        ax.set_xlabel("forget ratio (% of clients asking to be forgotten)")
        ax.set_xticks(ticks, [f"{t:.3g}%" for t in ticks])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_gap.set_ylabel("Avg. Gap to Retrain (percentage points)")
    ax_gap.set_title("Avg. Gap ↓")
    ax_comm.set_ylabel("Communication (bytes)")
    ax_comm.set_title("Communication ↓ (mean ± std)")
    if not ax_gap.get_lines():
        ax_gap.text(0.5, 0.5, "no Retrain results: no Avg. Gap", ha="center",
                    transform=ax_gap.transAxes)
    fig.suptitle(f"{name}: effect of the forget ratio", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def ratio_table(members: Sequence[Group]) -> str:
    ratios = [g.setting["ratio"] for g in members]
    labels = []
    for g in members:
        for r in g.rows:
            if r.label not in labels:
                labels.append(r.label)
    head = "| Method | " + " | ".join(f"{100 * x:.3g}%: Avg. Gap / Comm. (B)" for x in ratios) + " |"
    lines = [head, "|---|" + "---:|" * len(ratios)]
    for label in labels:
        cells = []
        for g in members:
            row = next((r for r in g.rows if r.label == label), None)
            cells.append("" if row is None else
                         f"{_f2(row.avg_gap)} / {_e2(row.cost_mean['comm_bytes'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# trajectories: Avg. Gap to Retrain against rounds (the NoT paper's Figures 4 and 5)
# ---------------------------------------------------------------------------------------
TRAJECTORY_METHOD = "not"
PERTURBATION_ORDER = ("negate", "none", "reinit", "noise", "flip", "rotate")
# NoT's settings besides the perturbation and the layer selection: they split a line.
_REST_FIELDS = tuple(f for f in METHOD_FIELDS if f not in ("negate_layers", "params"))
GAP_NOTE = ("Avg. Gap to Retrain = mean |Δ| over Retain, Forget, Test and MIA between the "
            "model after that round (round 0: right after the perturbation, before any "
            "recovery round) and Retrain's final model of the same seed; mean ± std over "
            "seeds (ddof=1), End = each seed's last round.")


def perturbation_of(result: dict) -> str:
    """NoT's perturbation: ``params.perturbation``, ``notes.perturbation``, else negate."""
    for part in ("params", "notes"):
        value = (result.get(part) or {}).get("perturbation")
        if value:
            return str(value)
    return "negate"


def layers_of(result: dict) -> str:
    """The perturbed layer selection: module names from ``notes.perturbed`` (``.weight``
    and ``.bias`` folded into their module), else ``config.negate_layers``, else
    ``first layer``."""
    names = (result.get("notes") or {}).get("perturbed") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        names = _str_list((result.get("config") or {}).get("negate_layers"))
    modules: list[str] = []
    for name in names:
        module = re.sub(r"\.(weight|bias)$", "", str(name))
        if module not in modules:
            modules.append(module)
    return "+".join(modules) if modules else "first layer"


def _str_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p for p in re.split(r"[,;\s]+", value.strip()) if p]
    return [str(v) for v in value]


def _perturbation_order(name: str) -> tuple:
    return (PERTURBATION_ORDER.index(name) if name in PERTURBATION_ORDER
            else len(PERTURBATION_ORDER), name)


@dataclass
class GapLine:
    """One NoT variant's Avg. Gap over rounds: one series per results file (seed)."""

    perturbation: str
    layers: str
    rest: tuple
    series: list[tuple[int, list[tuple[int, float]]]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for seed, _ in self.series})

    @property
    def n(self) -> int:
        return len(self.series)

    def rounds(self) -> list[int]:
        return sorted({r for _, pts in self.series for r, _ in pts})

    def at(self, rnd: int) -> tuple[float, float, int]:
        """Mean, std and count over the series that measured round ``rnd``."""
        vals = [g for _, pts in self.series for r, g in pts if r == rnd]
        return (*mean_std(vals), len(vals))

    def end(self) -> tuple[float, float, list[int]]:
        """Mean and std of each series' last point, and the last rounds."""
        lasts = [max(pts) for _, pts in self.series if pts]
        return (*mean_std(g for _, g in lasts), sorted({r for r, _ in lasts}))


@dataclass
class GapTrajectories:
    """A setting's NoT lines, and what the report did about missing gaps."""

    lines: list[GapLine]
    notes: list[str]
    from_job: int = 0       # trajectories whose gap the job wrote (Retrain in the job)
    computed: int = 0       # trajectories whose gap the report computed (separate Retrain)


def _retrain_references(entries: Sequence[tuple[Path, dict]]) -> dict[int, dict[str, float]]:
    """Per seed: Retrain's final metrics (the mean over its results files of that seed)."""
    per_seed: dict[int, list[dict]] = {}
    for _, r in entries:
        if r.get("method") == REFERENCE:
            seed = int((r.get("config") or {}).get("seed", 0))
            per_seed.setdefault(seed, []).append(r.get("unlearned") or {})
    return {seed: {k: mean_std(u.get(k) for u in found)[0] for k in METRIC_KEYS}
            for seed, found in per_seed.items()}


def _gap_to(point: dict, reference: dict[str, float]) -> float | None:
    """The mean |difference| over the metrics both have (as the job computes it)."""
    diffs = [abs(float(point[k]) - reference[k]) for k in METRIC_KEYS
             if _finite(point.get(k)) and _finite(reference.get(k))]
    return sum(diffs) / len(diffs) if diffs else None


def gap_trajectories(entries: Sequence[tuple[Path, dict]]) -> GapTrajectories:
    """The NoT trajectories of one setting's results, as Avg. Gap to Retrain per round.

    A point's gap is the trajectory's own ``gap`` (Retrain ran earlier in the same job)
    or, when missing, computed here from the Retrain result of the same setting and seed
    (``entries`` are one setting's results, so only the seed is matched here). A
    trajectory with neither is skipped with a note."""
    refs = _retrain_references(entries)
    lines: dict[tuple, GapLine] = {}
    notes: list[str] = []
    from_job = computed = 0
    skipped: list[str] = []
    for path, r in entries:
        if r.get("method") != TRAJECTORY_METHOD:
            continue
        points = (r.get("trajectory") or {}).get(TRAJECTORY_METHOD)
        if not isinstance(points, list) or not points:
            continue
        cfg = r.get("config") or {}
        seed = int(cfg.get("seed", 0))
        series: list[tuple[int, float]] = []
        own = used_ref = False
        for point in points:
            if not isinstance(point, dict) or not _finite(point.get("round")):
                continue
            gap = point.get("gap")
            if _finite(gap):
                own = True
                series.append((int(point["round"]), float(gap)))
                continue
            gap = _gap_to(point, refs[seed]) if seed in refs else None
            if gap is None:
                series = []
                break
            used_ref = True
            series.append((int(point["round"]), gap))
        if not series:
            skipped.append(f"`{path}` (seed {seed})")
            continue
        from_job += own and not used_ref
        computed += used_ref
        params = {k: v for k, v in (r.get("params") or {}).items() if k != "perturbation"}
        rest = tuple((f, json.dumps(cfg.get(f), sort_keys=True)) for f in _REST_FIELDS) + (
            ("params", json.dumps(params, sort_keys=True)),)
        key = (perturbation_of(r), layers_of(r), rest)
        line = lines.setdefault(key, GapLine(*key))
        line.series.append((seed, sorted(dict(series).items())))
        line.files.append(path)
    if skipped:
        notes.append(f"{len(skipped)} NoT trajectory(ies) skipped: no `gap` in the trajectory "
                     "and no Retrain result of the same setting and seed under the report's "
                     "root (add method=retrain with eval.trajectory=true or a separate "
                     "method=retrain job): " + ", ".join(skipped) + ".")
        for s in skipped:
            print(f"report: skipping the trajectory of {s}: no gap and no Retrain result "
                  "of the same setting and seed", file=sys.stderr)
    if computed:
        notes.append(f"The gap of {computed} trajectory(ies) was computed here against the "
                     "separate Retrain result of the same setting and seed (final Retain, "
                     "Forget, Test, MIA).")
    ordered = sorted(lines.values(), key=lambda l: (_perturbation_order(l.perturbation),
                                                    l.layers, l.rest))
    return GapTrajectories(lines=ordered, notes=notes, from_job=from_job, computed=computed)


def _pick(lines: Sequence[GapLine], fixed: str, varied: str, prefer: str | None) -> str:
    """The value of ``fixed`` (layers or perturbation) under which ``varied`` takes the
    most values (then: ``prefer``, the most results files, the first by name)."""
    values: dict[str, tuple[set, int]] = {}
    for line in lines:
        seen, n = values.get(getattr(line, fixed), (set(), 0))
        values[getattr(line, fixed)] = (seen | {getattr(line, varied)}, n + line.n)
    return min(values, key=lambda v: (-len(values[v][0]), v != prefer, -values[v][1], v))


def gap_figure_lines(traj: GapTrajectories, by: str) -> tuple[list[GapLine], str]:
    """The lines of ``gap_by_perturbation`` (``by="perturbation"``: one per perturbation at
    the layer selection with the most perturbations) or ``gap_by_layer`` (``by="layers"``:
    one per layer selection at the perturbation with the most layer selections, negate on
    ties); labelled, and what is held fixed."""
    if not traj.lines:
        return [], ""
    fixed = "layers" if by == "perturbation" else "perturbation"
    value = _pick(traj.lines, fixed, by, None if fixed == "layers" else "negate")
    chosen = [l for l in traj.lines if getattr(l, fixed) == value]
    varying = [i for i, (f, _) in enumerate(chosen[0].rest)
               if len({l.rest[i][1] for l in chosen}) > 1]
    out = []
    for line in chosen:
        label = getattr(line, by)
        if varying:
            label += " (" + ", ".join(f"{line.rest[i][0]}={json.loads(line.rest[i][1])}"
                                      for i in varying) + ")"
        out.append(GapLine(line.perturbation, line.layers, line.rest, line.series,
                           line.files, label))
    what = f"perturbed layers: {value}" if fixed == "layers" else f"perturbation: {value}"
    return out, what


def _checkpoints(lines: Sequence[GapLine]) -> list[int]:
    """Round 0, a few rounds in between (every round up to 5), not the last."""
    last = max((max(l.rounds()) for l in lines if l.rounds()), default=0)
    if last <= 5:
        return list(range(last))
    return sorted({0} | {int(last * f + 0.5) for f in (0.25, 0.5, 0.75)} - {last})


def _pm(mean: float, std: float) -> str:
    return "—" if not math.isfinite(mean) else f"{_f2(mean)} ± {_f2(std)}"


def gap_table(lines: Sequence[GapLine], name: str) -> str:
    """Avg. Gap to Retrain at round 0, a few rounds and the end, one row per line."""
    rounds = _checkpoints(lines)
    head = [name, "Seeds"] + [f"Round {r}" for r in rounds] + ["End"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for line in lines:
        cells = [line.label, str(line.n)]
        for rnd in rounds:
            mean, std, n = line.at(rnd)
            cells.append(_pm(mean, std) + ("" if n in (0, line.n) else f" (n={n})"))
        mean, std, lasts = line.end()
        span = (f"{lasts[0]}" if len(lasts) == 1 else f"{lasts[0]}–{lasts[-1]}") if lasts else "?"
        cells.append(f"{_pm(mean, std)} (round {span})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_gap(lines: Sequence[GapLine], path: Path, title: str) -> Path:
    """Avg. Gap to Retrain against rounds, one line per variant, ±std shaded."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, line in enumerate(lines):
        stats = [(r, *line.at(r)) for r in line.rounds()]
        xs = [r for r, m, _, _ in stats if math.isfinite(m)]
        means = [m for _, m, _, _ in stats if math.isfinite(m)]
        stds = [0.0 if not math.isfinite(s) else s for _, m, s, _ in stats if math.isfinite(m)]
        color = cmap(i % 10)
        ax.plot(xs, means, marker="o", markersize=3, color=color,
                label=f"{line.label} (n={line.n})")
        if line.n > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=color, alpha=0.2,
                            linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = right after the perturbation)")
    ax.set_ylabel("Avg. Gap to Retrain (percentage points)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


GAP_FIGURES = (("perturbation", "gap_by_perturbation.png", "Perturbation"),
               ("layers", "gap_by_layer.png", "Perturbed layers"))


def write_gap_csv(path: Path, figures: Sequence[tuple[str, list[GapLine]]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["figure", "label", "perturbation", "layers", "round", "gap_mean",
                     "gap_std", "seeds"])
    for fname, lines in figures:
        for line in lines:
            for rnd in line.rounds():
                mean, std, n = line.at(rnd)
                writer.writerow([fname, line.label, line.perturbation, line.layers, rnd,
                                 _num(mean), _num(std), n])
    path.write_text(buf.getvalue())


def draw_gap_figures(group: Group, traj: GapTrajectories,
                     gdir: Path) -> tuple[list[tuple[str, str, str, list[GapLine]]], list[Path]]:
    """Draw the setting's gap figures (and ``gap_trajectory.csv``) into ``gdir``:
    ``(file name, line kind, what is fixed, lines)`` per figure, and the files written."""
    figures, files = [], []
    for by, fname, name in GAP_FIGURES:
        lines, what = gap_figure_lines(traj, by)
        if not lines:
            continue
        seeds = sorted({s for line in lines for s in line.seeds})
        files.append(plot_gap(lines, gdir / fname, f"{group.title}\nNoT, {what}; "
                              f"mean ± std over seeds {seeds}"))
        figures.append((fname, name, what, lines))
    if figures:
        write_gap_csv(gdir / "gap_trajectory.csv", [(f, lines) for f, _, _, lines in figures])
        files.append(gdir / "gap_trajectory.csv")
    return figures, files


def gap_markdown(group: Group, traj: GapTrajectories,
                 figures: Sequence[tuple[str, str, str, list[GapLine]]],
                 heading: str, prefix: str = "") -> str:
    """The numbers behind the gap figures (images under ``prefix``), and the notes."""
    parts = [f"{heading} {group.title}: Avg. Gap to Retrain over rounds (NoT)\n"]
    for fname, name, what, lines in figures:
        parts.append(f"By {name.lower()} ({what}):\n\n{gap_table(lines, name)}\n"
                     f"![{Path(fname).stem}]({prefix}{fname})\n")
    parts.append("\n\n".join([GAP_NOTE, *traj.notes]) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    groups: list[Group]
    markdown: str
    files: list[Path]


CKA_FILE = "cka.png"


def cka_models(entries: Sequence[tuple[Path, dict]]) -> tuple[int, tuple[str, str],
                                                              list[tuple[str, str]]] | None:
    """The NoT paper's Figure 3 for one setting: ``(seed, reference, models)`` with the
    original (pretrained) model as the reference against NoT right after negation
    (``model-round0.pt``, written with ``eval.trajectory``) and at the end, FT (method
    ``ft`` or NoT with ``perturbation=none``) and Retrain at the end, all of one seed (the
    smallest that has NoT's two models); ``None`` when the results hold no such NoT."""
    def model_file(r: dict, name: str = "") -> str | None:
        path = (r.get("model") or {}).get("path")
        if not path:
            return None
        file = Path(path) if not name else Path(path).with_name(name)
        return str(file) if file.exists() else None

    by_seed: dict[int, dict[str, str]] = {}
    pretrained: dict[int, str] = {}
    for _, r in entries:
        seed = int((r.get("config") or {}).get("seed", 0))
        models = by_seed.setdefault(seed, {})
        method = r.get("method")
        if method == "not" and perturbation_of(r) == "negate" and not _str_list(
                (r.get("config") or {}).get("negate_layers")):  # the first layer
            start, end = model_file(r, "model-round0.pt"), model_file(r)
            if start and end:
                models["NoT@0"], models["NoT@end"] = start, end
                path = (r.get("pretrain") or {}).get("path")
                if path and Path(path).exists():
                    pretrained[seed] = path
        elif (method == "ft" or (method == "not" and perturbation_of(r) == "none")) \
                and model_file(r):
            models.setdefault("FT@end", model_file(r))
        elif method == "retrain" and model_file(r):
            models["Retrain@end"] = model_file(r)
    seeds = sorted(s for s, m in by_seed.items() if "NoT@end" in m and s in pretrained)
    if not seeds:
        return None
    seed = seeds[0]
    order = ("NoT@0", "NoT@end", "FT@end", "Retrain@end")
    return seed, ("FT@0 (original)", pretrained[seed]), [
        (name, by_seed[seed][name]) for name in order if name in by_seed[seed]]


def draw_cka(group: Group, entries: Sequence[tuple[Path, dict]], gdir: Path,
             samples: int = 500) -> tuple[str, list[Path]]:
    """Figure 3 (CKA per layer to the original) for a setting whose results hold NoT's
    saved models; ``("", [])`` when they do not."""
    found = cka_models(entries)
    if found is None:
        return "", []
    from ..harness.analysis import run_cka

    seed, reference, models = found
    config = entries[0][1].get("config") or {}
    try:
        result = run_cka(config.get("dataset", "digits"), config.get("model", "cnn"),
                         reference, models, gdir / "cka", samples=samples,
                         root=config.get("data_root", ""))
    except (ValueError, OSError) as err:
        return f"CKA not drawn: {err}\n", []
    png = gdir / "cka" / "cka.png"
    text = (f"CKA of each layer's activations to the original model's, seed {seed}, "
            f"{result['samples']} test images (the NoT paper's Figure 3):\n\n"
            f"{result['table']}\n")
    return text, [png]


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Report | None:
    """Write the report for every results file under ``root``; None if there are none."""
    root = Path(root)
    results = load_results(root)
    if not results:
        return None
    out = Path(out_dir) if out_dir else (root.parent if root.is_file() else root) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    groups = group_results(results)
    files: list[Path] = []
    sections = [f"# fedunlearn report\n\n{len(results)} results file(s) under `{root}`, "
                f"{len(groups)} setting(s).\n"]
    by_setting: dict[tuple, list[tuple[Path, dict]]] = {}
    for path, r in results:
        by_setting.setdefault(_key(setting_of(r)), []).append((path, r))
    for g in groups:
        gdir = out / g.slug
        gdir.mkdir(parents=True, exist_ok=True)
        png = plot_metrics(g, gdir / "metrics.png")
        group_md = group_markdown(g, "#", images=["metrics.png"])
        write_csv(gdir / "summary.csv", [g])
        files += [gdir / "summary.md", gdir / "summary.csv", png]
        sections.append(group_markdown(g, "##", images=[f"{g.slug}/metrics.png"]))
        # Per-round trajectories (eval.trajectory=true): the NoT paper's Figures 4 and 5.
        traj = gap_trajectories(by_setting.get(_key(g.setting), []))
        if traj.lines or traj.notes:
            figures, gap_files = draw_gap_figures(g, traj, gdir)
            group_md += "\n" + gap_markdown(g, traj, figures, "##")
            files += gap_files
            sections.append(gap_markdown(g, traj, figures, "###", prefix=f"{g.slug}/"))
        cka_text, cka_files = draw_cka(g, by_setting.get(_key(g.setting), []), gdir)
        if cka_text:
            image = f"![cka](cka/{CKA_FILE})\n" if cka_files else ""
            group_md += f"\n## CKA to the original model\n\n{cka_text}{image}"
            sections.append(f"### CKA to the original model\n\n{cka_text}"
                            + (f"![cka]({g.slug}/cka/{CKA_FILE})\n" if cka_files else ""))
            files += cka_files
        (gdir / "summary.md").write_text(group_md)
    families = ratio_families(groups)
    for name, members in families:
        fname = "forget_ratio.png" if len(families) == 1 else f"forget_ratio-{name}.png"
        png = plot_forget_ratio(name, members, out / fname)
        files.append(png)
        sections.append(f"## {name}: forget ratio\n\n{ratio_table(members)}\n![{name}]({fname})\n")
    markdown = "\n".join(sections)
    (out / "summary.md").write_text(markdown)
    write_csv(out / "summary.csv", groups)
    files = [out / "summary.md", out / "summary.csv"] + files
    return Report(out_dir=out, groups=groups, markdown=markdown, files=files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedunlearn-report",
        description="Tables (summary.md/.csv) and plots (metrics.png, forget_ratio.png; "
                    "gap_by_perturbation.png, gap_by_layer.png from trajectories) from "
                    "every results.json under a directory, in the NoT paper's layout.")
    parser.add_argument("root", help="a sweep dir, job dir, or any folder of results")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/report)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    args = parser.parse_args(argv)
    if not Path(args.root).exists():
        parser.error(f"{args.root} does not exist")
    report = write_report(args.root, args.out)
    if report is None:
        print(f"fedunlearn-report: no {RESULTS_FILE} under {args.root}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(report.markdown)
    print(f"Report written to {report.out_dir}:")
    for path in report.files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rows and groups: a setting's results aggregated per method (mean ± std over seeds, Δ
to Retrain, Avg. Gap, ★), and results grouped by setting with titles and folder names."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...metrics import average_gap
from ...harness.results import metric_keys
from .constants import COST_KEYS, DISPLAY, MATCHED_REFERENCE, METHOD_FIELDS, REFERENCE
from .loading import _key, setting_of

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
    return ({REFERENCE: 0, MATCHED_REFERENCE: 0, "ft": 1}.get(method, 3 if method == "not" else 2),
            method != REFERENCE, method)


def row_method(result: dict) -> str:
    """The row a result belongs to: its method, but a budget-matched Retrain
    (``retrain.budget=matched``) is ``retrain-matched``, a row of its own measured
    against the default Retrain, never pooled into the reference."""
    method = str(result["method"])
    if method == REFERENCE and (result.get("params") or {}).get("budget") == "matched":
        return MATCHED_REFERENCE
    return method


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


def build_rows(entries: Sequence[tuple[Path, dict]], keys: Sequence[str]) -> list[Row]:
    """Aggregate the results of one setting into rows, with Δ, Avg. Gap and ★."""
    by_method: dict[str, list[tuple[Path, dict]]] = {}
    for path, r in entries:
        by_method.setdefault(row_method(r), []).append((path, r))
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
